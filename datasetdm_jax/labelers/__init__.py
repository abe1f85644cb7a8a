"""Training-free labellers, selected by name in a generation config (`labeler: attention`).

Each entry is `label_batch(pipe, captions, class_names, indices, seed, *, class_ids, steps,
guidance, scheduler, negative_prompt, config, height, width)` returning a `LabelledBatch`
(images in [0, 1], uint8 label maps of the image size with 255 = ignore, prompts used).
"""

from __future__ import annotations

from typing import Callable

from datasetdm_jax.labelers.attention import AttentionLabelConfig, LabelledBatch, label_batch

LABELERS: dict[str, Callable[..., LabelledBatch]] = {"attention": label_batch}


def get_labeler(name: str) -> Callable[..., LabelledBatch]:
    """The labeller registered as `name` (one-line error listing the known names)."""
    if name not in LABELERS:
        raise ValueError(f"unknown labeler {name!r} (known: {sorted(LABELERS)})")
    return LABELERS[name]


__all__ = ["LABELERS", "get_labeler", "AttentionLabelConfig", "LabelledBatch", "label_batch"]
