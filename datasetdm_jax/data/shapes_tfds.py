"""TFDS builder for the shapes world: fixed, versioned splits written as ArrayRecord.

Works without TensorFlow: images go in as PIL images, arrays as numpy, and the result is read with
``builder.as_data_source(split)`` (random access, what grain wants). Instances are stored packed as
one ``instance_map`` (visible masks are disjoint, so this is lossless) plus ``instance_classes``;
``datasetdm_jax.data.pipeline`` unpacks them into padded per-instance masks.

Usage::

    builder = ShapesWorld(data_dir=tmp, config=ShapesWorldConfig(name="tiny", split_sizes={...}))
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source("train_labelled")
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from datasetdm_jax.data import shapes

# Default number of scenes per split; the pretraining corpus is streamed from the generator instead.
DEFAULT_SPLIT_SIZES: Mapping[str, int] = {
    "pretrain": 20_000, "train_labelled": 100, "test": 1_000, "test_shifted": 1_000,
}


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    """Image size, split sizes and seed of one prepared copy of the world."""

    image_size: int = 64
    max_objects: int = 3
    classes: tuple[str, ...] = shapes.DEFAULT_CLASSES
    split_sizes: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SPLIT_SIZES))
    seed: int = 0

    def shapes_config(self) -> shapes.ShapesConfig:
        return shapes.ShapesConfig(image_size=self.image_size, max_objects=self.max_objects,
                                   classes=tuple(self.classes))


def scene_to_record(scene: Mapping[str, Any], index: int) -> dict[str, Any]:
    """A render_scene dict as the builder's feature dict (tfds encodes PIL images without TF)."""
    return {
        "index": index,
        "image": Image.fromarray(scene["image"]),
        "caption": scene["caption"],
        "segmentation": scene["segmentation"],
        "instance_map": scene["instance_map"],
        "instance_classes": scene["instance_classes"].astype(np.int32),
        "depth": scene["depth"],
        "keypoints": scene["keypoints"].astype(np.float32),
    }


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """The shapes world (see ``datasetdm_jax.data.shapes``) as a TFDS dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        ShapesWorldConfig(name="64px", image_size=64, description="64x64 RGB (16x16 latents)."),
        ShapesWorldConfig(name="32px", image_size=32, description="32x32 RGB, for quick pilots."),
    ]
    DEFAULT_CONFIG_NAME = "64px"
    # tfds 4.9.10 finds this path through the `importlib_resources` backport, which is not installed
    # on Python >= 3.9 (ModuleNotFoundError in download_and_prepare); give it directly.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        n_kp = len(shapes.KEYPOINT_NAMES)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "index": tfds.features.Scalar(dtype=np.int64),
                "image": tfds.features.Image(shape=(s, s, 3)),
                "caption": tfds.features.Text(),
                "segmentation": tfds.features.Tensor(shape=(s, s), dtype=np.uint8,
                                                     encoding=tfds.features.Encoding.ZLIB),
                "instance_map": tfds.features.Tensor(shape=(s, s), dtype=np.uint8,
                                                     encoding=tfds.features.Encoding.ZLIB),
                "instance_classes": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "depth": tfds.features.Tensor(shape=(s, s), dtype=np.float32,
                                              encoding=tfds.features.Encoding.ZLIB),
                "keypoints": tfds.features.Tensor(shape=(None, n_kp, 3), dtype=np.float32),
            }),
            # Keep record i == scene i of the split, so records can be traced back to the generator.
            disable_shuffling=True,
            description="Procedural shapes with captions, classes, instances, depth and keypoints.",
            homepage="https://github.com/",  # local, procedural dataset
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {name: self._generate_examples(name, n)
                for name, n in self.builder_config.split_sizes.items() if n > 0}

    def _generate_examples(self, split: str, num: int):
        cfg = self.builder_config
        source = shapes.make_split(split, num, cfg.seed, cfg.shapes_config())
        for i in range(num):
            yield i, scene_to_record(source[i], i)


def prepare(data_dir: str, *, split_sizes: Mapping[str, int] | None = None, image_size: int = 64,
            seed: int = 0, name: str | None = None) -> ShapesWorld:
    """Build (or reuse) the dataset under ``data_dir`` as ArrayRecord and return the builder."""
    sizes = dict(split_sizes or DEFAULT_SPLIT_SIZES)
    if name is None:
        name = f"{image_size}px" if sizes == dict(DEFAULT_SPLIT_SIZES) and seed == 0 else (
            f"{image_size}px_seed{seed}_" + "_".join(f"{sizes[k]}" for k in sorted(sizes)))
    config = ShapesWorldConfig(name=name, image_size=image_size, split_sizes=sizes, seed=seed)
    builder = ShapesWorld(data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare()
    return builder
