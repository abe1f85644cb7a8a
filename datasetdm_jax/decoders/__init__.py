"""P-Decoders: pixel stem, Mask2Former-style and per-pixel segmentation, depth, pose; losses and matching.

`get_decoder(name, spec, config, rngs=...)` builds one by name; `spec` is a FeatureSpec
(res -> (map_channels, attention_channels)), e.g. `feature_spec(features)`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flax import nnx

from datasetdm_jax.decoders.depth import DepthDecoder
from datasetdm_jax.decoders.inference import instance_inference, semantic_inference
from datasetdm_jax.decoders.losses import joints_mse_loss, per_pixel_cross_entropy, segmentation_loss, silog_loss
from datasetdm_jax.decoders.matching import hungarian_match, point_sample
from datasetdm_jax.decoders.per_pixel import PerPixelDecoder
from datasetdm_jax.decoders.pixel_stem import FeatureSpec, PixelStem, SegBlock, feature_spec
from datasetdm_jax.decoders.pose import PoseDecoder, decode_heatmaps, gaussian_heatmaps
from datasetdm_jax.decoders.segmentation import SegmentationDecoder

DECODERS: dict[str, Callable[..., nnx.Module]] = {
    "segmentation": SegmentationDecoder,
    "depth": DepthDecoder,
    "pose": PoseDecoder,
    "per_pixel": PerPixelDecoder,
}


def get_decoder(name: str, spec: FeatureSpec, config: Mapping[str, Any] | None = None, *,
                rngs: nnx.Rngs) -> nnx.Module:
    """Builds a registered decoder; `config` holds its keyword arguments (e.g. num_classes, hidden)."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; known: {sorted(DECODERS)}")
    return DECODERS[name](spec, **dict(config or {}), rngs=rngs)


__all__ = [
    "DECODERS", "DepthDecoder", "FeatureSpec", "PerPixelDecoder", "PixelStem", "PoseDecoder", "SegBlock",
    "SegmentationDecoder", "decode_heatmaps", "feature_spec", "gaussian_heatmaps", "get_decoder", "hungarian_match",
    "instance_inference", "joints_mse_loss", "per_pixel_cross_entropy", "point_sample", "segmentation_loss",
    "semantic_inference", "silog_loss",
]
