"""Pose P-Decoder (reference §3.4): growing-width stem -> 1x1 conv -> J heatmaps; targets; decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from datasetdm_jax.decoders.pixel_stem import FeatureSpec, PixelStem, resize


class PoseDecoder(nnx.Module):
    """Returns heatmaps (B, S, S, num_joints), S = `out_size` or the highest feature resolution R.

    The official heatmaps are at R (64 for SD at 512 px, stride 8). Small images (the shapes world:
    64 px, R = 16) need a finer grid for keypoints to be localisable, hence `out_size`: the fused
    map is bilinearly resized to it before the 1x1 head.
    """

    def __init__(self, spec: FeatureSpec, *, hidden: int = 256, num_joints: int = 17, out_size: int | None = None,
                 dtype=None, rngs: nnx.Rngs):
        self.stem = PixelStem(spec, hidden=hidden, grow=True, dtype=dtype, rngs=rngs)
        self.out_size = out_size
        self.head = nnx.Conv(self.stem.out_channels, num_joints, (1, 1), dtype=dtype, rngs=rngs)

    def __call__(self, features) -> jax.Array:
        x, _ = self.stem(features)
        if self.out_size:
            x = resize(x, self.out_size)
        return self.head(x).astype(jnp.float32)


def softmax_heatmaps(logits: jax.Array, sigma: float) -> jax.Array:
    """Logits of a decoder trained with `heatmap_softmax_loss` (B, H, W, J) -> heatmaps on the
    JointsMSE scale: the spatial softmax times the mass of a peak-1 Gaussian of ``sigma``, so a
    prediction equal to its target peaks at 1 (the scale `decode_heatmaps`' threshold expects)."""
    b, h, w, j = logits.shape
    prob = jax.nn.softmax(logits.astype(jnp.float32).reshape(b, h * w, j), axis=1).reshape(b, h, w, j)
    r = int(3 * sigma)  # the target of a joint centred in a (2r+1)^2 map lies wholly inside it
    target, _ = gaussian_heatmaps(jnp.full((1, 1, 2), float(r)), jnp.ones((1, 1)), 2 * r + 1, sigma=sigma)
    return prob * target.sum()


def gaussian_heatmaps(keypoints: jax.Array, visible: jax.Array, size: int | tuple[int, int], stride: float = 1.0,
                      sigma: float = 2.0) -> tuple[jax.Array, jax.Array]:
    """Gaussian targets (B, H, W, J) and weights (B, J) from image-space keypoints (B, J, 2).

    HRNet convention: the centre is the keypoint / stride rounded to the nearest heatmap pixel, the
    Gaussian (peak 1) is cut off beyond 3 sigma, and joints that are invisible or whose 3-sigma
    window misses the heatmap get weight 0.
    """
    h, w = (size, size) if isinstance(size, int) else size
    mu = jnp.floor(keypoints[..., :2] / stride + 0.5)                               # (B, J, 2) x, y
    ys = jnp.arange(h, dtype=jnp.float32)[:, None]
    xs = jnp.arange(w, dtype=jnp.float32)[None, :]
    dx = xs[None, None] - mu[..., 0, None, None]
    dy = ys[None, None] - mu[..., 1, None, None]
    r = 3 * sigma
    g = jnp.exp(-(dx ** 2 + dy ** 2) / (2 * sigma ** 2)) * ((jnp.abs(dx) <= r) & (jnp.abs(dy) <= r))
    inside = (mu[..., 0] + r >= 0) & (mu[..., 0] - r < w) & (mu[..., 1] + r >= 0) & (mu[..., 1] - r < h)
    weight = (visible > 0) & inside
    g = g * weight[..., None, None]
    return jnp.moveaxis(g, 1, -1), weight.astype(jnp.float32)


def decode_heatmaps(heatmaps: jax.Array, stride: float = 1.0, threshold: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """Heatmaps (B, H, W, J) -> keypoints (B, J, 3) = (x, y, score) in image space, visible (B, J).

    Argmax plus the quarter-pixel shift toward the higher neighbour. Every joint is always returned
    (the official decoder drops border joints); `visible` = score > threshold.
    """
    b, h, w, j = heatmaps.shape
    hm = jnp.moveaxis(heatmaps.astype(jnp.float32), -1, 1).reshape(b, j, h * w)
    idx = jnp.argmax(hm, axis=-1)
    score = jnp.max(hm, axis=-1)
    x, y = idx % w, idx // w
    hm2 = hm.reshape(b, j, h, w)
    at = lambda yy, xx: jnp.take_along_axis(
        hm2.reshape(b, j, -1), (jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1))[..., None], -1)[..., 0]
    sx = jnp.where((x > 0) & (x < w - 1), 0.25 * jnp.sign(at(y, x + 1) - at(y, x - 1)), 0.0)
    sy = jnp.where((y > 0) & (y < h - 1), 0.25 * jnp.sign(at(y + 1, x) - at(y - 1, x)), 0.0)
    kp = jnp.stack([(x + sx) * stride, (y + sy) * stride, score], axis=-1)
    return kp, score > threshold
