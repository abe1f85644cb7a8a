"""`datasetdm exp diagnose`: the real pool with its truth and with P-Decoder labels, and the pool rows.

A tiny random SD and a randomly initialised tiny semantic decoder saved the way `datasetdm train`
saves it; the tiny downstream config trains for a few steps."""

import os

import numpy as np
import pytest

from datasetdm_jax import metrics, train
from datasetdm_jax.research import diagnose
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.data import shapes
from datasetdm_jax.downstream import data
from tiny_sd import IMAGE_SIZE, save_random_decoder

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
NUM = 5  # batches of 2: the last one short


@pytest.fixture(scope="module")
def pools(pipe, tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnose")
    config = load_config(os.path.join(CONFIGS, "shapes_semantic.py:tiny"), [f"pipeline={tiny_dir}",
                                                                           f"workdir={root / 'wd'}"])
    save_random_decoder(config, train.Trainer(config, pipe=pipe))
    return config, diagnose.label_real_pool(config, NUM, pipe=pipe, batch_size=2, progress=False)


def test_real_pool_truth_and_p_decoder_labels(pools):
    config, (truth, labelled, scores) = pools
    ref = data.shapes_arrays(diagnose.POOL_SPLIT, NUM, 0, IMAGE_SIZE, progress=False)
    np.testing.assert_array_equal(truth["image"], ref["image"])
    np.testing.assert_array_equal(truth["segmentation"], ref["segmentation"])
    np.testing.assert_array_equal(labelled["image"], ref["image"])
    seg = labelled["segmentation"]
    assert seg.shape == ref["segmentation"].shape and seg.max() < len(shapes.CLASSES)
    miou = metrics.MeanIoU(len(shapes.CLASSES))           # the reported score is that of these labels
    miou.update(seg, truth["segmentation"])
    assert scores["miou"] == pytest.approx(miou.compute()[0], abs=1e-6)
    fg = truth["segmentation"] > 0
    assert scores["foreground_accuracy"] == pytest.approx((seg == truth["segmentation"])[fg].mean())
    assert 0 <= scores["foreground_share_low_confidence"] <= 1 and scores["mask_size"] == IMAGE_SIZE // 2


def test_label_errors_and_resolution_ceiling():
    truth = np.zeros((1, 4, 4), np.uint8)
    truth[0, :2, :2] = 1                                   # a 2x2 object
    labels = truth.copy()
    labels[0, 0, 0] = 2                                    # one wrong foreground pixel, the least confident
    conf = np.ones((1, 4, 4), np.float32)
    conf[0, 0, 0] = 0.1
    e = diagnose.label_errors(labels, truth, conf, low_fraction=0.05)
    assert e["foreground_accuracy"] == 0.75 and e["foreground_share_low_confidence"] == 0.25
    assert e["foreground_accuracy_low_confidence"] == 0.0 and e["foreground_accuracy_other"] == 1.0
    assert diagnose.resolution_ceiling(truth, 2, 3) == pytest.approx(1.0)   # the object fills one cell
    centred = np.zeros((1, 4, 4), np.uint8)
    centred[0, 1:3, 1:3] = 1                               # a quarter of each 2x2 cell: lost
    assert diagnose.resolution_ceiling(centred, 4, 3) == pytest.approx(1.0)
    assert diagnose.resolution_ceiling(centred, 2, 3) == pytest.approx(0.5 * 12 / 16)  # background IoU 12/16


def test_pool_rows_and_table(pools):
    config, (truth, labelled, _) = pools
    ds = load_config(os.path.join(CONFIGS, "downstream_shapes.py:tiny"))
    real = data.shapes_arrays("train_labelled", 4, 0, IMAGE_SIZE, progress=False)
    tests = {"test": data.shapes_arrays("test", 4, 0, IMAGE_SIZE, progress=False)}
    rows = diagnose.compare_pools(real, {"real_ground_truth": truth, "real_p_decoder": labelled,
                                         "generated": labelled}, tests, ds, progress=False)
    assert set(rows) == {"real", *diagnose.POOLS}
    for pool in diagnose.POOLS:
        assert set(rows[pool]) == {"pool", "real+pool"}
        assert all(0.0 <= v["test"] <= 1.0 for v in rows[pool].values())
    table = diagnose.format_table({**rows, "num_pool": NUM, "p_decoder_on_pool": pools[1][2]})
    assert f"{NUM} real, ground truth" in table and f"mIoU {100 * pools[1][2]['miou']:.1f}" in table
    assert len(table.splitlines()) == 2 + 2 * len(diagnose.POOLS) + 3
