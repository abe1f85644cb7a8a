"""NYU Depth v2, labelled subset: 1449 frames, 795 train / 654 test (the paper's few-shot setting).

Two on-disk forms are accepted (``root`` is the folder, or the ``.mat`` file itself):

1. The official ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, i.e. HDF5, read with h5py) with the
   official split file ``splits.mat`` beside it (``trainNdxs`` 795, ``testNdxs`` 654, 1-based
   frame numbers; both files come from the NYU Depth v2 site, and this 795/654 split is the one
   all NYU depth papers use). ``images`` are RGB uint8, ``depths`` float32 metres (filled), and
   ``sceneTypes`` names the room for the caption.
2. An extracted folder in the layout of the widely used ``official_splits`` export (BTS / the
   Monocular-Depth-Estimation-Toolbox): ``<split>/<scene>/rgb_<n>.jpg|png`` with a 16-bit depth
   PNG in millimetres beside it, ``sync_depth_<n>.png`` or ``depth_<n>.png``; ``split`` is
   ``train`` (795) or ``test`` (654). 0 = no depth.

Depth is resized with nearest neighbour and kept in metres (the official code feeds [0, 1] images
and saves 8-bit depth; here images go to [-1, 1] in the pipeline and depth stays float).
The official few-shot set is 250 random train frames from a list not reproducible here; set
``num_images`` to take a seeded random subset of that size.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import numpy as np

from datasetdm_jax.data import real_base as rb

MAT_NAME = "nyu_depth_v2_labeled.mat"
SPLITS_NAME = "splits.mat"
SPLIT_KEYS = {"train": "trainNdxs", "test": "testNdxs"}
MAX_DEPTH = 10.0  # metres; the official depth head is sigmoid x 10 for NYU
_RGB = re.compile(r"^rgb_(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)


def scene_words(name: str) -> str:
    """'living_room_0001a' / 'living_room' -> 'living room'."""
    return re.sub(r"[_\s]+", " ", re.sub(r"[_\d]+[a-z]?$", "", name) or name).strip()


def read_split_indices(path: str, split: str) -> np.ndarray:
    """0-based frame indices of ``split`` from the official ``splits.mat``."""
    import scipy.io

    rb.require_file(path, f"NYU split file (the official {SPLITS_NAME}: trainNdxs / testNdxs)")
    try:
        m = scipy.io.loadmat(path)
    except Exception as e:  # noqa: BLE001 - scipy raises several types on bad files
        raise rb.DatasetError(f"{path}: unreadable split file ({type(e).__name__}: {e})") from None
    key = SPLIT_KEYS[split]
    if key not in m:
        raise rb.DatasetError(f"{path}: no '{key}' array")
    return np.asarray(m[key]).ravel().astype(np.int64) - 1


class NYUDepthSource(rb.RealSource):
    """NYU Depth v2 labelled frames with metric depth, from the .mat file or an extracted folder."""

    classes = ()

    def __init__(self, root: str, split: str = "train", config: rb.SourceConfig | None = None, *,
                 num_images: int | None = None, select_seed: int = 0):
        if split not in SPLIT_KEYS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.mat_path = root if root.endswith(".mat") else os.path.join(root, MAT_NAME)
        self._h5 = None
        if os.path.isfile(self.mat_path):
            items = self._mat_items()
        elif root.endswith(".mat"):
            raise rb.DatasetError(f"{root}: missing NYU labelled .mat file")
        else:
            self.mat_path = None
            items = self._folder_items(root)
        if num_images is not None and num_images < len(items):
            pick = np.sort(np.random.default_rng(select_seed).choice(len(items), num_images, replace=False))
            items = [items[k] for k in pick]
        super().__init__(config, items)

    # -- .mat (HDF5) ----------------------------------------------------------------------------
    def _file(self):
        if self._h5 is None:
            try:
                import h5py
            except ImportError:
                raise rb.DatasetError(f"{self.mat_path}: reading MATLAB v7.3 files needs h5py "
                                      "(pip install h5py)") from None
            try:
                self._h5 = h5py.File(self.mat_path, "r")
            except OSError as e:
                raise rb.DatasetError(f"{self.mat_path}: not a MATLAB v7.3 (HDF5) file ({e})") from None
            for key in ("images", "depths"):
                if key not in self._h5:
                    raise rb.DatasetError(f"{self.mat_path}: no '{key}' dataset")
        return self._h5

    def _mat_items(self) -> list[int]:
        idx = read_split_indices(os.path.join(os.path.dirname(self.mat_path), SPLITS_NAME), self.split)
        n = self._file()["images"].shape[0]
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise rb.DatasetError(f"{os.path.join(os.path.dirname(self.mat_path), SPLITS_NAME)}: frame numbers "
                                  f"outside 1..{n}")
        return idx.tolist()

    def _scene(self, f, i: int) -> str | None:
        if "sceneTypes" not in f:
            return None
        chars = np.asarray(f[f["sceneTypes"][0, i]]).ravel()
        return scene_words("".join(chr(int(c)) for c in chars))

    def _load_mat(self, i: int) -> tuple[np.ndarray, np.ndarray, str | None, str]:
        f = self._file()
        where = f"{self.mat_path} frame {i + 1}"
        # MATLAB is column-major: HDF5 holds images as (N, 3, W, H) and depths as (N, W, H).
        image = np.asarray(f["images"][i]).transpose(2, 1, 0)
        depth = np.asarray(f["depths"][i], np.float32).T
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or depth.shape != image.shape[:2]:
            raise rb.DatasetError(f"{where}: expected uint8 (3, W, H) images and (W, H) depths, got "
                                  f"{image.dtype} {image.shape[::-1]} and {depth.shape[::-1]}")
        return image, depth, self._scene(f, i), where

    # -- extracted folder -----------------------------------------------------------------------
    def _folder_items(self, root: str) -> list[tuple[str, str]]:
        split_dir = rb.require_dir(os.path.join(root, self.split),
                                   f"NYU (no {MAT_NAME} either) {self.split}")
        items = []
        for rgb in sorted(glob.glob(os.path.join(split_dir, "**", "rgb_*"), recursive=True)):
            m = _RGB.match(os.path.basename(rgb))
            if not m:
                continue
            folder = os.path.dirname(rgb)
            cands = [os.path.join(folder, f"{p}depth_{m.group(1)}.png") for p in ("sync_", "")]
            depth = next((c for c in cands if os.path.isfile(c)), None)
            if depth is None:
                raise rb.DatasetError(f"{cands[0]}: missing depth PNG for {rgb}")
            items.append((rgb, depth))
        if not items:
            raise rb.DatasetError(f"{split_dir}: no <scene>/rgb_<n>.jpg|png frames")
        return items

    # -- items ----------------------------------------------------------------------------------
    def load(self, item: Any) -> dict[str, Any]:
        if self.mat_path is not None:
            image, depth, scene, where = self._load_mat(int(item))
        else:
            rgb, where = item
            image, depth = rb.read_image(rgb), rb.read_depth_png(where)
            scene = scene_words(os.path.basename(os.path.dirname(rgb)))
            if depth.shape != image.shape[:2]:
                raise rb.DatasetError(f"{where}: depth size {depth.shape} differs from the image's {image.shape[:2]}")
        if not np.isfinite(depth).all() or (depth < 0).any():
            raise rb.DatasetError(f"{where}: depth has NaN, inf or negative values")
        # Official prompt: "a photo of " (empty); the room type is named here when known.
        caption = f"a photo of {rb.article(scene)}" if scene else "a photo of a room"
        return rb.make_example(image, caption, self.config, depth=depth)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_h5"] = None  # reopened lazily in each worker process
        return state
