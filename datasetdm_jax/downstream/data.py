"""Downstream training data: labelled examples as in-memory arrays, mixed from several sources.

The common currency is an *arrays dict*: ``image`` uint8 (N, H, W, 3), and the labels a task needs,
``segmentation`` uint8/int (N, H, W) class ids with 255 = ignore, ``depth`` float32 (N, H, W) with
0 = invalid. Every source (shapes-world splits, generated records, real datasets) is turned into
one, so training never knows where its data came from.

``MixedBatches`` draws each batch from several sources with a fixed per-batch count per source
(e.g. half real, half synthetic), reshuffling each source every epoch, and augments on the host
(flip, scale, crop). Everything is seeded, so a run is reproducible.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from PIL import Image

__all__ = ["ArraySource", "IterSource", "Augment", "MixedBatches", "batch_counts", "validate_arrays",
           "shapes_arrays", "records_arrays", "real_arrays", "stack_examples", "take", "concat"]

IGNORE = 255
LABEL_KEYS = ("segmentation", "depth")


def validate_arrays(arrays: Mapping[str, np.ndarray], name: str, task: str | None = None) -> dict[str, np.ndarray]:
    """Check shapes/dtypes of an arrays dict; one-line errors name the source and key."""
    if "image" not in arrays:
        raise ValueError(f"{name}: no 'image' array")
    image = np.asarray(arrays["image"])
    if image.ndim != 4 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name}: 'image' must be uint8 (N, H, W, 3), got {image.dtype} {image.shape}")
    out = {"image": image}
    for k in LABEL_KEYS:
        if k in arrays:
            a = np.asarray(arrays[k])
            if a.shape != image.shape[:3]:
                raise ValueError(f"{name}: '{k}' must have shape {image.shape[:3]}, got {a.shape}")
            out[k] = a.astype(np.float32) if k == "depth" else a
    if task is not None:
        key = {"semantic": "segmentation", "depth": "depth"}[task]
        if key not in out:
            raise ValueError(f"{name}: task {task!r} needs a '{key}' array, has {sorted(out)}")
    if len(image) == 0:
        raise ValueError(f"{name}: no examples")
    return out


def take(arrays: Mapping[str, np.ndarray], num: int | None) -> dict[str, np.ndarray]:
    """The first ``num`` examples (all when None)."""
    return {k: v[:num] for k, v in arrays.items()} if num else dict(arrays)


def concat(parts: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate arrays dicts on the keys they all have."""
    keys = set.intersection(*(set(p) for p in parts))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k in keys}


# ----------------------------------------------------------------------------------------------
# Sources


class ArraySource:
    """Random access over an arrays dict; ``draw(n)`` walks a fresh permutation each epoch."""

    def __init__(self, arrays: Mapping[str, np.ndarray], seed: int = 0, name: str = "source"):
        self.arrays = validate_arrays(arrays, name)
        self.name = name
        self._rng = np.random.default_rng(seed)
        self._perm, self._pos = self._rng.permutation(len(self)), 0

    def __len__(self) -> int:
        return len(self.arrays["image"])

    def draw(self, n: int) -> dict[str, np.ndarray]:
        idx = []
        while len(idx) < n:
            if self._pos == len(self._perm):
                self._perm, self._pos = self._rng.permutation(len(self)), 0
            k = min(n - len(idx), len(self._perm) - self._pos)
            idx.extend(self._perm[self._pos:self._pos + k])
            self._pos += k
        return {k: v[np.asarray(idx, np.int64)] for k, v in self.arrays.items()}


class IterSource:
    """A stream of example dicts (e.g. a record reader); restarted from ``make_iter()`` when exhausted."""

    def __init__(self, make_iter: Callable[[], Iterator[Mapping[str, Any]]], name: str = "stream"):
        self.name, self._make = name, make_iter
        self._it = make_iter()

    def _next(self) -> Mapping[str, Any]:
        try:
            return next(self._it)
        except StopIteration:
            self._it = self._make()
            try:
                return next(self._it)
            except StopIteration:
                raise ValueError(f"{self.name}: the stream is empty") from None

    def draw(self, n: int) -> dict[str, np.ndarray]:
        exs = [self._next() for _ in range(n)]
        keys = [k for k in ("image",) + LABEL_KEYS if k in exs[0]]
        return validate_arrays({k: np.stack([np.asarray(e[k]) for e in exs]) for k in keys}, self.name)


