"""grain input pipelines for the shapes world.

One pipeline serves both sources, with the same feature keys and shapes, so training code never
knows where its data came from:
- a prepared TFDS dataset (``ShapesWorld(...).as_data_source(split)``, ArrayRecord), and
- the procedural generator itself (``shapes.make_split(...)``), an effectively infinite corpus for
  pretraining the diffusion model.

Batches are dicts of numpy arrays:
``image`` float32 (B,H,W,3) in [-1, 1]; ``caption`` str (B,); ``segmentation`` uint8 (B,H,W);
``depth`` float32 (B,H,W); ``instance_map`` uint8 (B,H,W); ``instances`` bool (B,M,H,W) and
``instance_classes`` int32 (B,M), padded to M = max_objects with empty masks / class 0;
``num_instances`` int32 (B,); ``keypoints`` float32 (B,M,17,3) padded with zeros (visibility 0);
``num_persons`` int32 (B,); with ``with_index=True`` also ``index`` int32 (B,), each example's
position in the source (what a per-example cache, e.g. the trainer's feature bank, is keyed by).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from datasetdm_jax.data import shapes

FEATURE_KEYS: tuple[str, ...] = (
    "image", "caption", "segmentation", "depth", "instance_map", "instances", "instance_classes",
    "num_instances", "keypoints", "num_persons",
)


def standardize(example: Mapping[str, Any], max_objects: int = 3) -> dict[str, np.ndarray | str]:
    """One example (render_scene dict or TFDS record) as fixed-shape arrays; image to [-1, 1]."""
    image = np.asarray(example["image"], np.float32) / 127.5 - 1.0
    caption = example["caption"]
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    if "instance_map" in example:
        instance_map = np.asarray(example["instance_map"], np.uint8)
    else:  # disjoint visible masks -> id map
        masks = np.asarray(example["instances"], bool)
        instance_map = (masks * np.arange(1, len(masks) + 1)[:, None, None]).sum(0).astype(np.uint8)
    classes = np.asarray(example["instance_classes"], np.int32)
    n = len(classes)
    if n > max_objects:
        raise ValueError(f"example has {n} instances, more than max_objects={max_objects}")
    h, w = instance_map.shape
    instances = instance_map[None] == np.arange(1, max_objects + 1, dtype=np.uint8)[:, None, None]
    kp = np.asarray(example["keypoints"], np.float32).reshape(-1, len(shapes.KEYPOINT_NAMES), 3)
    keypoints = np.zeros((max_objects, len(shapes.KEYPOINT_NAMES), 3), np.float32)
    keypoints[: len(kp)] = kp
    return {
        "image": image,
        "caption": caption,
        "segmentation": np.asarray(example["segmentation"], np.uint8).reshape(h, w),
        "depth": np.asarray(example["depth"], np.float32).reshape(h, w),
        "instance_map": instance_map,
        "instances": instances,
        "instance_classes": np.pad(classes, (0, max_objects - n)),
        "num_instances": np.int32(n),
        "keypoints": keypoints,
        "num_persons": np.int32(len(kp)),
        **({"index": np.int32(example[_SOURCE_INDEX])} if _SOURCE_INDEX in example else {}),
    }


# Not "index": TFDS shapes records carry their own (their position in the split, not in a subset).
_SOURCE_INDEX = "_source_index"


@dataclasses.dataclass(frozen=True)
class _WithIndex:
    """Adds the source position; grain hands epoch-offset indices (i + epoch * len) to a source
    that is shuffled per epoch, hence the modulo."""

    size: int

    def __call__(self, i: int, example: Mapping[str, Any]) -> dict[str, Any]:
        return {**example, _SOURCE_INDEX: i % self.size}


@dataclasses.dataclass(frozen=True)
class _Standardize:
    """Picklable map function, so grain worker processes can run it."""

    max_objects: int

    def __call__(self, example):
        return standardize(example, self.max_objects)


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def grain_dataset(source: Sequence[Mapping[str, Any]], batch_size: int, shuffle_seed: int | None = 0, *,
                  num_epochs: int | None = 1, max_objects: int | None = None,
                  drop_remainder: bool = True, shard_index: int = 0, shard_count: int = 1,
                  worker_count: int = 0, read_threads: int = 2,
                  prefetch_batches: int = 4, with_index: bool = False) -> grain.IterDataset:
    """Batched, optionally shuffled (reshuffled each epoch) grain dataset over a random-access source.

    ``source``: a TFDS data source or a ``shapes.ShapesSource``. ``num_epochs=None`` repeats
    forever. ``shard_index``/``shard_count`` split the records between hosts. ``worker_count > 0``
    renders/decodes in that many processes (needs absl flags parsed; keep 0 in tests).
    ``read_threads``/``prefetch_batches`` bound grain's read-ahead (its defaults, 16 threads and
    500 elements, would render hundreds of batches ahead on a small CPU). ``with_index`` adds each
    example's source position as ``index``.
    """
    if max_objects is None:
        max_objects = getattr(getattr(source, "config", None), "max_objects", 3)
    ds = grain.MapDataset.source(source)
    if with_index:
        ds = ds.map_with_index(_WithIndex(len(source)))
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(_Standardize(max_objects))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=_collate)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=prefetch_batches))
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


def procedural_dataset(split: str, batch_size: int, seed: int = 0, *,
                       config: shapes.ShapesConfig | None = None, num: int = 2**31 - 1,
                       **kwargs: Any) -> grain.IterDataset:
    """grain dataset straight from the generator (default: ~2e9 distinct scenes, one pass)."""
    return grain_dataset(shapes.make_split(split, num, seed, config), batch_size, **kwargs)
