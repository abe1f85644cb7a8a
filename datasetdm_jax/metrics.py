"""Evaluation metrics (numpy, host side): mIoU, depth REL/RMSE/delta1, COCO mask and keypoint AP.

COCO AP goes through pycocotools: ground truth and predictions are built as in-memory COCO
objects from numpy masks / keypoints (RLE via `pycocotools.mask.encode`), so no JSON files are
written and the numbers are the official COCOeval ones.
"""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np


# ----------------------------------------------------------------------------- semantic segmentation

def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(K, K) int64 counts, rows = GT class, columns = predicted class; GT == ignore_index skipped."""
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    keep = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    if np.any((gt != ignore_index) & ((gt < 0) | (gt >= num_classes))):
        raise ValueError(f"ground-truth labels outside [0, {num_classes}) and != {ignore_index}")
    pred = np.clip(pred[keep], 0, num_classes - 1)
    return np.bincount(gt[keep] * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_from_confusion(cm: np.ndarray) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU); classes absent from both GT and prediction are NaN and not averaged."""
    cm = np.asarray(cm, dtype=np.float64)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
    return float(np.nanmean(iou)) if np.any(union > 0) else float("nan"), iou


class MeanIoU:
    """Accumulates a confusion matrix over batches; `compute()` -> (mIoU, per-class IoU)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cm = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        self.cm += confusion_matrix(pred, gt, self.num_classes, self.ignore_index)

    def compute(self) -> tuple[float, np.ndarray]:
        return iou_from_confusion(self.cm)


# ----------------------------------------------------------------------------- depth

def depth_metrics(pred: np.ndarray, gt: np.ndarray, min_depth: float = 1e-3,
                  max_depth: float | None = None) -> dict[str, float]:
    """REL = mean |p - g| / g, RMSE = sqrt(mean (p - g)^2), delta1 = mean(max(p/g, g/p) < 1.25).

    Over valid pixels (gt > min_depth and, if given, gt <= max_depth); per image for (N, H, W)
    inputs then averaged over images (the usual NYU/KITTI protocol); predictions are clipped to
    [min_depth, max_depth].
    """
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, np.float64)
    if gt.ndim == 2:
        pred, gt = pred[None], gt[None]
    out = {"rel": [], "rmse": [], "delta1": []}
    for p, g in zip(pred, gt):
        valid = g > min_depth
        if max_depth is not None:
            valid &= g <= max_depth
        if not valid.any():
            continue
        p = np.clip(p[valid], min_depth, max_depth if max_depth is not None else np.inf)
        g = g[valid]
        out["rel"].append(np.mean(np.abs(p - g) / g))
        out["rmse"].append(np.sqrt(np.mean((p - g) ** 2)))
        out["delta1"].append(np.mean(np.maximum(p / g, g / p) < 1.25))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in out.items()}


# ----------------------------------------------------------------------------- COCO AP

def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def _summary(ev) -> dict[str, float]:
    s = ev.stats
    return {"AP": float(s[0]), "AP50": float(s[1]), "AP75": float(s[2])}


def _categories(labels: Sequence[np.ndarray]) -> list[dict]:
    cats = sorted({int(c) for lab in labels for c in np.asarray(lab).reshape(-1)} | {1})
    return [{"id": c, "name": str(c)} for c in cats]


def coco_mask_ap(gts: Sequence[dict], preds: Sequence[dict], class_agnostic: bool = False) -> dict[str, float]:
    """COCO mask AP (AP, AP50, AP75; -1 when undefined) for one list entry per image.

    gts[i]: {"masks": (N, H, W) bool, "labels": (N,) int}; preds[i]: {"masks", "labels", "scores"}.
    `class_agnostic` maps every label to 1 (the official COCO/LVIS setting).
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def lab(d, n):
        return np.ones(n, np.int64) if class_agnostic else np.asarray(d["labels"]).reshape(-1)

    def rle(m):
        r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        return r

    images, anns, dets = [], [], []
    for i, (g, p) in enumerate(zip(gts, preds)):
        gm = np.asarray(g["masks"]).astype(bool)
        h, w = gm.shape[-2:]
        images.append({"id": i, "height": int(h), "width": int(w)})
        for m, c in zip(gm, lab(g, len(gm))):
            r = rle(m)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "segmentation": r,
                         "area": float(mask_utils.area(r)), "bbox": list(mask_utils.toBbox(r)), "iscrowd": 0})
        pm = np.asarray(p["masks"]).astype(bool)
        for m, c, s in zip(pm, lab(p, len(pm)), np.asarray(p["scores"]).reshape(-1)):
            dets.append({"image_id": i, "category_id": int(c), "segmentation": rle(m), "score": float(s)})
    all_labels = [lab(g, len(g["masks"])) for g in gts]
    with _quiet():
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns, "categories": _categories(all_labels)}
        coco.createIndex()
        if not dets:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        ev = COCOeval(coco, coco.loadRes(dets), "segm")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return _summary(ev)


def coco_keypoint_ap(gts: Sequence[dict], preds: Sequence[dict]) -> dict[str, float]:
    """COCO keypoint AP (OKS, the 17 COCO sigmas) for one list entry per image.

    gts[i]: {"keypoints": (N, 17, 3) with v in {0, 1, 2}, "areas": (N,) object areas (optional:
    defaults to the area of the visible keypoints' bounding box)}; preds[i]: {"keypoints":
    (N, 17, 3) as (x, y, score), "scores": (N,)}.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for i, (g, p) in enumerate(zip(gts, preds)):
        images.append({"id": i})
        kps = np.asarray(g["keypoints"], np.float64).reshape(-1, 17, 3)
        areas = g.get("areas")
        for j, k in enumerate(kps):
            vis = k[:, 2] > 0
            x0, y0 = (k[vis, :2].min(0) if vis.any() else (0.0, 0.0))
            x1, y1 = (k[vis, :2].max(0) if vis.any() else (0.0, 0.0))
            area = float(areas[j]) if areas is not None else float(max((x1 - x0) * (y1 - y0), 1.0))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "keypoints": k.reshape(-1).tolist(),
                         "num_keypoints": int(vis.sum()), "area": area, "bbox": [float(x0), float(y0),
                         float(x1 - x0), float(y1 - y0)], "iscrowd": 0})
        for k, s in zip(np.asarray(p["keypoints"], np.float64).reshape(-1, 17, 3), np.asarray(p["scores"]).reshape(-1)):
            dets.append({"image_id": i, "category_id": 1, "keypoints": k.reshape(-1).tolist(), "score": float(s)})
    with _quiet():
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns,
                        "categories": [{"id": 1, "name": "person", "keypoints": [str(j) for j in range(17)]}]}
        coco.createIndex()
        if not dets:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        ev = COCOeval(coco, coco.loadRes(dets), "keypoints")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return _summary(ev)
