"""`datasetdm diagnose`: the real pool with its truth and with P-Decoder labels, and the pool rows.

A tiny random SD and a randomly initialised tiny semantic decoder saved the way `datasetdm train`
saves it; the tiny downstream config trains for a few steps."""

import os

import numpy as np
import pytest

from datasetdm_jax import diagnose, metrics, train
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
    table = diagnose.format_table({**rows, "num_pool": NUM, "p_decoder_on_pool": {"miou": 0.25}})
    assert f"{NUM} real, ground truth" in table and "mIoU 25.0" in table
    assert len(table.splitlines()) == 2 + 2 * len(diagnose.POOLS) + 1
