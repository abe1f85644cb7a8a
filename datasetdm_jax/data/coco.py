"""COCO 2017 instances and person keypoints, read with pycocotools (the paper's few-shot setting).

Layout (``root`` = the COCO folder)::

    <split>/<file_name>                         # split = train2017 | val2017
    annotations/instances_<split>.json          # task 'instance'
    annotations/person_keypoints_<split>.json   # task 'pose'

Classes are the file's categories in ascending id order, as contiguous ids 1..K (0 = background;
K = 80 for COCO), so instances are class-aware (the official code makes every label
1). Instance masks come from polygons or RLE (``annToMask``); an image's instances are painted
largest first, so the instance map shows small objects in front; crowd regions are 255 (ignore)
in the semantic map and are not instances. Keypoints are the 17 COCO joints with visibility
(0 not labelled, 1 hidden, 2 visible), shifted by +0.5 into continuous pixel coordinates.

Few-shot selection (the official rule): task 'instance' walks the categories in id order and
takes, per category, the first ``per_class`` (5) images in file order that hold a non-crowd
instance of it larger than ``min_area`` (10000) pixels and were not taken yet: 80 x 5 = 400. Task
'pose' takes the first ``num_images`` (801) images in file order that hold a person with labelled
keypoints (whole images; the official top-down per-person crops are not made here).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any

import numpy as np

from datasetdm_jax.data import real_base as rb

TASKS = ("instance", "pose")


def _load_coco(path: str):
    """pycocotools COCO index of ``path``; missing or malformed files are one-line errors."""
    from pycocotools.coco import COCO

    rb.require_file(path, "COCO annotation file")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            return COCO(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise rb.DatasetError(f"{path}: not valid JSON ({e})") from None
    except (KeyError, TypeError, AssertionError) as e:
        raise rb.DatasetError(f"{path}: not a COCO annotation file ({type(e).__name__}: {e})") from None


class COCOSource(rb.RealSource):
    """COCO instance segmentation (class-aware) or person keypoints, one whole image per item."""

    def __init__(self, root: str, split: str = "train2017", task: str = "instance",
                 config: rb.SourceConfig | None = None, *, per_class: int | None = None,
                 min_area: float = 10000.0, num_images: int | None = None, min_instance_area: float = 0.0):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.root, self.split, self.task = root, split, task
        self.min_instance_area = float(min_instance_area)
        name = "instances" if task == "instance" else "person_keypoints"
        self.ann_path = os.path.join(root, "annotations", f"{name}_{split}.json")
        rb.require_dir(os.path.join(root, split), "COCO image")
        self.coco = _load_coco(self.ann_path)
        cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_class = {c: k + 1 for k, c in enumerate(cat_ids)}
        self.classes = ("background",) + tuple(self.coco.cats[c]["name"] for c in cat_ids)
        if task == "pose" and "person" not in self.classes:
            raise rb.DatasetError(f"{self.ann_path}: no 'person' category")
        img_ids = list(self.coco.imgs)  # file order
        if task == "instance" and per_class is not None:
            img_ids = self._select_instance(img_ids, cat_ids, per_class, min_area)
        elif task == "pose":
            img_ids = [i for i in img_ids if any(a.get("num_keypoints", 0) > 0 for a in self._anns(i))]
            if num_images is not None:
                img_ids = img_ids[:num_images]
        super().__init__(config, img_ids)

    def _anns(self, img_id: int) -> list[dict]:
        return self.coco.imgToAnns.get(img_id, [])

    def _select_instance(self, img_ids: list[int], cat_ids: list[int], per_class: int, min_area: float) -> list[int]:
        taken: set[int] = set()
        out: list[int] = []
        for c in cat_ids:
            n = 0
            for i in img_ids:
                if n >= per_class:
                    break
                if i not in taken and any(a["category_id"] == c and not a.get("iscrowd", 0)
                                          and a.get("area", 0) > min_area for a in self._anns(i)):
                    taken.add(i)
                    out.append(i)
                    n += 1
        return out

    def _bad(self, ann: dict, what: str) -> rb.DatasetError:
        return rb.DatasetError(f"{self.ann_path}: annotation id {ann.get('id')} (image {ann.get('image_id')}): {what}")

    def _keypoints(self, ann: dict) -> np.ndarray:
        kp = np.asarray(ann.get("keypoints", []), np.float32)
        if kp.size != rb.NUM_KEYPOINTS * 3:
            raise self._bad(ann, f"has {kp.size} keypoint values, expected {rb.NUM_KEYPOINTS * 3}")
        kp = kp.reshape(rb.NUM_KEYPOINTS, 3)
        if not np.isin(kp[:, 2], (0, 1, 2)).all():
            raise self._bad(ann, f"keypoint visibility {np.unique(kp[:, 2]).tolist()} not in 0, 1, 2")
        kp[:, :2] = np.where(kp[:, 2:] > 0, kp[:, :2] + 0.5, 0.0)
        return kp

    def load(self, img_id: int) -> dict[str, Any]:
        info = self.coco.imgs[img_id]
        path = os.path.join(self.root, self.split, info["file_name"])
        image = rb.read_image(path)
        h, w = image.shape[:2]
        if (info.get("height", h), info.get("width", w)) != (h, w):
            raise rb.DatasetError(f"{path}: image is {h}x{w} but {self.ann_path} says "
                                  f"{info.get('height')}x{info.get('width')}")
        anns = sorted(self._anns(img_id), key=lambda a: -float(a.get("area", 0)))
        seg = np.zeros((h, w), np.uint8)
        imap = np.zeros((h, w), np.int64)
        classes, persons = [], []
        for a in anns:
            if a["category_id"] not in self.cat_to_class:
                raise self._bad(a, f"unknown category_id {a['category_id']}")
            if not a.get("segmentation"):
                if self.task == "pose" and a.get("num_keypoints", 0) > 0:
                    persons.append(self._keypoints(a))
                continue
            try:
                m = self.coco.annToMask(a).astype(bool)
            except Exception as e:  # noqa: BLE001 - pycocotools raises assorted types on bad polygons/RLE
                raise self._bad(a, f"bad segmentation ({type(e).__name__}: {e})") from None
            if a.get("iscrowd", 0):
                seg[m & (imap == 0)] = rb.IGNORE
                continue
            if self.task == "pose":
                if a.get("num_keypoints", 0) <= 0:
                    seg[m] = rb.IGNORE  # unlabelled person: neither background nor a labelled person
                    continue
                persons.append(self._keypoints(a))
            elif float(a.get("area", 0)) < self.min_instance_area:
                continue
            k = self.cat_to_class[a["category_id"]]
            seg[m] = k
            imap[m] = len(classes) + 1
            classes.append(k)
        names = [self.classes[k] for k in classes]
        if self.task == "pose":
            caption = "a photo of a person"  # the official pose prompt
            kp = np.stack(persons) if persons else None
        else:
            caption, kp = rb.caption_for(names), None
        # Painted largest first, so ids are in decreasing area: max_objects keeps the largest.
        return rb.make_example(image, caption, self.config, segmentation=seg, instance_map=imap,
                               instance_classes=classes, keypoints=kp)
