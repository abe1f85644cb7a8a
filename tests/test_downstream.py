"""Downstream models, mixing and the real / synthetic / mixed comparison (tiny configs only)."""

import itertools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from datasetdm_jax import metrics as mt
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.downstream import (ArraySource, Augment, IterSource, MixedBatches, batch_counts,
                                      cross_entropy_ignore, evaluate, format_table, jsonable, row_weights,
                                      run_comparison, shapes_arrays, train)
from datasetdm_jax.downstream import trainer as trainer_mod

TINY = "configs/downstream_shapes.py:tiny"


@pytest.fixture(scope="module")
def tiny_config():
    return load_config(TINY)


@pytest.fixture(scope="module")
def real():
    return shapes_arrays("train_labelled", 8, image_size=32, progress=False)


def _fixed(arrays, n=4):
    """An iterator repeating one prepared batch (no augmentation)."""
    b = {"image": arrays["image"][:n].astype(np.float32) / 127.5 - 1.0,
         "segmentation": arrays["segmentation"][:n].astype(np.int32), "depth": arrays["depth"][:n]}
    return itertools.repeat(b)


def test_ignore_255_contributes_nothing():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 4, 4, 5)), jnp.float32)
    labels = rng.integers(0, 5, size=(2, 4, 4)).astype(np.int32)
    labels[:, :2] = 255
    ce = jax.jit(jax.value_and_grad(cross_entropy_ignore))   # one compile for all the calls below
    loss, _ = ce(logits, jnp.asarray(labels))
    # Changing the logits under ignored pixels changes nothing.
    other = logits.at[:, :2].set(jnp.asarray(rng.normal(size=(2, 2, 4, 5)) * 10, jnp.float32))
    np.testing.assert_allclose(ce(other, jnp.asarray(labels))[0], loss, rtol=1e-6)
    # It equals the mean CE over the labelled pixels only (numpy reference).
    keep = labels != 255
    lg = np.asarray(logits)[keep]
    ref = np.mean(np.log(np.exp(lg).sum(-1)) - lg[np.arange(len(lg)), labels[keep]])
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    # All ignored: zero loss and zero gradient.
    loss0, g = ce(logits, jnp.full((2, 4, 4), 255, jnp.int32))
    assert float(loss0) == 0.0 and float(jnp.abs(g).max()) == 0.0


@pytest.mark.parametrize("task", ["semantic", "depth"])
def test_loss_decreases_on_fixed_batch(tiny_config, real, task):
    cfg = ml_collections.ConfigDict(tiny_config[task].to_dict())
    cfg.steps, cfg.log_every, cfg.warmup_steps, cfg.lr = 12, 1, 0, 1e-2
    trained = train(cfg, _fixed(real), progress=False)
    losses = [v for _, v in trained.history]
    assert len(losses) == 12
    assert losses[-1] < 0.8 * losses[0], losses
    pred = trainer_mod.predict(trained, real["image"][:3], batch_size=2)
    assert pred.shape == (3, 32, 32)
    if task == "depth":
        assert pred.dtype == np.float32 and (pred > 0).all()
    else:
        assert pred.dtype == np.int32 and pred.min() >= 0 and pred.max() < cfg.num_classes


def test_mixing_ratio_is_honoured():
    def src(value, n):
        return {"image": np.full((n, 8, 8, 3), value, np.uint8), "segmentation": np.full((n, 8, 8), value % 7, np.uint8)}

    sources = {"real": ArraySource(src(10, 5), seed=0), "synthetic": ArraySource(src(200, 7), seed=1)}
    batches = MixedBatches(sources, {"real": 0.25, "synthetic": 0.75}, 8, seed=0)
    assert batches.counts == {"real": 2, "synthetic": 6}
    for _ in range(7):
        b = next(batches)
        tags = b["source"]
        assert (tags == 0).sum() == 2 and (tags == 1).sum() == 6
        # The tags say where each example came from.
        vals = np.round((b["image"][:, 0, 0, 0] + 1) * 127.5)
        np.testing.assert_array_equal(vals, np.where(tags == 0, 10, 200))
    assert batch_counts({"real": 1, "synthetic": 1}, 4) == {"real": 2, "synthetic": 2}
    assert batch_counts({"real": 0.9, "synthetic": 0.1}, 4) == {"real": 3, "synthetic": 1}
    assert row_weights("real+synthetic", 0.5) == {"real": 0.5, "synthetic": 0.5}
    assert row_weights("synthetic") == {"synthetic": 1.0}
    with pytest.raises(ValueError, match="unknown sources"):
        MixedBatches(sources, {"real": 1, "web": 1}, 4)


def test_each_epoch_sees_every_example_once():
    arr = {"image": np.arange(5, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3)}
    s = ArraySource(arr, seed=3)
    first = np.concatenate([s.draw(2)["image"][:, 0, 0, 0] for _ in range(5)])  # two epochs
    assert sorted(first[:5].tolist()) == list(range(5)) and sorted(first[5:].tolist()) == list(range(5))


def test_iter_source_restarts_and_stacks():
    exs = [{"image": np.full((4, 4, 3), i, np.uint8), "depth": np.full((4, 4), i + 1.0, np.float32)} for i in range(3)]
    s = IterSource(lambda: iter(exs), name="stream")
    b = s.draw(5)
    np.testing.assert_array_equal(b["image"][:, 0, 0, 0], [0, 1, 2, 0, 1])
    assert b["depth"].dtype == np.float32


