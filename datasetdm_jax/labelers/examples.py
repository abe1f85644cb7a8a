"""The one result type every labeller returns for a batch (`LabelledExamples`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class LabelledExamples:
    """What a labeller returns for a batch: uint8 images (B,H,W,3) and one label dict per image
    (keys of `records.to_example`: segmentation, depth, instance_masks, keypoints, quality, ...)."""

    images: np.ndarray
    labels: list[dict[str, Any]]
    prompts: list[str] | None = None  # the prompts actually used, when the labeller changes them
