"""Pose P-Decoder (as the official one): growing-width stem -> 1x1 conv -> J heatmaps; targets; decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from datasetdm_jax.decoders.pixel_stem import FeatureSpec, PixelStem, resize


class PoseDecoder(nnx.Module):
    """Returns heatmaps (B, S, S, num_joints), S = `out_size` or the highest feature resolution R.

    The official heatmaps are at R (64 for SD at 512 px, stride 8) from a 1x1 head. Small images
    (the shapes world: 64 px, R = 16) need a finer grid for keypoints to be localisable, hence
    `out_size`: the fused map is bilinearly resized to it before the head. A 1x1 head commutes with
    that resize, so its heatmap is a bilinear interpolation of an R x R one whose peaks sit on the
    R grid; `head_channels` (default 0: the official 1x1 head) puts a 3x3 conv + ReLU of that width
    at S first, so the head can place peaks between the R grid's points.
    """

    def __init__(self, spec: FeatureSpec, *, hidden: int = 256, num_joints: int = 17, out_size: int | None = None,
                 head_channels: int = 0, dtype=None, rngs: nnx.Rngs):
        self.stem = PixelStem(spec, hidden=hidden, grow=True, dtype=dtype, rngs=rngs)
        self.out_size = out_size
        c = self.stem.out_channels
        self.conv = (nnx.Conv(c, head_channels, (3, 3), padding=1, dtype=dtype, rngs=rngs)
                     if head_channels else None)
        self.head = nnx.Conv(head_channels or c, num_joints, (1, 1), dtype=dtype, rngs=rngs)

    def __call__(self, features) -> jax.Array:
        x, _ = self.stem(features)
        if self.out_size:
            x = resize(x, self.out_size)
        if self.conv is not None:
            x = jax.nn.relu(self.conv(x))
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

    Heatmap pixel k stands for image coordinate k * stride (HRNet's mapping), but the centre is the
    keypoint / stride itself, not rounded to a heatmap pixel (DARK's unbiased encoding, Zhang et
    al. 2020): rounding costs up to stride / 2 image pixels of label error, which on the shapes
    world's 20-40 px figures (stride 2) is most of an OKS tolerance. The Gaussian (peak 1 at the
    centre) is cut off beyond 3 sigma; joints that are invisible or whose 3-sigma window misses
    the heatmap get weight 0.
    """
    h, w = (size, size) if isinstance(size, int) else size
    mu = keypoints[..., :2].astype(jnp.float32) / stride                            # (B, J, 2) x, y
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

    Argmax, then the sub-pixel peak of the log-heatmap's second-order Taylor expansion per axis
    (DARK's decoding; exact for a Gaussian, whose log is a parabola), kept within half a pixel of
    the argmax, where a sampled Gaussian's true peak lies. Every joint is always returned (the
    official decoder drops border joints); `visible` = score > threshold.
    """
    b, h, w, j = heatmaps.shape
    hm = jnp.moveaxis(heatmaps.astype(jnp.float32), -1, 1).reshape(b, j, h * w)
    idx = jnp.argmax(hm, axis=-1)
    score = jnp.max(hm, axis=-1)
    x, y = idx % w, idx // w
    log_hm = jnp.log(jnp.maximum(hm, 1e-10))
    at = lambda yy, xx: jnp.take_along_axis(log_hm, (jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1))[..., None],
                                            -1)[..., 0]

    def peak_offset(before, centre, after, interior):
        slope, curvature = 0.5 * (after - before), after - 2 * centre + before
        ok = interior & (curvature < 0)
        return jnp.where(ok, jnp.clip(-slope / jnp.where(ok, curvature, -1.0), -0.5, 0.5), 0.0)

    centre = at(y, x)
    sx = peak_offset(at(y, x - 1), centre, at(y, x + 1), (x > 0) & (x < w - 1))
    sy = peak_offset(at(y - 1, x), centre, at(y + 1, x), (y > 0) & (y < h - 1))
    kp = jnp.stack([(x + sx) * stride, (y + sy) * stride, score], axis=-1)
    return kp, score > threshold
