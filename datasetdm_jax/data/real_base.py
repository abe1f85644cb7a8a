"""Shared pieces of the real-dataset sources (VOC, Cityscapes, COCO, NYU).

Every source is a grain random-access data source (``__len__``/``__getitem__``, picklable) whose
items have the keys and dtypes of ``shapes.render_scene``, so ``pipeline.grain_dataset`` and the
trainer consume them unchanged: ``image`` uint8 (S,S,3); ``caption`` str; ``segmentation`` uint8
(S,S) class ids, 255 = ignore (all 255 when the dataset has no semantic labels); ``instance_map``
uint8 (S,S), 0 = none, k+1 = instance k; ``instances`` bool (N,S,S); ``instance_classes`` int32
(N,); ``depth`` float32 (S,S) metres, 0 = no depth; ``keypoints`` float32 (P,17,3) x, y,
visibility in continuous pixel coordinates (pixel centre at j + 0.5).

Resizing to S x S (``SourceConfig.resize``): 'crop' scales the short side to S and takes the
centre S x S window (keeps the aspect ratio); 'stretch' scales both sides to S. Images are resized
bilinearly, label maps and depth with nearest neighbour (no invented classes or depths).
Bad input (missing or corrupt file, label out of range) raises ``DatasetError`` with one line
naming the file.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IGNORE = 255
NUM_KEYPOINTS = 17


class DatasetError(ValueError):
    """Bad dataset input; the message is one line and names the file."""


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Output geometry of a real source; ``max_objects`` also sizes the pipeline's padded instances."""

    image_size: int = 512
    resize: str = "crop"
    max_objects: int = 20

    def __post_init__(self):
        if self.resize not in ("crop", "stretch"):
            raise ValueError(f"resize must be 'crop' or 'stretch', got {self.resize!r}")
        if self.image_size < 1 or self.max_objects < 1:
            raise ValueError(f"image_size and max_objects must be positive, got {self}")


# -- files -----------------------------------------------------------------------------------------

def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: missing {what}")
    return path


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: missing {what} directory")
    return path


def _open(path: str, what: str) -> Image.Image:
    require_file(path, what)
    try:
        im = Image.open(path)
        im.load()  # decode now: truncated or corrupt files fail here, not later in a worker
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: corrupt or unreadable {what} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    return im


def read_image(path: str) -> np.ndarray:
    """RGB uint8 (H,W,3) from any PIL-readable file."""
    return np.asarray(_open(path, "image").convert("RGB"), np.uint8)


def read_index_png(path: str, what: str = "label PNG") -> np.ndarray:
    """Single-channel label map: palette PNGs give their indices, grey PNGs their values."""
    im = _open(path, what)
    if im.mode not in ("P", "L", "I", "I;16"):
        raise DatasetError(f"{path}: {what} has mode {im.mode}; expected a single-channel index PNG "
                           "(palette or greyscale)")
    return np.asarray(im)


def read_depth_png(path: str, scale: float = 1000.0) -> np.ndarray:
    """16-bit depth PNG (value / ``scale`` = metres; 0 = no depth) -> float32 metres."""
    im = _open(path, "depth PNG")
    if im.mode not in ("I;16", "I;16B", "I"):
        raise DatasetError(f"{path}: depth PNG has mode {im.mode}; expected 16-bit greyscale in millimetres")
    return np.asarray(im, np.float32) / scale