def test_augment_flip_scale_crop():
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 3, size=(16, 16)).astype(np.uint8)
    ex = {"image": rng.integers(0, 256, size=(16, 16, 3)).astype(np.uint8), "segmentation": seg,
          "depth": np.full((16, 16), 4.0, np.float32)}
    out = Augment(crop=(16, 16), flip=False, scale=(0.5, 0.5))(ex, rng)
    assert out["image"].shape == (16, 16, 3) and out["segmentation"].shape == (16, 16)
    valid = out["depth"] > 0
    assert (~valid).sum() == 16 * 16 - 8 * 8                      # padded area: invalid depth, ignored labels
    assert (out["segmentation"][~valid] == 255).all() and set(np.unique(out["segmentation"][valid])) <= {0, 1, 2}
    np.testing.assert_allclose(out["depth"][valid], 8.0)          # half size -> twice as far
    flipped = Augment(crop=(16, 16), flip=True, scale=(1.0, 1.0))
    outs = [flipped(ex, np.random.default_rng(i)) for i in range(8)]
    assert any(np.array_equal(o["segmentation"], seg[:, ::-1]) for o in outs)
    assert any(np.array_equal(o["segmentation"], seg) for o in outs)
    up = Augment(crop=(12, 10), flip=False, scale=(2.0, 2.0))(ex, rng)
    assert up["image"].shape == (12, 10, 3) and np.allclose(up["depth"], 2.0)


def test_evaluate_matches_metrics_on_a_hand_case(monkeypatch):
    gt = np.array([[[0, 0, 0], [1, 1, 255]]], np.uint8)
    pred = np.array([[[0, 0, 1], [1, 2, 2]]], np.int32)       # the last pixel is ignored
    fake = trainer_mod.Trained("semantic", ml_collections.ConfigDict(dict(num_classes=4)), None, None, None,
                               [], 0.0, 0)
    monkeypatch.setattr(trainer_mod, "predict", lambda *a, **k: pred)
    r = evaluate(fake, {"image": np.zeros((1, 2, 3, 3), np.uint8), "segmentation": gt})
    # class 0: 2 / (3 gt + 2 pred - 2) = 2/3; class 1: 1 / (2 + 2 - 1) = 1/3; class 2: 0 / 1; class 3 absent.
    assert r["per_class_iou"][:3] == pytest.approx([2 / 3, 1 / 3, 0.0]) and np.isnan(r["per_class_iou"][3])
    assert r["miou"] == pytest.approx(1 / 3)
    assert r["miou"] == pytest.approx(mt.iou_from_confusion(mt.confusion_matrix(pred, gt, 4))[0])
    assert r["pixel_acc"] == pytest.approx(3 / 5)

    depth_gt = np.array([[[2.0, 4.0], [0.0, 8.0]]], np.float32)
    monkeypatch.setattr(trainer_mod, "predict", lambda *a, **k: np.array([[[2.0, 5.0], [1.0, 4.0]]], np.float32))
    fake.task = "depth"
    r = evaluate(fake, {"image": np.zeros((1, 2, 2, 3), np.uint8), "depth": depth_gt})
    # valid pixels (pred, gt): (2, 2), (5, 4), (4, 8): REL = (0 + 0.25 + 0.5) / 3; delta1: only
    # (2, 2) has max ratio < 1.25 (5/4 is not strictly below) -> 1/3.
    assert r["rel"] == pytest.approx(0.25) and r["delta1"] == pytest.approx(1 / 3)
    assert r["rmse"] == pytest.approx(np.sqrt((0 + 1 + 16) / 3))


def test_run_comparison_tiny(tiny_config, real):
    synthetic = shapes_arrays("pretrain", 8, image_size=32, progress=False)   # a stand-in for generated data
    tests = {"test": shapes_arrays("test", 4, image_size=32, progress=False),
             "test_shifted": shapes_arrays("test_shifted", 4, image_size=32, progress=False)}
    result = run_comparison(real, synthetic, tests, tiny_config, progress=False)
    assert result["rows"] == ["real", "synthetic", "real+synthetic"]
    for row in result["rows"]:
        for split in tests:
            assert 0.0 <= result["semantic"][row][split]["miou"] <= 1.0
            assert result["depth"][row][split]["rel"] > 0
    table = format_table(result)
    assert "(c) real + synth." in table and "mIoU test_shifted" in table and "REL test" in table
    json.dumps(jsonable(result))  # NaN-free, JSON-able


def test_cli_downstream_real_only(tmp_path, capsys):
    from datasetdm_jax import cli

    cli.main(["downstream", "--config", TINY, "--workdir", str(tmp_path), "rows=('real',)", "tasks=('semantic',)"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rows"] == ["real"] and set(report["semantic"]["real"]) == {"test", "test_shifted"}
    assert "(a) real only" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="synthetic.records"):
        cli.main(["downstream", "--config", TINY, "--workdir", str(tmp_path)])


def test_records_adapter(tmp_path, real):
    """Generated records (TFRecord shards + manifest, 16-bit depth) read back as training arrays."""
    from datasetdm_jax.data import records
    from datasetdm_jax.downstream import records_arrays

    with pytest.raises(FileNotFoundError, match="manifest"):
        records_arrays(str(tmp_path))
    exs = [records.to_example({"image": real["image"][i], "segmentation": real["segmentation"][i],
                               "depth": real["depth"][i], "prompt": "p", "index": i}) for i in range(3)]
    summary = records.write_shard(str(tmp_path), records.shard_name(0, 1), exs, formats=("tfrecord",))
    (tmp_path / records.MANIFEST).write_text(json.dumps({"shards": [summary]}))
    got = records_arrays(str(tmp_path), num=2, progress=False)
    np.testing.assert_array_equal(got["image"], real["image"][:2])
    np.testing.assert_array_equal(got["segmentation"], real["segmentation"][:2])
    np.testing.assert_allclose(got["depth"], real["depth"][:2], atol=1e-3)   # millimetre steps
