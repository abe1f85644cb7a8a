"""Averaged attention -> label maps (Dataset Diffusion, gen_data.py), as pure jittable functions.

Per image, with K class names: the class-prompt cross-attention is upsampled (bicubic) to the
self-attention grid, each class's map is the mean of its tokens' maps, the map is propagated
`tau` times through the self-attention matrix S (rows: query pixels, columns: key pixels),
normalised (`normalise`: per class min-max as the official code, or ``"peak"``: each class less
its minimum over the strongest named class's range, so a class the image barely shows stays low
instead of being stretched to 1), upsampled bicubically to the image size, and thresholded:
max >= `threshold` -> the argmax class id, [`uncertainty_threshold`, `threshold`) -> 255 (ignore),
below -> 0 (background).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from datasetdm_jax.labelers.resize import resize_bicubic

IGNORE = 255
_HI = jax.lax.Precision.HIGHEST


def class_maps(cross: jax.Array, weights: jax.Array, cross_hw: tuple[int, int],
               self_hw: tuple[int, int]) -> jax.Array:
    """(B, Lc, T) class-prompt attention + (B, K, T) token weights -> (B, hs, ws, K) class maps on the self grid.

    The official code upsamples all T token maps, then averages a class's tokens; both steps are
    linear, so averaging first (K maps instead of T) gives the same maps up to rounding.
    """
    maps = jnp.einsum("blt,bkt->blk", cross.astype(jnp.float32), weights.astype(jnp.float32), precision=_HI)
    return resize_bicubic(maps.reshape(maps.shape[0], *cross_hw, maps.shape[-1]), self_hw)


def propagate(self_attention: jax.Array, maps: jax.Array, tau: int) -> jax.Array:
    """S^tau . maps per image: (B, L, L) and (B, h, w, K) -> (B, h, w, K), in fp32.

    Applied as tau products with the (L, K) maps rather than by squaring S (L^3 work): the same
    matrix power, far cheaper, at full fp32 precision (reduced-precision matmuls move pixels
    across the 0.5/0.6 thresholds).
    """
    b, h, w, k = maps.shape
    x = maps.reshape(b, h * w, k).astype(jnp.float32)
    s = self_attention.astype(jnp.float32)
    for _ in range(int(tau)):
        x = jnp.einsum("bqp,bpk->bqk", s, x, precision=_HI)
    return x.reshape(b, h, w, k)


NORMALISATIONS = ("minmax", "peak")


def normalise(maps: jax.Array, valid: jax.Array | None = None, how: str = "minmax") -> jax.Array:
    """(B, h, w, K) class maps -> scores in [0, 1].

    ``"minmax"`` (official): each (image, class) map to [0, 1] on its own; a constant map becomes 0
    (official: NaN). ``"peak"``: each map less its own minimum, divided by the largest such range
    among the image's named classes (`valid`, (B, K); None: all), so only the strongest class
    reaches 1 and a class that is weak or absent in the image keeps its small range.
    """
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    if how == "peak":
        named = jnp.ones(span.shape, bool) if valid is None else valid[:, None, None, :]
        span = jnp.where(named, span, 0).max(axis=-1, keepdims=True)
    elif how != "minmax":
        raise ValueError(f"normalisation {how!r}: expected one of {NORMALISATIONS}")
    return jnp.where(span > 0, (maps - lo) / jnp.where(span > 0, span, 1), 0.0)


def threshold_labels(maps: jax.Array, class_ids: jax.Array, valid: jax.Array, *, threshold: float,
                     uncertainty_threshold: float) -> jax.Array:
    """(B, H, W, K) scores -> (B, H, W) uint8 labels: class id, 255 (uncertain) or 0 (background).

    Padding classes (`valid` False) never win; an image with no valid class is all 255.
    """
    scores = jnp.where(valid[:, None, None, :], maps, -jnp.inf)
    best = scores.max(axis=-1)
    ids = jnp.take_along_axis(class_ids[:, None, None, :], scores.argmax(axis=-1)[..., None], axis=-1)[..., 0]
    labels = jnp.where(best >= threshold, ids, jnp.where(best >= uncertainty_threshold, IGNORE, 0))
    labels = jnp.where(valid.any(axis=-1)[:, None, None], labels, IGNORE)
    return labels.astype(jnp.uint8)


def class_scores(self_attention: jax.Array, cross: jax.Array, weights: jax.Array, *, self_hw: tuple[int, int],
                 cross_hw: tuple[int, int], image_hw: tuple[int, int], tau: int = 4, normalisation: str = "minmax",
                 valid: jax.Array | None = None) -> jax.Array:
    """Averaged attention -> (B, H, W, K) per-class scores of the image size, normalised (`normalise`)."""
    maps = propagate(self_attention, class_maps(cross, weights, cross_hw, self_hw), tau)
    return resize_bicubic(normalise(maps, valid, normalisation), image_hw)


def attention_labels(self_attention: jax.Array, cross: jax.Array, weights: jax.Array, class_ids: jax.Array,
                     valid: jax.Array, *, self_hw: tuple[int, int], cross_hw: tuple[int, int],
                     image_hw: tuple[int, int], tau: int = 4, threshold: float = 0.6,
                     uncertainty_threshold: float = 0.5, normalisation: str = "minmax") -> jax.Array:
    """The whole post-processing: averaged attention -> (B, H, W) uint8 label maps of the image size."""
    maps = class_scores(self_attention, cross, weights, self_hw=self_hw, cross_hw=cross_hw, image_hw=image_hw, tau=tau,
                        normalisation=normalisation, valid=valid)
    return threshold_labels(maps, class_ids, valid, threshold=threshold, uncertainty_threshold=uncertainty_threshold)
