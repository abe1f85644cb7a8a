"""Scratch baselines: a conv backbone + the same head trains and is scored by the same evaluator."""

import json
import os

import numpy as np
import pytest

from datasetdm_jax.research import baselines
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


def test_predict_split_transform_changes_what_the_model_sees():
    """`transform` maps the images before the model (the depth diagnosis feeds it VAE round trips)."""
    config = load_config(os.path.join(CONFIGS, "shapes_depth.py") + ":tiny")
    scratch = baselines.Scratch(config, 4)
    params = scratch.init_params
    seen = []
    plain = [p["depth"] for p, _ in baselines.predict_split(scratch, params, "test", 4, 0)]
    flat = [p["depth"] for p, _ in baselines.predict_split(
        scratch, params, "test", 4, 0, transform=lambda x: seen.append(x) or np.zeros_like(x))]
    assert len(seen) == len(flat) and seen[0].min() < 0 < seen[0].max()  # real images in [-1, 1]
    want = np.asarray(scratch.predict_fn(params, np.zeros_like(seen[0]))["depth"])
    np.testing.assert_allclose(flat[0], want, rtol=1e-6)
    assert not np.allclose(plain[0], flat[0])


def test_vae_round_trip_control_sees_what_the_latent_keeps():
    """`baseline.vae_round_trip`: training and scoring images go through the frozen SD's VAE."""
    from datasetdm_jax.train import load_frozen_pipeline

    path = os.path.join(CONFIGS, "shapes_depth.py") + ":tiny"
    assert baselines.Scratch(load_config(path), 4).transform is None
    config = load_config(path, ["baseline.vae_round_trip=True"])
    scratch = baselines.Scratch(config, 4)
    x = np.random.default_rng(0).uniform(-1, 1, (2, config.data.image_size, config.data.image_size, 3)).astype(np.float32)
    pipe = load_frozen_pipeline(str(config.pipeline))
    np.testing.assert_allclose(scratch.transform(x), np.clip(np.asarray(pipe.vae_decode(pipe.vae_encode(x))), -1, 1),
                               atol=1e-6)
    assert np.abs(scratch.transform(x) - x).mean() > 0.05  # noise does not survive the 4x latent
    res = baselines.train_and_evaluate(config, steps=2, width=4, progress=False)
    assert "VAE" in res["model"] and np.isfinite(res["rel"]) and res["steps"] == 2
