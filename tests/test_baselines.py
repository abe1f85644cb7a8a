"""Scratch baselines: a conv backbone + the same head trains and is scored by the same evaluator."""

import json
import os

import numpy as np
import pytest

from datasetdm_jax import baselines
from datasetdm_jax.config_utils import load_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
EXPECTED = {"instance": "AP", "pose": "AP"}


# Both head families (Mask2Former set loss; heatmap stem) and both COCO scorers; semantic and depth
# share those code paths and are covered through train.py in test_train.py.
@pytest.mark.parametrize("task", ["instance", "pose"])
def test_baseline_trains_and_scores(task, tmp_path):
    config = load_config(os.path.join(CONFIGS, f"shapes_{task}.py") + ":tiny")
    res = baselines.train_and_evaluate(config, steps=2, width=4, workdir=str(tmp_path), progress=False)
    key = EXPECTED[task]
    assert np.isfinite(res[key]) and 0.0 <= res[key] <= 1.0, res
    assert res["params"] > 0 and res["steps"] == 2
    assert json.load(open(tmp_path / baselines.RESULTS_FILE)) == res
