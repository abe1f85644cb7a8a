"""Downstream models trained on generated (+ real) data, and the paper's real / synthetic / mixed comparison.

- ``models``: DeepLab-style segmenter and U-Net depth net (Flax NNX);
- ``data``: arrays dicts, sources, mixing by ratio, augmentation, loaders (shapes, records, real);
- ``trainer``: jitted data-parallel training and evaluation with ``datasetdm_jax.metrics``;
- ``compare``: ``run_comparison`` (rows real / synthetic / real+synthetic) and the table;
- ``main``: the ``datasetdm downstream`` command.
"""

from datasetdm_jax.downstream.compare import ROWS, format_table, jsonable, row_weights, run_comparison
from datasetdm_jax.downstream.data import (ArraySource, Augment, IterSource, MixedBatches, batch_counts,
                                           real_arrays, records_arrays, shapes_arrays)
from datasetdm_jax.downstream.models import DeepLabSegmenter, DepthNet, build_model
from datasetdm_jax.downstream.trainer import Trained, cross_entropy_ignore, evaluate, predict, train

__all__ = ["ROWS", "format_table", "jsonable", "row_weights", "run_comparison", "ArraySource", "Augment",
           "IterSource", "MixedBatches", "batch_counts", "real_arrays", "records_arrays", "shapes_arrays",
           "DeepLabSegmenter", "DepthNet", "build_model", "Trained", "cross_entropy_ignore", "evaluate",
           "predict", "train"]
