"""Test helper: tiny fake copies of Cityscapes, COCO 2017 and NYU Depth v2 in their on-disk layouts
(VOC: fake_voc.py), for tests that run the paper-scale configs end to end."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from fake_voc import png, rgb


def write_fake_cityscapes(root: str, frames: int = 3, size: int = 16) -> str:
    """``leftImg8bit/train`` + ``gtFine/train`` (labelIds): road below, sky above, a car block."""
    for k in range(frames):
        lab = np.full((size, size), 23, np.uint8)   # sky
        lab[size // 2:] = 7                          # road
        lab[size // 2: size // 2 + 4, 2 + k: 8 + k] = 26  # car
        frame = f"aachen_{k:06d}_000019"
        png(os.path.join(root, "leftImg8bit", "train", "aachen", f"{frame}_leftImg8bit.png"), rgb(size, size, k))
        png(os.path.join(root, "gtFine", "train", "aachen", f"{frame}_gtFine_labelIds.png"), lab)
    return root


def _poly(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def write_fake_coco(root: str, split: str = "val2017", size: int = 24) -> str:
    """``<split>/*.jpg`` with ``annotations/instances_<split>.json`` (person, car, dog) and
    ``person_keypoints_<split>.json`` (one person with labelled joints per image)."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": size, "width": size} for i in (1, 2, 3)]
    for k, im in enumerate(images):
        Image.fromarray(rgb(size, size, 10 + k)).save(os.path.join(root, split, im["file_name"]))
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    anns, persons = [], []
    for k, im in enumerate(images):
        for j, (cat, box) in enumerate([(3, (0, 0, size, size // 2)), (18, (2, 14, 8, 8)), (1, (12, 12, 10, 11))]):
            x, y, w, h = box
            anns.append({"id": 10 * k + j + 1, "image_id": im["id"], "category_id": cat, "segmentation": _poly(*box),
                         "area": w * h, "iscrowd": 0, "bbox": list(box)})
        kp = [0] * 51
        kp[0:3], kp[15:18], kp[18:21] = [16, 13, 2], [14, 16, 2], [20, 16, 2]   # nose, shoulders
        persons.append({"id": 100 + k, "image_id": im["id"], "category_id": 1, "segmentation": _poly(12, 12, 10, 11),
                        "area": 110, "iscrowd": 0, "bbox": [12, 12, 10, 11], "keypoints": kp, "num_keypoints": 3})
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for name, a, c in (("instances", anns, cats), ("person_keypoints", persons, cats[:1])):
        with open(os.path.join(root, "annotations", f"{name}_{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": a, "categories": c}, f)
    return root


def write_fake_nyu(root: str, frames: int = 4, h: int = 12, w: int = 16) -> str:
    """The official ``nyu_depth_v2_labeled.mat`` (HDF5, column-major) + ``splits.mat``: frames 1, 3
    train, 2, 4 test."""
    import h5py
    import scipy.io

    from datasetdm_jax.data import nyu

    os.makedirs(root, exist_ok=True)
    ims = [rgb(h, w, 100 + i) for i in range(frames)]
    depths = [(np.arange(h * w, dtype=np.float32).reshape(h, w) + 1) / 50 + i for i in range(frames)]
    with h5py.File(os.path.join(root, nyu.MAT_NAME), "w") as f:
        f["images"] = np.stack([im.transpose(2, 1, 0) for im in ims])
        f["depths"] = np.stack([d.T for d in depths])
        refs = []
        for k in range(frames):
            name = ("kitchen", "bedroom")[k % 2]
            f[f"#refs#/{k}"] = np.array([[ord(ch)] for ch in name], np.uint16)
            refs.append(f[f"#refs#/{k}"].ref)
        f.create_dataset("sceneTypes", data=np.array([refs], dtype=h5py.ref_dtype))
    scipy.io.savemat(os.path.join(root, nyu.SPLITS_NAME), {"trainNdxs": np.array([[1], [3]]),
                                                          "testNdxs": np.array([[2], [4]])})
    return root
