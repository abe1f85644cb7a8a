"""Cityscapes semantic segmentation, 19 train ids (the paper's few-shot setting).

Layout (``root`` holds both packages, ``leftImg8bit_trainvaltest`` and ``gtFine_trainvaltest``)::

    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

``labelIds`` (0..33, the raw classes) are mapped to the 19 train ids with the Cityscapes label
table; every other id becomes 255 (ignore). With ``label_kind='labelTrainIds'`` the
``*_gtFine_labelTrainIds.png`` files made by cityscapesscripts are read as they are (what the
official DatasetDM code reads). Label maps are resized with nearest neighbour (the official code's
bilinear resize corrupts boundaries). Few-shot selection as the official script:
walk the sorted frames, take a frame for the first train id covering more than ``min_pixels``
(10000) pixels that has fewer than ``per_class`` frames.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from datasetdm_jax.data import real_base as rb

# The 19 evaluated classes, in train-id order.
CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
# labelId -> trainId for the evaluated classes (Cityscapes label table); all other ids -> 255.
LABEL_TO_TRAIN: dict[int, int] = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                                  24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
NUM_LABEL_IDS = 34  # raw labelIds 0..33 (the licence plate's -1 is never written to the PNGs)
_LUT = np.full(256, rb.IGNORE, np.uint8)
for _k, _v in LABEL_TO_TRAIN.items():
    _LUT[_k] = _v

_IMAGE_SUFFIX = "_leftImg8bit.png"


def to_train_ids(label_ids: np.ndarray, path: str) -> np.ndarray:
    """Raw labelIds -> train ids 0..18 / 255; ids above 33 are an error naming ``path``."""
    rb.check_labels(label_ids, path, NUM_LABEL_IDS, ignore=-1)
    return _LUT[label_ids.astype(np.int64)]


class CityscapesSource(rb.RealSource):
    """Cityscapes fine annotations; ``per_class`` set -> the official few-shot selection."""

    classes = CLASSES

    def __init__(self, root: str, split: str = "train", config: rb.SourceConfig | None = None, *,
                 label_kind: str = "labelIds", per_class: int | None = None, min_pixels: int = 10000):
        if label_kind not in ("labelIds", "labelTrainIds"):
            raise ValueError(f"label_kind must be 'labelIds' or 'labelTrainIds', got {label_kind!r}")
        self.root, self.split, self.label_kind = root, split, label_kind
        img_dir = rb.require_dir(os.path.join(root, "leftImg8bit", split), "Cityscapes leftImg8bit/" + split)
        rb.require_dir(os.path.join(root, "gtFine", split), "Cityscapes gtFine/" + split)
        frames = sorted(p[len(img_dir) + 1:-len(_IMAGE_SUFFIX)]
                        for p in glob.glob(os.path.join(img_dir, "*", "*" + _IMAGE_SUFFIX)))
        if not frames:
            raise rb.DatasetError(f"{img_dir}: no <city>/*{_IMAGE_SUFFIX} images")
        if per_class is not None:
            counts = (self._class_counts(f) for f in tqdm(frames, desc=f"Cityscapes {split}: selecting",
                                                          leave=False))
            frames = [frames[k] for k in rb.select_per_class(counts, per_class, min_pixels,
                                                             per_class * len(CLASSES))]
        super().__init__(config, frames)

    def image_path(self, frame: str) -> str:
        return os.path.join(self.root, "leftImg8bit", self.split, frame + _IMAGE_SUFFIX)

    def label_path(self, frame: str) -> str:
        return os.path.join(self.root, "gtFine", self.split, f"{frame}_gtFine_{self.label_kind}.png")

    def read_label(self, frame: str) -> np.ndarray:
        path = self.label_path(frame)
        raw = rb.read_index_png(path, "Cityscapes label PNG")
        if self.label_kind == "labelIds":
            return to_train_ids(raw, path)
        return rb.check_labels(raw, path, len(CLASSES))

    def _class_counts(self, frame: str) -> dict[int, int]:
        counts = np.bincount(self.read_label(frame).ravel(), minlength=256)[: len(CLASSES)]
        return {int(v): int(counts[v]) for v in np.flatnonzero(counts)}

    def load(self, frame: str) -> dict[str, Any]:
        image = rb.read_image(self.image_path(frame))
        label = self.read_label(frame)
        if label.shape != image.shape[:2]:
            raise rb.DatasetError(f"{self.label_path(frame)}: label size {label.shape} differs from the "
                                  f"image's {image.shape[:2]}")
        present = [CLASSES[v] for v in np.unique(label) if v < len(CLASSES)]
        # Official prompt: "a photo of a {c1,c2,...,} the urban street".
        caption = rb.caption_for(present, "a photo of {} in an urban street")
        return rb.make_example(image, caption, self.config, segmentation=label)
