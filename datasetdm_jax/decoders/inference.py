"""Turning segmentation-decoder outputs into labels: semantic maps and scored instances."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from datasetdm_jax.decoders.pixel_stem import resize


def resize_masks(masks: jax.Array, size: int | tuple[int, int] | None) -> jax.Array:
    if size is None:
        return masks
    return jnp.moveaxis(resize(jnp.moveaxis(masks, 1, -1), size), -1, 1)


def semantic_scores(logits: jax.Array, masks: jax.Array, out_size: int | tuple[int, int] | None = None) -> jax.Array:
    """(B, Q, K+1) logits, (B, Q, h, w) mask logits -> (B, K, H, W) per-class scores:
    score[k] = sum_q softmax(logits)[q, k] * sigmoid(mask_q), "no object" dropped."""
    prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :-1]
    m = jax.nn.sigmoid(resize_masks(masks.astype(jnp.float32), out_size))
    return jnp.einsum("bqk,bqhw->bkhw", prob, m)


def pixel_confidence(scores: jax.Array) -> jax.Array:
    """(B, K, H, W) scores -> (B, H, W): the winning class's share of the pixel's total score."""
    return scores.max(1) / (scores.sum(1) + 1e-6)


def semantic_inference(logits: jax.Array, masks: jax.Array, out_size: int | tuple[int, int] | None = None,
                       min_area: int = 0, fill: int = 0) -> jax.Array:
    """(B, Q, K+1) logits, (B, Q, h, w) mask logits -> (B, H, W) int32 class map: the argmax of
    `semantic_scores` (`class_map`)."""
    return class_map(semantic_scores(logits, masks, out_size), min_area, fill)


def class_map(scores: jax.Array, min_area: int = 0, fill: int = 0) -> jax.Array:
    """(B, K, H, W) `semantic_scores` -> (B, H, W) int32 argmax class; classes predicted on fewer
    than `min_area` pixels of an image are replaced by `fill`."""
    seg = jnp.argmax(scores, axis=1).astype(jnp.int32)
    if min_area > 0:
        k = scores.shape[1]
        area = jax.vmap(lambda s: jnp.bincount(s.reshape(-1), length=k))(seg)      # (B, K)
        small = jnp.take_along_axis(area, seg.reshape(seg.shape[0], -1), axis=1).reshape(seg.shape) < min_area
        seg = jnp.where(small, fill, seg)
    return seg


def grounded_class_map(scores: jax.Array, allowed: jax.Array, *, min_area: int = 0,
                       weak_threshold: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Labels that follow the prompt (`labelers.grounding`): (B, K, H, W) scores and (B, K) allowed
    label values -> ((B, H, W) int32 class map over the allowed classes only, (B, H, W) confidence).

    The confidence is the winning allowed class's share of the pixel's total score over *all* classes;
    with ``weak_threshold`` > 0, pixels below it become 255 (ignore). Classes smaller than
    ``min_area`` pixels become background, as in `class_map`.
    """
    scores = scores.astype(jnp.float32)
    restricted = jnp.where(allowed[:, :, None, None], scores, -1.0)  # scores are >= 0
    seg = class_map(restricted, min_area)
    confidence = restricted.max(1) / (scores.sum(1) + 1e-6)
    if weak_threshold > 0:
        seg = jnp.where(confidence < weak_threshold, 255, seg)
    return seg, confidence


def instance_inference(logits: jax.Array, masks: jax.Array, top_k: int = 100,
                       out_size: int | tuple[int, int] | None = None) -> dict[str, jax.Array]:
    """Class-aware instances: top-k of (query, class) pairs by class prob x mean in-mask sigmoid.

    Returns masks (B, k, H, W) bool, scores (B, k), labels (B, k) int32, query (B, k) int32.
    """
    b, q, k1 = logits.shape
    k = k1 - 1
    prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :-1].reshape(b, q * k)
    top_k = min(top_k, q * k)
    cls_score, flat = jax.lax.top_k(prob, top_k)
    query = (flat // k).astype(jnp.int32)
    labels = (flat % k).astype(jnp.int32)
    ml = resize_masks(masks.astype(jnp.float32), out_size)
    ml = jnp.take_along_axis(ml, query[:, :, None, None], axis=1)
    binary = ml > 0
    s = jax.nn.sigmoid(ml)
    mask_score = (s * binary).sum((-2, -1)) / (binary.sum((-2, -1)) + 1e-6)
    return {"masks": binary, "scores": cls_score * mask_score, "labels": labels, "query": query}
