"""P-Decoder training: learns on a fixed batch, resumes exactly, evaluates, names the missing model.

Everything runs on ``configs/shapes_semantic.py:tiny`` over a tiny random-weight SD; one Trainer
(one compilation) is shared by the module.
"""

import os

import jax
import numpy as np
import pytest

from datasetdm_jax import pretrained, smoke, train
from datasetdm_jax.config_utils import load_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
TINY = os.path.join(CONFIGS, "shapes_semantic.py") + ":tiny"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    path = pretrained.save_pipeline(smoke.random_pipeline(root / "src"), root / "model")
    config = load_config(TINY, [f"pipeline={path}"])
    return config, train.Trainer(config), root


def test_loss_finite_and_decreasing_on_a_fixed_batch(setup):
    config, tr, _ = setup
    it = train._train_iterator(config, None)
    batch = jax.device_put(tr.host_batch(next(it), 0), tr.data_sharding)
    state = jax.device_put({"step": np.zeros((), np.int32), "params": tr.init_params,
                            "opt": tr.tx.init(tr.init_params)}, tr.repl)
    losses = []
    for _ in range(8):
        state, m = tr.step_fn(state, batch, tr.frozen)
        losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def test_resume_equals_uninterrupted(setup):
    config, tr, root = setup
    done, _, full = train.run(config, str(root / "full"), trainer=tr)
    assert done
    stopped, _, _ = train.run(config, str(root / "resumed"), trainer=tr, max_steps=2)
    assert not stopped
    done2, _, resumed = train.run(config, str(root / "resumed"), trainer=tr)
    assert done2
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with open(os.path.join(root, "resumed", train.METRICS_FILE)) as f:
        steps = [int(line.split('"step": ')[1].split(",")[0]) for line in f]
    assert steps == [1, 2, 3, 4]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(setup, monkeypatch):
    config, tr, root = setup
    workdir = str(root / "nan")
    train.run(config, workdir, trainer=tr, max_steps=2)
    clean = tr.host_batch

    def poisoned(b, step, augment=True):
        out = clean(b, step, augment)
        return {**out, "image": np.full_like(out["image"], np.nan)}

    monkeypatch.setattr(tr, "host_batch", poisoned)
    with pytest.raises(train.TrainingDiverged, match="last good checkpoint: step 2"):
        train.run(config, workdir, trainer=tr)
    assert sorted(int(n) for n in os.listdir(os.path.join(workdir, train.STAGE)) if n.isdigit()) == [2]


def test_eval_miou_in_unit_interval(setup):
    config, tr, _ = setup
    ev = train.evaluate(tr, tr.init_params)
    assert 0.0 <= ev["miou"] <= 1.0


def test_missing_model_names_the_pretrain_command(tmp_path):
    config = load_config(TINY, [f"pipeline={tmp_path / 'nope'}"])
    with pytest.raises(FileNotFoundError, match="datasetdm pretrain --config configs/shapes_sd.py"):
        train.Trainer(config)


def test_depth_config_loads():
    config = load_config(os.path.join(CONFIGS, "shapes_depth.py") + ":tiny")
    assert config.task == "depth" and config.data.split == "train_labelled"