def check_labels(labels: np.ndarray, path: str, num_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """Refuse values outside 0..num_classes-1 and ``ignore``; return as uint8."""
    bad_mask = (labels < 0) | ((labels >= num_classes) & (labels != ignore))
    if bad_mask.any():
        bad = np.unique(labels[bad_mask])
        raise DatasetError(f"{path}: label values {bad[:8].tolist()} out of range (expected "
                           f"0..{num_classes - 1} or {ignore})")
    return labels.astype(np.uint8)


# -- geometry --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Fit:
    """Scale (h, w) to (new_h, new_w), then take the size x size window at (y0, x0)."""

    h: int
    w: int
    new_h: int
    new_w: int
    y0: int
    x0: int
    size: int


def fit(h: int, w: int, config: SourceConfig) -> Fit:
    s = config.image_size
    if config.resize == "stretch":
        return Fit(h, w, s, s, 0, 0, s)
    k = s / min(h, w)
    nh, nw = max(s, round(h * k)), max(s, round(w * k))
    return Fit(h, w, nh, nw, (nh - s) // 2, (nw - s) // 2, s)


def resize_image(image: np.ndarray, g: Fit) -> np.ndarray:
    """Bilinear (PIL, antialiased when shrinking), then crop."""
    out = np.asarray(Image.fromarray(image).resize((g.new_w, g.new_h), Image.BILINEAR))
    return out[g.y0:g.y0 + g.size, g.x0:g.x0 + g.size]


def resize_nearest(arr: np.ndarray, g: Fit) -> np.ndarray:
    """Nearest neighbour on the first two axes (label maps, depth), then crop."""
    rows = np.minimum(((np.arange(g.y0, g.y0 + g.size) + 0.5) * g.h / g.new_h).astype(np.int64), g.h - 1)
    cols = np.minimum(((np.arange(g.x0, g.x0 + g.size) + 0.5) * g.w / g.new_w).astype(np.int64), g.w - 1)
    return arr[rows[:, None], cols[None, :]]


def transform_keypoints(kp: np.ndarray, g: Fit) -> np.ndarray:
    """(P,17,3) continuous coordinates -> output coordinates; points that leave the window get 0,0,0."""
    kp = np.asarray(kp, np.float32).reshape(-1, NUM_KEYPOINTS, 3).copy()
    kp[..., 0] = kp[..., 0] * (g.new_w / g.w) - g.x0
    kp[..., 1] = kp[..., 1] * (g.new_h / g.h) - g.y0
    inside = ((kp[..., 0] >= 0) & (kp[..., 0] < g.size) & (kp[..., 1] >= 0) & (kp[..., 1] < g.size)
              & (kp[..., 2] > 0))
    kp[~inside] = 0.0
    return kp


# -- examples --------------------------------------------------------------------------------------

def article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def caption_for(names: Sequence[str], template: str = "a photo of {}") -> str:
    """'a photo of a dog, a cat and a person' from class names (duplicates dropped, order kept)."""
    names = list(dict.fromkeys(names))
    if not names:
        return template.format("a scene").strip()
    words = [article(n) for n in names]
    text = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return template.format(text)


def make_example(image: np.ndarray, caption: str, config: SourceConfig, *,
                 segmentation: np.ndarray | None = None, instance_map: np.ndarray | None = None,
                 instance_classes: Sequence[int] = (), depth: np.ndarray | None = None,
                 keypoints: np.ndarray | None = None) -> dict[str, Any]:
    """Resize a native-resolution example to the config's square and fill absent labels.

    ``instance_map`` (H,W) int with ids 1..N for ``instance_classes``; instances cut away by the
    crop are dropped and the rest renumbered; at most ``config.max_objects`` are kept (the first
    ones, so order them by priority). At most ``max_objects`` persons' keypoints are kept.
    """
    h, w = image.shape[:2]
    g = fit(h, w, config)
    s = config.image_size
    out_image = resize_image(image, g)
    seg = (np.full((s, s), IGNORE, np.uint8) if segmentation is None
           else resize_nearest(np.asarray(segmentation, np.uint8), g))
    dep = np.zeros((s, s), np.float32) if depth is None else resize_nearest(np.asarray(depth, np.float32), g)
    classes = np.asarray(instance_classes, np.int32)
    if instance_map is None:
        imap, kept = np.zeros((s, s), np.int64), []
    else:
        imap = resize_nearest(np.asarray(instance_map), g).astype(np.int64)
        present = set(np.unique(imap).tolist())
        kept = [k for k in range(1, len(classes) + 1) if k in present][: config.max_objects]
    lut = np.zeros(max(len(classes), int(imap.max(initial=0))) + 1, np.uint8)
    lut[kept] = np.arange(1, len(kept) + 1)
    new_map = lut[imap]
    kp = (np.zeros((0, NUM_KEYPOINTS, 3), np.float32) if keypoints is None
          else transform_keypoints(keypoints, g)[: config.max_objects])
    return {
        "image": out_image,
        "caption": caption,
        "segmentation": seg,
        "instance_map": new_map,
        "instances": new_map[None] == np.arange(1, len(kept) + 1, dtype=np.uint8)[:, None, None],
        "instance_classes": classes[np.asarray(kept, np.int64) - 1] if kept else np.zeros((0,), np.int32),
        "depth": dep,
        "keypoints": kp,
    }


def select_per_class(class_counts: Iterable[Mapping[int, int]], per_class: int, min_pixels: int,
                     max_total: int | None = None) -> list[int]:
    """The official few-shot selection: walk the items in order; an item is
    taken for the first class (ascending id) that covers more than ``min_pixels`` and still has
    fewer than ``per_class`` items. Returns the taken item positions."""
    taken: dict[int, int] = {}
    out: list[int] = []
    for i, counts in enumerate(class_counts):
        for c in sorted(counts):
            if counts[c] > min_pixels and taken.get(c, 0) < per_class:
                taken[c] = taken.get(c, 0) + 1
                out.append(i)
                break
        if max_total is not None and len(out) >= max_total:
            break
    return out


class RealSource:
    """Base: random access over ``len(self.items)`` records; subclasses implement ``load(item)``."""

    classes: tuple[str, ...] = ()

    def __init__(self, config: SourceConfig | None, items: Sequence[Any]):
        self.config = config or SourceConfig()
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < len(self.items):
            raise IndexError(i)
        return self.load(self.items[i])

    def load(self, item: Any) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} items, {self.config})"
