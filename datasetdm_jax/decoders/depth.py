"""Depth P-Decoder (as the official one): growing-width pixel stem -> conv head -> sigmoid * max_depth."""

from __future__ import annotations

import jax
from flax import nnx

from datasetdm_jax.decoders.pixel_stem import FeatureSpec, PixelStem, resize


class DepthDecoder(nnx.Module):
    """Returns depth (B, out_size, out_size) in metres.

    Official: stem 1024 @64 -> upsample to 512 -> conv3x3 1024->1024, ReLU, conv3x3 ->1 at 512.
    That head costs ~2.5 TMAC per image, so `head_size` (where the convs run; default = out_size,
    the official choice) and `head_channels` (default = stem width) are configurable; the result is
    bilinearly resized to `out_size` (default 8 x the highest feature res, i.e. the image size).
    """

    def __init__(self, spec: FeatureSpec, *, hidden: int = 256, max_depth: float = 10.0,
                 out_size: int | None = None, head_size: int | None = None, head_channels: int | None = None,
                 dtype=None, rngs: nnx.Rngs):
        self.stem = PixelStem(spec, hidden=hidden, grow=True, dtype=dtype, rngs=rngs)
        self.max_depth = max_depth
        self.out_size = out_size or 8 * max(spec)
        self.head_size = head_size or self.out_size
        c = self.stem.out_channels
        hc = head_channels or c
        init = nnx.initializers.normal(1e-3)
        self.conv1 = nnx.Conv(c, hc, (3, 3), padding=1, kernel_init=init, dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(hc, 1, (3, 3), padding=1, kernel_init=init, dtype=dtype, rngs=rngs)

    def __call__(self, features) -> jax.Array:
        x, _ = self.stem(features)
        x = resize(x, self.head_size)
        x = self.conv2(jax.nn.relu(self.conv1(x)))
        x = resize(x, self.out_size)
        return (jax.nn.sigmoid(x.astype("float32")) * self.max_depth)[..., 0]
