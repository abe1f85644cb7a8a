"""Name -> random-access data source, so configs pick their data with ``data.source``.

``build(config.data, split, train=...)`` returns a grain-readable source whose items have the
shapes-world keys (see ``real_base``). ``data.source`` is one of ``shapes`` (default), ``voc``,
``cityscapes``, ``coco_instance``, ``coco_pose``, ``nyu``. The few-shot selection fields
(``per_class``, ``min_pixels``, ``num_images``, ...) apply to the training split only; evaluation
reads the whole split (capped by ``num`` when given).
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections

from datasetdm_jax.data import real_base as rb

SOURCES = ("shapes", "voc", "cityscapes", "coco_instance", "coco_pose", "nyu")


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


def build(data: ml_collections.ConfigDict, split: str | None = None, *, train: bool = True,
          num: int | None = None) -> Any:
    """The source named by ``data.source`` for ``split`` (default ``data.split``)."""
    name = str(_get(data, "source", "shapes"))
    split = str(split or data.split)
    if name not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {name!r}")
    if name == "shapes":
        from datasetdm_jax.data import shapes
        n = int(num if num is not None else data.num_images)
        return shapes.make_split(split, n, int(_get(data, "seed", 0)),
                                 shapes.ShapesConfig(image_size=int(data.image_size)))
    root = str(data.root)
    sc = rb.SourceConfig(image_size=int(data.image_size), resize=str(_get(data, "resize", "crop")),
                         max_objects=int(_get(data, "max_objects", 20)))
    few = (lambda key, default=None: _get(data, key, default)) if train else (lambda key, default=None: default)
    if name == "voc":
        from datasetdm_jax.data.voc import VOCSource
        src = VOCSource(root, split, sc, per_class=few("per_class"), min_pixels=int(_get(data, "min_pixels", 18000)))
    elif name == "cityscapes":
        from datasetdm_jax.data.cityscapes import CityscapesSource
        src = CityscapesSource(root, split, sc, label_kind=str(_get(data, "label_kind", "labelIds")),
                               per_class=few("per_class"), min_pixels=int(_get(data, "min_pixels", 10000)))
    elif name in ("coco_instance", "coco_pose"):
        from datasetdm_jax.data.coco import COCOSource
        src = COCOSource(root, split, name[len("coco_"):], sc, per_class=few("per_class"),
                         min_area=float(_get(data, "min_area", 10000.0)), num_images=few("num_images"),
                         min_instance_area=float(few("min_instance_area", 0.0)))
    else:
        from datasetdm_jax.data.nyu import NYUDepthSource
        src = NYUDepthSource(root, split, sc, num_images=few("num_images"), select_seed=int(_get(data, "seed", 0)))
    return _Head(src, num) if num is not None else src


def class_names(data: ml_collections.ConfigDict, source: Any | None = None) -> Sequence[str]:
    """Class names of the configured dataset (index = label value); () for depth-only data."""
    name = str(_get(data, "source", "shapes"))
    if name == "shapes":
        from datasetdm_jax.data import shapes
        return shapes.CLASSES
    if name == "voc":
        from datasetdm_jax.data.voc import CLASSES
        return CLASSES
    if name == "cityscapes":
        from datasetdm_jax.data.cityscapes import CLASSES
        return CLASSES
    if name == "nyu":
        return ()
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
    main()
