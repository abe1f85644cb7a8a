"""Metrics against hand-computed cases."""

import numpy as np
import pytest

from datasetdm_jax import metrics


def test_miou_with_ignore():
    gt = np.array([[0, 0, 1, 1], [0, 255, 1, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 2, 2]])
    m = metrics.MeanIoU(3)
    m.update(pred[:1], gt[:1])
    m.update(pred[1:], gt[1:])
    miou, iou = m.compute()
    # class 0: inter 2, union 3; class 1: inter 2, union 4; class 2: inter 1, union 2 (255 pixel ignored).
    np.testing.assert_allclose(iou, [2 / 3, 2 / 4, 1 / 2])
    assert miou == pytest.approx((2 / 3 + 0.5 + 0.5) / 3)


def test_miou_absent_class_is_nan():
    miou, iou = metrics.iou_from_confusion(metrics.confusion_matrix(np.zeros(4), np.zeros(4), 3))
    assert iou[0] == 1.0 and np.isnan(iou[1:]).all() and miou == 1.0


def test_depth_metrics():
    gt = np.array([[1.0, 2.0], [4.0, 0.0]])
    pred = np.array([[1.0, 3.0], [4.0, 9.0]])  # last pixel invalid (gt 0)
    r = metrics.depth_metrics(pred, gt)
    assert r["rel"] == pytest.approx((0 + 0.5 + 0) / 3)
    assert r["rmse"] == pytest.approx(np.sqrt(1 / 3))
    assert r["delta1"] == pytest.approx(2 / 3)


def _square(h, w, y0, x0, s):
    m = np.zeros((h, w), bool)
    m[y0:y0 + s, x0:x0 + s] = True
    return m


def test_coco_mask_ap():
    gm = np.stack([_square(32, 32, 2, 2, 10), _square(32, 32, 15, 15, 12)])
    gts = [{"masks": gm, "labels": np.array([1, 2])}]
    perfect = [{"masks": gm, "labels": np.array([1, 2]), "scores": np.array([0.9, 0.8])}]
    assert metrics.coco_mask_ap(gts, perfect)["AP"] == pytest.approx(1.0)
    shifted = np.stack([_square(32, 32, 5, 5, 10), gm[1]])  # IoU 49/151 for the first
    wrong = [{"masks": shifted, "labels": np.array([1, 2]), "scores": np.array([0.9, 0.8])}]
    r = metrics.coco_mask_ap(gts, wrong)
    assert r["AP"] < 0.9 and r["AP50"] == pytest.approx(0.5)
    # Class-agnostic: wrong labels do not matter.
    swapped = [{"masks": gm, "labels": np.array([2, 1]), "scores": np.array([0.9, 0.8])}]
    assert metrics.coco_mask_ap(gts, swapped)["AP"] < 0.5
    assert metrics.coco_mask_ap(gts, swapped, class_agnostic=True)["AP"] == pytest.approx(1.0)


def test_coco_keypoint_ap():
    rng = np.random.default_rng(0)
    kp = np.concatenate([rng.uniform(10, 90, (2, 17, 2)), np.full((2, 17, 1), 2.0)], -1)
    gts = [{"keypoints": kp, "areas": np.array([5000.0, 5000.0])}]
    pred = kp.copy()
    pred[..., 2] = 1.0
    assert metrics.coco_keypoint_ap(gts, [{"keypoints": pred, "scores": np.array([0.9, 0.8])}])["AP"] == pytest.approx(1.0)
    bad = pred.copy()
    bad[1, :, :2] += 15.0
    assert metrics.coco_keypoint_ap(gts, [{"keypoints": bad, "scores": np.array([0.9, 0.8])}])["AP"] < 0.9