def batch_counts(weights: Mapping[str, float], batch_size: int) -> dict[str, int]:
    """Examples per batch for each source: ``batch_size`` split by ``weights`` (largest remainder),
    every source with a positive weight getting at least one."""
    w = {k: float(v) for k, v in weights.items() if float(v) > 0}
    if not w:
        raise ValueError(f"mixing weights must have a positive entry, got {dict(weights)}")
    if batch_size < len(w):
        raise ValueError(f"batch_size={batch_size} is smaller than the number of mixed sources ({len(w)})")
    total = sum(w.values())
    exact = {k: batch_size * v / total for k, v in w.items()}
    counts = {k: max(1, int(np.floor(e))) for k, e in exact.items()}
    order = sorted(w, key=lambda k: exact[k] - np.floor(exact[k]), reverse=True)
    i = 0
    while sum(counts.values()) < batch_size:
        counts[order[i % len(order)]] += 1
        i += 1
    while sum(counts.values()) > batch_size:
        k = max(counts, key=lambda k: counts[k] - exact[k])
        counts[k] -= 1
    return counts


# ----------------------------------------------------------------------------------------------
# Augmentation (host side, per example)


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random horizontal flip, scale in ``scale`` (labels nearest, depth divided by the scale: a
    zoomed-in scene looks nearer), then a random crop to ``crop`` (padding with ignore / invalid)."""

    crop: tuple[int, int]
    flip: bool = True
    scale: tuple[float, float] = (0.75, 1.5)
    scale_depth: bool = True

    def __call__(self, ex: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = ex["image"]
        h, w = image.shape[:2]
        out = dict(ex)
        if self.flip and rng.random() < 0.5:
            out = {k: v[:, ::-1] for k, v in out.items()}
        s = float(rng.uniform(*self.scale)) if self.scale[0] != 1.0 or self.scale[1] != 1.0 else 1.0
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        if (nh, nw) != (h, w):
            out["image"] = np.asarray(Image.fromarray(np.ascontiguousarray(out["image"])).resize(
                (nw, nh), Image.BILINEAR))
            if "segmentation" in out:
                out["segmentation"] = np.asarray(Image.fromarray(np.ascontiguousarray(
                    out["segmentation"].astype(np.uint8))).resize((nw, nh), Image.NEAREST))
            if "depth" in out:
                d = np.asarray(Image.fromarray(np.ascontiguousarray(out["depth"], np.float32), mode="F").resize(
                    (nw, nh), Image.NEAREST))
                out["depth"] = d / s if self.scale_depth else d
        ch, cw = self.crop
        fill = {"image": 0, "segmentation": IGNORE, "depth": 0.0}
        ph, pw = max(ch - nh, 0), max(cw - nw, 0)
        y0 = int(rng.integers(0, max(nh + ph - ch, 0) + 1))
        x0 = int(rng.integers(0, max(nw + pw - cw, 0) + 1))
        oy, ox = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
        res = {}
        for k, v in out.items():
            if ph or pw:
                pad = ((oy, ph - oy), (ox, pw - ox)) + ((0, 0),) * (v.ndim - 2)
                v = np.pad(v, pad, constant_values=fill[k])
            res[k] = np.ascontiguousarray(v[y0:y0 + ch, x0:x0 + cw])
        return res


def _prepare(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """uint8 images -> float32 [-1, 1]; labels -> int32 / float32 (device-ready)."""
    out = {"image": arrays["image"].astype(np.float32) / 127.5 - 1.0}
    if "segmentation" in arrays:
        out["segmentation"] = arrays["segmentation"].astype(np.int32)
    if "depth" in arrays:
        out["depth"] = arrays["depth"].astype(np.float32)
    return out


class MixedBatches:
    """Infinite iterator of training batches mixing ``sources`` by ``weights`` (per-batch counts).

    Each batch: ``image`` float32 (B, h, w, 3) in [-1, 1], the label keys all sources share, and
    ``source`` int32 (B,) = index of the source in ``names`` (for checks and per-source stats).
    """

    def __init__(self, sources: Mapping[str, ArraySource | IterSource], weights: Mapping[str, float],
                 batch_size: int, augment: Augment | None = None, seed: int = 0):
        unknown = [k for k in weights if k not in sources]
        if unknown:
            raise ValueError(f"mixing weights name unknown sources {unknown}; have {sorted(sources)}")
        self.counts = batch_counts(weights, int(batch_size))
        self.names = list(self.counts)
        self.sources = {k: sources[k] for k in self.names}
        self.augment = augment
        self._rng = np.random.default_rng(seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts, tags = [], []
        for i, name in enumerate(self.names):
            parts.append(self.sources[name].draw(self.counts[name]))
            tags.append(np.full(self.counts[name], i, np.int32))
        keys = set.intersection(*(set(p) for p in parts))
        batch = {k: [ex for p in parts for ex in p[k]] for k in parts[0] if k in keys}
        if self.augment is not None:
            n = len(batch["image"])
            exs = [self.augment({k: batch[k][j] for k in batch}, self._rng) for j in range(n)]
            batch = {k: [e[k] for e in exs] for k in batch}
        out = _prepare({k: np.stack(v) for k, v in batch.items()})
        out["source"] = np.concatenate(tags)
        return out


# ----------------------------------------------------------------------------------------------
# Loaders


def stack_examples(examples, name: str, progress: bool = True, total: int | None = None) -> dict[str, np.ndarray]:
    """Example dicts (shapes-world keys: image, segmentation, depth, ...) -> an arrays dict."""
    from tqdm.auto import tqdm

    cols: dict[str, list] = {}
    for ex in tqdm(examples, desc=name, total=total, disable=not progress, leave=False):
        for k in ("image",) + LABEL_KEYS:
            if k in ex:
                cols.setdefault(k, []).append(np.asarray(ex[k]))
    if not cols:
        raise ValueError(f"{name}: no examples")
    n = len(cols["image"])
    return validate_arrays({k: np.stack(v) for k, v in cols.items() if len(v) == n}, name)


def shapes_arrays(split: str, num: int, seed: int = 0, image_size: int = 64, progress: bool = True
                  ) -> dict[str, np.ndarray]:
    """Render ``num`` scenes of a shapes-world split ('train_labelled', 'test', 'test_shifted', ...)."""
    from datasetdm_jax.data import shapes

    src = shapes.make_split(split, int(num), int(seed), shapes.ShapesConfig(image_size=int(image_size)))
    return stack_examples((src[i] for i in range(len(src))), f"shapes {split}", progress, len(src))


def records_arrays(path: str, num: int | None = None, progress: bool = True, *, min_quality: float = 0.0,
                   counts: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """A generated dataset (``datasetdm_jax.data.records``: sharded TFRecord + manifest) as an arrays
    dict, the first ``num`` examples in index order (all when None).

    ``min_quality`` > 0 drops, among those ``num``, the examples whose stored annotation confidence
    (``image/quality``, see ``generate``) is below it, so a filtered and an unfiltered run draw from
    the same candidates. ``counts``, when given, receives ``read``, ``kept``, ``dropped``, ``min_quality``.
    """
    from datasetdm_jax.data import records

    q_min = float(min_quality or 0.0)
    tally = {"read": 0, "kept": 0, "dropped": 0, "min_quality": q_min}

    def head():
        for i, ex in enumerate(records.read_examples(path)):
            if num and i >= num:
                return
            tally["read"] += 1
            if q_min > 0:
                if ex.get("quality") is None:
                    raise ValueError(f"{path}: record {ex.get('index', i)} has no image/quality; "
                                     "min_quality needs records from `datasetdm generate` with a decoder labeller")
                if ex["quality"] < q_min:
                    tally["dropped"] += 1
                    continue
            tally["kept"] += 1
            yield ex

    try:
        return stack_examples(head(), f"records {path}", progress, num or None)
    except ValueError as e:
        if tally["read"] and tally["dropped"] == tally["read"]:
            raise ValueError(f"{path}: min_quality={q_min:g} drops all {tally['read']} records read") from e
        raise
    finally:
        if counts is not None:
            counts.update(tally)


def real_arrays(data: Mapping[str, Any], split: str | None = None, *, train: bool = True,
                num: int | None = None, progress: bool = True) -> dict[str, np.ndarray]:
    """A labelled split as an arrays dict, from a data config as ``datasetdm_jax.data.sources.build``
    reads it (``source`` 'shapes', 'voc', 'cityscapes', 'nyu', ...; ``root``, ``split``,
    ``image_size``, few-shot selection fields for training splits)."""
    src = load_real_source(data, split, train=train, num=num)
    name = f"{data.get('source', 'shapes')} {split or data['split']}"
    return stack_examples((src[i] for i in range(len(src))), name, progress, len(src))


def load_real_source(data: Mapping[str, Any], split: str | None, *, train: bool, num: int | None):
    """The hook to the dataset sources in ``datasetdm_jax/data/`` (shapes world and real datasets)."""
    try:
        from datasetdm_jax.data import sources
    except ImportError as e:
        raise ValueError(f"real datasets need datasetdm_jax.data.sources, which is not available ({e})") from None
    import ml_collections

    cfg = data if isinstance(data, ml_collections.ConfigDict) else ml_collections.ConfigDict(dict(data))
    return sources.build(cfg, split, train=train, num=num)
