"""PASCAL VOC 2012 semantic segmentation with SegmentationClassAug (the paper's few-shot setting).

Layout (``root`` = ``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    SegmentationClassAug/<id>.png        # index PNG: 0..20, 255 = ignore (falls back to SegmentationClass/)
    ImageSets/SegmentationAug/<split>.txt  or  ImageSets/Segmentation/<split>.txt  or  splits/<split>.txt

A split file lists one id per line, or ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``
pairs (the DeepLab ``train_aug.txt`` form). The few-shot selection is the paper's rule: walk the
split in order; keep an image when its label map holds background plus exactly one class (no 255)
covering more than ``min_pixels`` (18000) pixels, up to ``per_class`` (5)
images per class: 5 x 20 classes = 100 images.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from datasetdm_jax.data import real_base as rb

# Official class order and names (index = label value).
CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# Words for prompts and open-vocabulary queries (the real class names, not VOC's joined labels).
PROMPT_NAMES: dict[str, str] = {"aeroplane": "aeroplane", "diningtable": "dining table",
                                "pottedplant": "potted plant", "tvmonitor": "tv monitor"}

_SPLIT_DIRS = ("ImageSets/SegmentationAug", "ImageSets/Segmentation", "splits")


def prompt_name(cls: str) -> str:
    return PROMPT_NAMES.get(cls, cls)


def split_file(root: str, split: str) -> str:
    for d in _SPLIT_DIRS:
        path = os.path.join(root, d, f"{split}.txt")
        if os.path.isfile(path):
            return path
    raise rb.DatasetError(f"{os.path.join(root, _SPLIT_DIRS[0], split + '.txt')}: missing VOC split list "
                          f"(also looked in {', '.join(_SPLIT_DIRS[1:])})")


def read_split(path: str) -> list[str]:
    """Image ids from a split list (bare ids or 'image_path label_path' lines)."""
    ids = []
    with open(path) as f:
        for line in f:
            if line.strip():
                ids.append(os.path.splitext(os.path.basename(line.split()[0]))[0])
    if not ids:
        raise rb.DatasetError(f"{path}: empty VOC split list")
    return ids


class VOCSource(rb.RealSource):
    """VOC 2012 semantic segmentation; ``per_class`` set -> the paper's few-shot selection."""

    classes = CLASSES

    def __init__(self, root: str, split: str = "train_aug", config: rb.SourceConfig | None = None, *,
                 per_class: int | None = None, min_pixels: int = 18000, single_class: bool = True,
                 label_dir: str | None = None):
        rb.require_dir(root, "VOC 2012")
        self.root = root
        aug = os.path.isdir(os.path.join(root, "SegmentationClassAug"))
        self.label_dir = label_dir or ("SegmentationClassAug" if aug else "SegmentationClass")
        rb.require_dir(os.path.join(root, self.label_dir), "VOC label")
        rb.require_dir(os.path.join(root, "JPEGImages"), "VOC image")
        ids = read_split(split_file(root, split))
        if per_class is not None:
            counts = (self._selection_counts(i, min_pixels, single_class)
                      for i in tqdm(ids, desc=f"VOC {split}: selecting {per_class}/class", leave=False))
            ids = [ids[k] for k in rb.select_per_class(counts, per_class, min_pixels,
                                                       per_class * (len(CLASSES) - 1))]
        super().__init__(config, ids)

    @property
    def ids(self) -> list[str]:
        return list(self.items)

    def label_path(self, image_id: str) -> str:
        return os.path.join(self.root, self.label_dir, f"{image_id}.png")

    def read_label(self, image_id: str) -> np.ndarray:
        path = self.label_path(image_id)
        return rb.check_labels(rb.read_index_png(path, "VOC label PNG"), path, len(CLASSES))

    def _selection_counts(self, image_id: str, min_pixels: int, single_class: bool) -> dict[int, int]:
        counts = np.bincount(self.read_label(image_id).ravel(), minlength=256)
        if single_class and ((counts > 0).sum() > 2 or counts[rb.IGNORE]):
            return {}
        return {int(v): int(counts[v]) for v in np.flatnonzero(counts[1:len(CLASSES)]) + 1}

    def load(self, image_id: str) -> dict[str, Any]:
        image = rb.read_image(os.path.join(self.root, "JPEGImages", f"{image_id}.jpg"))
        label = self.read_label(image_id)
        if label.shape != image.shape[:2]:
            raise rb.DatasetError(f"{self.label_path(image_id)}: label size {label.shape} differs from the "
                                  f"image's {image.shape[:2]}")
        present = [prompt_name(CLASSES[v]) for v in np.unique(label) if 0 < v < len(CLASSES)]
        # Official prompt: "a photo of a {class}" (one class); every present class is named here.
        return rb.make_example(image, rb.caption_for(present), self.config, segmentation=label)
