"""Test helper: a tiny fake PASCAL VOC 2012 folder in its on-disk layout (SegmentationClassAug,
DeepLab-style ``train_aug.txt``, ``val.txt``), shared by the dataset tests and the Colab notebook test."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def png(path: str, arr: np.ndarray, mode: str | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def voc_label(h: int, w: int, blocks) -> np.ndarray:
    lab = np.zeros((h, w), np.uint8)
    for v, (r0, r1, c0, c1) in blocks:
        lab[r0:r1, c0:c1] = v
    return lab


VOC_LABELS = {  # id -> label map (30 x 40); selection with per_class=1, min_pixels=100
    "2007_000001": voc_label(30, 40, [(1, (0, 20, 0, 20))]),                        # aeroplane 400 px: taken
    "2007_000002": voc_label(30, 40, [(1, (0, 20, 0, 20))]),                        # aeroplane again: class full
    "2007_000003": voc_label(30, 40, [(2, (0, 20, 0, 20)), (3, (20, 30, 0, 20))]),  # two classes: no
    "2007_000004": voc_label(30, 40, [(3, (0, 20, 0, 20)), (255, (25, 30, 0, 40))]),  # has 255: no
    "2007_000005": voc_label(30, 40, [(3, (0, 5, 0, 10))]),                         # bird 50 px: too small
    "2007_000006": voc_label(30, 40, [(3, (0, 20, 0, 20))]),                        # bird 400 px: taken
}


def write_fake_voc(root: str) -> str:
    """Writes the six VOC_LABELS images (random JPEGs) under ``root`` (a VOC2012 folder); returns it.
    ``val`` lists the first two ids."""
    os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
    for k, (i, lab) in enumerate(VOC_LABELS.items()):
        Image.fromarray(rgb(30, 40, k)).save(os.path.join(root, "JPEGImages", f"{i}.jpg"), quality=95)
        png(os.path.join(root, "SegmentationClassAug", f"{i}.png"), lab)
    os.makedirs(os.path.join(root, "ImageSets", "SegmentationAug"), exist_ok=True)
    with open(os.path.join(root, "ImageSets", "SegmentationAug", "train_aug.txt"), "w") as f:
        f.writelines(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in VOC_LABELS)
    os.makedirs(os.path.join(root, "ImageSets", "Segmentation"), exist_ok=True)
    with open(os.path.join(root, "ImageSets", "Segmentation", "val.txt"), "w") as f:
        f.writelines(f"{i}\n" for i in list(VOC_LABELS)[:2])
    return root
