"""Name -> random-access data source, so configs pick their data with ``data.source``.

``build(config.data, split, train=...)`` returns a grain-readable source whose items have the
shapes-world keys (see ``real_base``). ``data.source`` is one of ``shapes`` (default), ``voc``,
``cityscapes``, ``coco_instance``, ``coco_pose``, ``nyu``. The few-shot selection fields
(``per_class``, ``min_pixels``, ``num_images``, ...) apply to the training split only; evaluation
reads the whole split (capped by ``num`` when given). ``SOURCES`` (name -> ``Source``: how to build
it, its class names) is the one list of datasets; ``get_source`` looks one up. A shapes-world
``data.filter`` (``SCENE_FILTERS``) keeps only the scenes it accepts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import ml_collections

from datasetdm_jax.errors import UserError
from datasetdm_jax.data import real_base as rb


def _get(cfg: ml_collections.ConfigDict, key: str, default: Any = None) -> Any:
    return cfg[key] if key in cfg else default


class _Head:
    """The first ``n`` items of a source (eval caps), keeping its ``config`` for the pipeline."""

    def __init__(self, source: Any, n: int):
        self.source, self.n = source, min(int(n), len(source))
        self.config = getattr(source, "config", None)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= int(i) < self.n:
            raise IndexError(i)
        return self.source[int(i)]


class FilteredSource:
    """The first ``num`` examples of ``base`` for which ``keep(example)`` holds (found once, in order).

    Deterministic (a pure function of ``base``), random-access, so grain reads it like any source.
    """

    def __init__(self, base: Any, num: int, keep: Callable[[dict], bool], name: str = "filter"):
        self.base, self.name, self.indices, self._kept = base, name, [], []
        i = 0
        while len(self.indices) < num:
            if i >= len(base):
                raise ValueError(f"{name}: only {len(self.indices)} of {len(base)} examples qualify, {num} asked")
            example = base[i]
            if keep(example):
                self.indices.append(i)
                self._kept.append(example)  # small sets (labelled / eval images): keep, don't re-render
            i += 1
        self.config = getattr(base, "config", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self._kept[int(i)]


# name -> predicate on a rendered shapes-world scene; ``data.filter`` picks one ('' keeps all).
SCENE_FILTERS: dict[str, Callable[[dict], bool]] = {
    "one_person": lambda s: len(s["keypoints"]) == 1,
    "has_person": lambda s: len(s["keypoints"]) >= 1,
}


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset: ``build(data, split, few, num, seed)`` -> its random-access source (``few(key,
    default)`` reads a few-shot selection field, or gives the default outside the training split);
    ``classes()`` -> its class names, or None when they are read from a built source (COCO).
    ``renders``: the source is made ``num`` items long (the shapes world); else it is cut to ``num``."""

    build: Callable[..., Any]
    classes: Callable[[], Sequence[str]] | None
    renders: bool = False


def _shapes(data, split, few, num, seed):
    from datasetdm_jax.data import shapes
    cfg = shapes.ShapesConfig(image_size=int(data.image_size))
    name = str(_get(data, "filter", "") or "")
    if not name:
        return shapes.make_split(split, num, seed, cfg)
    if name not in SCENE_FILTERS:
        raise ValueError(f"data.filter={name!r} is not one of {sorted(SCENE_FILTERS)}")
    return FilteredSource(shapes.make_split(split, 2**31 - 1, seed, cfg), num, SCENE_FILTERS[name], name)


def _source_config(data) -> rb.SourceConfig:
    return rb.SourceConfig(image_size=int(data.image_size), resize=str(_get(data, "resize", "crop")),
                           max_objects=int(_get(data, "max_objects", 20)))


def _voc(data, split, few, num, seed):
    from datasetdm_jax.data.voc import VOCSource
    return VOCSource(str(data.root), split, _source_config(data), per_class=few("per_class"),
                     min_pixels=int(_get(data, "min_pixels", 18000)))


def _cityscapes(data, split, few, num, seed):
    from datasetdm_jax.data.cityscapes import CityscapesSource
    return CityscapesSource(str(data.root), split, _source_config(data),
                            label_kind=str(_get(data, "label_kind", "labelIds")),
                            per_class=few("per_class"), min_pixels=int(_get(data, "min_pixels", 10000)))


