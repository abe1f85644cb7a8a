"""P-Decoder losses (the official code's): Mask2Former set criterion, scale-invariant log depth, joints MSE;
and per-pixel cross-entropy for the per-pixel semantic head.

Segmentation ground truth is padded to a fixed number of slots M per image so shapes are static:
`gt_classes` (B, M) int, `gt_masks` (B, M, H, W) {0,1}, `gt_valid` (B, M) bool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from datasetdm_jax.decoders.matching import hungarian_match, point_sample


def _importance_points(logits: jax.Array, key: jax.Array, num_points: int, oversample: float,
                       importance: float) -> jax.Array:
    """(N, h, w) mask logits -> (N, P, 2) points: the most uncertain of P*oversample random ones + random."""
    n = logits.shape[0]
    k1, k2 = jax.random.split(key)
    cand = jax.random.uniform(k1, (n, int(num_points * oversample), 2))
    unc = -jnp.abs(point_sample(jax.lax.stop_gradient(logits), cand))
    n_imp = int(importance * num_points)
    _, idx = jax.lax.top_k(unc, n_imp)
    pts = jnp.take_along_axis(cand, idx[..., None], axis=1)
    rand = jax.random.uniform(k2, (n, num_points - n_imp, 2))
    return jnp.concatenate([pts, rand], axis=1)


def _layer_loss(logits, masks, gt_classes, gt_masks, gt_valid, key, *, num_classes, num_points, oversample,
                importance, no_object_weight, match_weights):
    b, q = logits.shape[:2]
    m = gt_classes.shape[1]
    k_match, k_pts = jax.random.split(key)
    qidx = hungarian_match(logits, masks, gt_classes, gt_masks, gt_valid, k_match, num_points=num_points,
                           **match_weights)                                         # (B, M)
    valid = gt_valid.astype(jnp.float32)
    num_masks = jnp.maximum(valid.sum(), 1.0)

    # Classification: matched queries get their GT class, the rest "no object" (index K).
    target = jnp.full((b, q), num_classes, jnp.int32)
    bidx = jnp.broadcast_to(jnp.arange(b)[:, None], (b, m))
    safe_q = jnp.where(gt_valid, qidx, q)                                           # out of range -> dropped
    target = target.at[bidx, safe_q].set(gt_classes.astype(jnp.int32), mode="drop")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    w = jnp.where(target == num_classes, no_object_weight, 1.0)
    ce = (w * nll).sum() / w.sum()

    # Masks: matched pairs, importance-sampled points.
    pm = jnp.take_along_axis(masks, qidx[:, :, None, None], axis=1).reshape((b * m,) + masks.shape[2:])
    gm = gt_masks.reshape((b * m,) + gt_masks.shape[2:])
    pts = _importance_points(pm, k_pts, num_points, oversample, importance)
    x = point_sample(pm, pts)
    t = point_sample(gm, pts)
    vf = valid.reshape(-1)
    bce = (jnp.mean(jax.nn.softplus(x) - x * t, axis=-1) * vf).sum() / num_masks
    s = jax.nn.sigmoid(x)
    dice = 1 - (2 * (s * t).sum(-1) + 1) / (s.sum(-1) + t.sum(-1) + 1)
    dice = (dice * vf).sum() / num_masks
    return ce, bce, dice


def segmentation_loss(outputs: dict[str, jax.Array], gt_classes: jax.Array, gt_masks: jax.Array,
                      gt_valid: jax.Array, key: jax.Array, *, num_classes: int, aux: bool = False,
                      num_points: int = 12544, oversample: float = 3.0, importance: float = 0.75,
                      no_object_weight: float = 0.1, w_class: float = 2.0, w_mask: float = 5.0,
                      w_dice: float = 5.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mask2Former criterion on `SegmentationDecoder` outputs; returns (total, parts).

    Each layer is matched on its own; with `aux` the per-layer losses are summed, otherwise only
    the final layer counts (the official setting). Normalised by the number of valid GT masks.
    """
    logits, masks = outputs["logits"], outputs["masks"]
    layers = range(logits.shape[0]) if aux else [logits.shape[0] - 1]
    keys = jax.random.split(key, logits.shape[0])
    match_weights = dict(w_class=w_class, w_mask=w_mask, w_dice=w_dice)
    parts = {"ce": 0.0, "bce": 0.0, "dice": 0.0}
    for i in layers:
        ce, bce, dice = _layer_loss(logits[i], masks[i], gt_classes, gt_masks, gt_valid, keys[i],
                                    num_classes=num_classes, num_points=num_points, oversample=oversample,
                                    importance=importance, no_object_weight=no_object_weight,
                                    match_weights=match_weights)
        parts = {"ce": parts["ce"] + ce, "bce": parts["bce"] + bce, "dice": parts["dice"] + dice}
    total = w_class * parts["ce"] + w_mask * parts["bce"] + w_dice * parts["dice"]
    return total, {**parts, "total": total}


def silog_loss(pred: jax.Array, gt: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Scale-invariant log loss sqrt(mean(d^2) - 0.5 mean(d)^2), d = log gt - log pred, over gt > 0.

    Computed per image over its valid pixels, then averaged over the batch (official batch is 1).
    """
    pred = pred.reshape(pred.shape[0], -1).astype(jnp.float32)
    gt = gt.reshape(gt.shape[0], -1).astype(jnp.float32)
    valid = gt > 0
    d = jnp.where(valid, jnp.log(jnp.where(valid, gt, 1.0)) - jnp.log(jnp.maximum(pred, eps)), 0.0)
    n = jnp.maximum(valid.sum(-1), 1)
    m1 = d.sum(-1) / n
    m2 = (d * d).sum(-1) / n
    return jnp.mean(jnp.sqrt(jnp.maximum(m2 - 0.5 * m1 * m1, eps)))


def heatmap_softmax_loss(logits: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
    """Cross-entropy of each joint's spatial softmax against its Gaussian target normalised to sum 1,
    averaged over the weighted joints. logits/target (B, H, W, J), weight (B, J). Unlike JointsMSE
    it has no all-zero minimum to fall into: the softmax must put its mass somewhere."""
    b, h, w, j = logits.shape
    logp = jax.nn.log_softmax(logits.astype(jnp.float32).reshape(b, h * w, j), axis=1)
    t = target.astype(jnp.float32).reshape(b, h * w, j)
    t = t / jnp.maximum(t.sum(1, keepdims=True), 1e-6)
    wt = weight.astype(jnp.float32)
    return jnp.sum(-(t * logp).sum(1) * wt) / jnp.maximum(wt.sum(), 1.0)


def joints_mse_loss(pred: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
    """JointsMSELoss: 0.5 * MSE(pred*w, target*w), averaged over joints. pred/target (B, H, W, J), weight (B, J)."""
    w = weight.astype(jnp.float32)[:, None, None, :]
    return 0.5 * jnp.mean((pred.astype(jnp.float32) * w - target.astype(jnp.float32) * w) ** 2)


def per_pixel_cross_entropy(logits: jax.Array, segmentation: jax.Array) -> jax.Array:
    """Mean cross-entropy of (B,H,W,K) logits against (B,H,W) class maps, 255 (and any id >= K) ignored."""
    k = logits.shape[-1]
    seg = segmentation.astype(jnp.int32)
    valid = seg < k
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(valid, seg, 0))
    return (ce * valid).sum() / jnp.maximum(valid.sum(), 1)
