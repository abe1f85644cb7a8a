"""PyTorch-compatible bicubic resizing (`F.interpolate(mode="bicubic", align_corners=False)`).

`jax.image.resize(method="cubic")` uses Keys' a = -0.5 and antialiases when shrinking; PyTorch
uses a = -0.75, half-pixel centres, clamped border taps and no antialiasing. Dataset Diffusion's
thresholds (0.5, 0.6) were tuned on PyTorch's overshoot, so we match it: per axis the resize is a
fixed (out, in) matrix built in numpy, applied with two fp32 contractions at full precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

A = -0.75  # PyTorch's cubic convolution coefficient


def _cubic(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel at distances |t| (support [0, 2))."""
    t = np.abs(t)
    near = ((A + 2) * t - (A + 3)) * t * t + 1
    far = ((A * t - 5 * A) * t + 8 * A) * t - 4 * A
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) float32 weights of PyTorch's 1-D bicubic resize (align_corners=False)."""
    if size_in < 1 or size_out < 1:
        raise ValueError(f"bicubic_matrix: sizes must be positive, got {size_in} -> {size_out}")
    src = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5  # not clamped (cubic)
    base = np.floor(src)
    frac = src - base
    m = np.zeros((size_out, size_in), np.float64)
    for tap in (-1, 0, 1, 2):
        idx = np.clip(base + tap, 0, size_in - 1).astype(np.int64)  # border taps repeat the edge
        np.add.at(m, (np.arange(size_out), idx), _cubic(frac - tap))
    return m.astype(np.float32)


def resize_bicubic(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes (..., H, W, C) maps to (..., size[0], size[1], C) as PyTorch's bicubic does, in fp32."""
    h, w = x.shape[-3], x.shape[-2]
    mh = jnp.asarray(bicubic_matrix(h, int(size[0])))
    mw = jnp.asarray(bicubic_matrix(w, int(size[1])))
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,...hwc->...owc", mh, x.astype(jnp.float32), precision=hi)
    return jnp.einsum("pw,...owc->...opc", mw, x, precision=hi)
