"""Labellers: what turns a batch of prompts into images with labels, selected by
``generate.labeler`` in a config. One registry, one result type (`LabelledExamples`).

- ``decoder``: DatasetDM's trained P-Decoder(s) on the sampler's captured features (`decoder`).
- ``attention``: Dataset Diffusion's training-free labeller from the sampler's attention (`attention`).
- ``decoder+attention``: both, on the same images from one sampler pass (`composite`).

A factory takes ``(config, pipe=None, config_path=None)`` and returns a callable
``(prompts, indices, seed) -> LabelledExamples`` with a ``describe() -> dict`` for the manifest.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from datasetdm_jax.labelers.examples import LabelledExamples

__all__ = ["LABELERS", "AttentionLabeler", "LabelledExamples", "make_labeler", "register_labeler"]


class AttentionLabeler:
    """``labeler: attention``: `attention.label_batch` over a config's prompts (no trained decoder)."""

    name = "attention"

    def __init__(self, config, pipe=None, config_path: str | None = None):
        from datasetdm_jax import train
        from datasetdm_jax.data import sources

        self.config = config
        self.pipe = pipe or train.frozen_pipeline_for(config)
        self.class_names = tuple(sources.class_names(config.data))
        from datasetdm_jax.labelers import calibration  # thresholds calibrated once here when the config asks
        self.settings, self.calibration = calibration.configured(
            config, self.pipe, config.generate.get("labeler_config", None), self.class_names)

    def __call__(self, prompts, indices: np.ndarray, seed: int) -> LabelledExamples:
        from datasetdm_jax.labelers import attention

        g = self.config.generate
        size = int(self.config.data.image_size)
        unknown = sorted({c for p in prompts for c in p.classes if c not in self.class_names})
        if unknown:
            raise ValueError(f"attention labels: class {unknown[0]!r} is not a label class ({list(self.class_names)})")
        ids = [[self.class_names.index(c) for c in p.classes] for p in prompts]
        out = attention.label_batch(
            self.pipe, [p.text for p in prompts], [list(p.classes) for p in prompts], list(indices), seed,
            class_ids=ids, steps=int(g.steps), guidance=float(g.guidance), scheduler=str(g.scheduler),
            negative_prompt=str(g.negative_prompt), config=self.settings, height=size, width=size)
        images = np.round(np.asarray(out.images) * 255).astype(np.uint8)
        return LabelledExamples(images, [{"segmentation": s} for s in np.asarray(out.labels)], list(out.prompts))

    def describe(self) -> dict[str, Any]:
        desc = {"name": self.name, "attention": dict(vars(self.settings))}
        if self.calibration is not None:
            desc["attention"]["calibration"] = self.calibration
        return desc


def _decoder(config, pipe=None, config_path: str | None = None):
    from datasetdm_jax.labelers.decoder import DecoderLabeler
    return DecoderLabeler(config, pipe=pipe, config_path=config_path)


def _decoder_attention(config, pipe=None, config_path: str | None = None):
    from datasetdm_jax.labelers.composite import DecoderAttentionLabeler
    return DecoderAttentionLabeler(config, pipe=pipe, config_path=config_path)


LABELERS: dict[str, Callable[..., Any]] = {"decoder": _decoder, "attention": AttentionLabeler,
                                           "decoder+attention": _decoder_attention}


def register_labeler(name: str, factory: Callable[..., Any]) -> None:
    """Make ``generate.labeler = name`` build ``factory(config, pipe=None, config_path=None)``."""
    LABELERS[name] = factory


def make_labeler(config, pipe=None, config_path: str | None = None):
    """The labeller named by ``config.generate.labeler`` (one-line error listing the known names)."""
    name = str(config.generate.labeler)
    if name not in LABELERS:
        raise ValueError(f"unknown generate.labeler {name!r} (known: {sorted(LABELERS)})")
    return LABELERS[name](config, pipe=pipe, config_path=config_path)
