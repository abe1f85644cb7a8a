"""Hungarian matching of predicted queries to padded ground-truth masks (Mask2Former's, as the
official code).

Cost = 2 * (-p_class) + 5 * BCE + 5 * Dice, the mask terms on K uniformly random points shared by
all masks of an image. The cost matrix is computed in JAX; the assignment itself is
`scipy.optimize.linear_sum_assignment` run through `jax.pure_callback`. Why a callback rather than
matching on the host between two jitted halves: the whole train step (forward, matching, loss,
update) stays one jitted function with static shapes, and the callback moves only a (Q, M) matrix
per image (<= 100 x a few dozen floats), negligible next to the forward pass. Under a data mesh
each device matches its own examples (``jax.shard_map``), as the batch is laid out. Matching is not
differentiated (the indices are integers; the cost is stop_gradient'ed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from datasetdm_jax import devices

_INVALID_COST = 1e6


def point_sample(masks: jax.Array, points: jax.Array) -> jax.Array:
    """Bilinearly samples (N, H, W) maps at normalised (x, y) points in [0, 1]: (N, P) -> (N, P).

    `points` is (P, 2) shared by all maps, or (N, P, 2). Matches torch `grid_sample` with
    align_corners=False and zero padding (pixel centres at (i + 0.5) / size).
    """
    h, w = masks.shape[-2:]

    def one(m, p):
        coords = jnp.stack([p[:, 1] * h - 0.5, p[:, 0] * w - 0.5])
        return jax.scipy.ndimage.map_coordinates(m.astype(jnp.float32), coords, order=1, mode="constant", cval=0.0)

    if points.ndim == 2:
        return jax.vmap(lambda m: one(m, points))(masks)
    return jax.vmap(one)(masks, points)


def match_cost(logits: jax.Array, pred_masks: jax.Array, gt_classes: jax.Array, gt_masks: jax.Array,
               gt_valid: jax.Array, points: jax.Array, *, w_class: float = 2.0, w_mask: float = 5.0,
               w_dice: float = 5.0) -> jax.Array:
    """(Q, M) matching cost for one image; invalid (padding) GT columns get a huge cost."""
    prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)                     # (Q, K+1)
    cost_class = -jnp.take(prob, gt_classes, axis=1)                                # (Q, M)
    x = point_sample(pred_masks, points)                                            # (Q, P)
    t = point_sample(gt_masks, points)                                              # (M, P)
    n = x.shape[-1]
    bce = (jax.nn.softplus(-x) @ t.T + jax.nn.softplus(x) @ (1 - t).T) / n
    s = jax.nn.sigmoid(x)
    dice = 1 - (2 * s @ t.T + 1) / (s.sum(-1)[:, None] + t.sum(-1)[None] + 1)
    cost = w_class * cost_class + w_mask * bce + w_dice * dice
    return jnp.where(gt_valid[None], cost, _INVALID_COST)


def _assign_host(cost: np.ndarray) -> np.ndarray:
    """cost (..., Q, M) -> (..., M) matched query of every GT column (Q >= M required)."""
    cost = np.asarray(cost, dtype=np.float64)
    flat = cost.reshape((-1,) + cost.shape[-2:])
    out = np.zeros((flat.shape[0], cost.shape[-1]), np.int32)
    for i, c in enumerate(flat):
        c = np.nan_to_num(c, nan=_INVALID_COST, posinf=_INVALID_COST, neginf=-_INVALID_COST)
        rows, cols = linear_sum_assignment(c)
        out[i, cols] = rows
    return out.reshape(cost.shape[:-2] + (cost.shape[-1],))


def assign(cost: jax.Array) -> jax.Array:
    """Optimal assignment inside jit: cost (..., Q, M) -> (..., M) int32 query index per GT."""
    if cost.shape[-2] < cost.shape[-1]:
        raise ValueError(f"need at least as many queries as GT slots, got Q={cost.shape[-2]} < M={cost.shape[-1]}")
    def host(c):
        out = jax.ShapeDtypeStruct(c.shape[:-2] + (c.shape[-1],), jnp.int32)
        return jax.pure_callback(_assign_host, out, c, vmap_method="expand_dims")

    n = devices.data_axis_size()
    if n > 1 and cost.ndim > 2 and cost.shape[0] % n == 0:  # each device matches its own examples
        spec = jax.sharding.PartitionSpec("data")
        host = jax.shard_map(host, in_specs=spec, out_specs=spec, check_vma=False)
    return host(jax.lax.stop_gradient(cost))


def hungarian_match(logits: jax.Array, pred_masks: jax.Array, gt_classes: jax.Array, gt_masks: jax.Array,
                    gt_valid: jax.Array, key: jax.Array, *, num_points: int = 12544, w_class: float = 2.0,
                    w_mask: float = 5.0, w_dice: float = 5.0) -> jax.Array:
    """Batched matching: logits (B, Q, K+1), pred_masks (B, Q, h, w), gt_* padded to M slots.

    Returns (B, M) int32: the query matched to each GT slot (meaningless where gt_valid is False).
    """
    b = logits.shape[0]
    points = jax.random.uniform(key, (b, num_points, 2))
    cost = jax.vmap(lambda *a: match_cost(*a, w_class=w_class, w_mask=w_mask, w_dice=w_dice))(
        logits, pred_masks, gt_classes, gt_masks, gt_valid, points)
    return assign(cost)