def _coco(kind: str):
    def build(data, split, few, num, seed):
        from datasetdm_jax.data.coco import COCOSource
        return COCOSource(str(data.root), split, kind, _source_config(data), per_class=few("per_class"),
                          min_area=float(_get(data, "min_area", 10000.0)), num_images=few("num_images"),
                          min_instance_area=float(few("min_instance_area", 0.0)))
    return build


def _nyu(data, split, few, num, seed):
    from datasetdm_jax.data.nyu import NYUDepthSource
    return NYUDepthSource(str(data.root), split, _source_config(data), num_images=few("num_images"),
                          select_seed=int(_get(data, "seed", 0)))


def _classes_of(module: str) -> Callable[[], Sequence[str]]:
    def classes():
        import importlib
        return importlib.import_module(f"datasetdm_jax.data.{module}").CLASSES
    return classes


# data.source -> the dataset; the only list of them.
SOURCES: dict[str, Source] = {
    "shapes": Source(_shapes, _classes_of("shapes"), renders=True),
    "voc": Source(_voc, _classes_of("voc")),
    "cityscapes": Source(_cityscapes, _classes_of("cityscapes")),
    "coco_instance": Source(_coco("instance"), None),
    "coco_pose": Source(_coco("pose"), None),
    "nyu": Source(_nyu, lambda: ()),
}


def get_source(name: str) -> Source:
    """The dataset ``data.source`` names; a one-line error listing the known ones otherwise."""
    if name not in SOURCES:
        raise ValueError(f"data.source must be one of {tuple(SOURCES)}, got {name!r}")
    return SOURCES[name]


def build(data: ml_collections.ConfigDict, split: str | None = None, *, train: bool = True,
          num: int | None = None, seed: int | None = None) -> Any:
    """The source named by ``data.source`` for ``split`` (default ``data.split``); ``num`` caps it
    (the shapes world renders ``num``, default ``data.num_images``, from ``seed``, default
    ``data.seed``)."""
    entry = get_source(str(_get(data, "source", "shapes")))
    split = str(split or data.split)
    few = (lambda key, default=None: _get(data, key, default)) if train else (lambda key, default=None: default)
    if entry.renders:
        return entry.build(data, split, few, int(num if num is not None else data.num_images),
                           int(seed if seed is not None else _get(data, "seed", 0)))
    src = entry.build(data, split, few, num, seed)
    if len(src) == 0:  # an empty selection would only surface later, as an iterator that stops at once
        root = _get(data, "root", "")
        raise UserError(f"{_get(data, 'source', 'shapes')} split {split!r} at {root}: no image "
                        + ("passes the few-shot selection (data.per_class, data.min_pixels, data.min_area, ...)"
                           if train else "found") + "; check data.root and those settings")
    return _Head(src, num) if num is not None else src


def class_names(data: ml_collections.ConfigDict, source: Any | None = None) -> Sequence[str]:
    """Class names of the configured dataset (index = label value); () for depth-only data."""
    entry = get_source(str(_get(data, "source", "shapes")))
    if entry.classes is not None:
        return entry.classes()
    src = source if source is not None else build(data, train=False)
    return getattr(getattr(src, "source", src), "classes")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m datasetdm_jax.data.sources CONFIG [key=value ...]``: print the selected items
    (VOC ids, Cityscapes frames, COCO image ids, NYU frames), one a line, to compare with the
    official ``Selected_File`` lists."""
    import sys

    from datasetdm_jax.config_utils import load_config

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit("usage: python -m datasetdm_jax.data.sources CONFIG [key=value ...]")
    config = load_config(args[0], args[1:])
    src = build(config.data, num=_get(config.data, "num_images"))
    items = getattr(getattr(src, "source", src), "items", None)
    if items is None:
        raise SystemExit(f"data.source={config.data.source!r} has no item list")
    for item in items[: len(src)]:
        print(item if not isinstance(item, tuple) else item[0])


if __name__ == "__main__":
    from datasetdm_jax import errors

    with errors.boundary("python -m datasetdm_jax.data.sources"):  # dataset faults: one line naming the file
        main()
