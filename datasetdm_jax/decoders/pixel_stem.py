"""Pixel stem shared by all P-Decoders: multi-scale fusion of UNet maps and cross-attention.

Follows the official `_prepare_features` coarse to fine, NHWC, bilinear
(half-pixel, no antialias) resizes:

    proj_k = conv1x1(concat(maps[r_k], flatten(attention[r_k])))      (no bias)
    x = resize(proj_0, m_1)
    for k >= 1:  x = SegBlock(concat(resize(proj_k, m_k), x)),  then resize to m_{k+1}

with mixing resolutions m_k = r_{min(k+1, n-1)} (for 8/16/32/64: 32, 64, 64). The 1x1 projections
run at the feature's native resolution: a bias-free 1x1 conv commutes with bilinear resizing, so
this equals the official "upsample then project" while costing 4x fewer FLOPs at 17920 channels.

Normalisation: the official SegBlock uses affine-free BatchNorm (with spectral-normalised convs) on
batch-1 statistics, so train and eval differ. We use GroupNorm instead: batch-size
independent, identical in train and eval, no running statistics to carry. Spectral norm is left out.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from datasetdm_jax.models.group_norm import GroupNorm

# res -> (map_channels, attention_channels); attention channels are L*H*tokens (0 if none).
FeatureSpec = Mapping[int, tuple[int, int]]


def feature_spec(features) -> dict[int, tuple[int, int]]:
    """Reads the FeatureSpec off a `Features` pytree (or its shape-dtype structs)."""
    spec = {}
    for res, m in features.maps.items():
        a = features.cross_attention.get(res) if features.cross_attention else None
        spec[int(res)] = (int(m.shape[-1]), 0 if a is None else int(a.shape[-1] * a.shape[-2]))
    return spec


def resize(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """Bilinear NHWC resize matching torch `align_corners=False` (no antialias)."""
    h, w = (size, size) if isinstance(size, int) else size
    if x.shape[1:3] == (h, w):
        return x
    return jax.image.resize(x, (x.shape[0], h, w) + x.shape[3:], method="bilinear", antialias=False)


def _groups(c: int, max_groups: int = 32) -> int:
    return math.gcd(c, max_groups)


class SegBlock(nnx.Module):
    """Pre-activation residual block: u = ReLU(GN(x)); conv3x3(ReLU(GN(conv3x3(u)))) + shortcut(u)."""

    def __init__(self, cin: int, cout: int, *, dtype=None, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cin, _groups(cin), epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), padding=1, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(cout, _groups(cout), epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, dtype=dtype, rngs=rngs)
        # The official shortcut sees the activated input u (in-place ReLU), kept here.
        self.shortcut = nnx.Conv(cin, cout, (1, 1), dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        u = jax.nn.relu(self.norm1(x))
        h = self.conv2(jax.nn.relu(self.norm2(self.conv1(u))))
        return h + (self.shortcut(u) if self.shortcut is not None else u)


class PixelStem(nnx.Module):
    """Fuses `Features` into one high-res map (+ a 3-level memory for the transformer).

    `grow=False` (segmentation): every level is `hidden` wide. `grow=True` (depth/pose): widths
    accumulate (256 -> 512 -> 768 -> 1024 for 4 levels), as in the official depth/pose modules.
    """

    def __init__(self, spec: FeatureSpec, *, hidden: int = 256, grow: bool = False, dtype=None,
                 rngs: nnx.Rngs):
        self.res = tuple(sorted(int(r) for r in spec))
        if not self.res:
            raise ValueError("PixelStem needs at least one feature resolution")
        self.hidden = hidden
        self.proj = nnx.List([
            nnx.Conv(sum(spec[r]), hidden, (1, 1), use_bias=False, dtype=dtype, rngs=rngs) for r in self.res])
        blocks, width = [], hidden
        for _ in self.res[1:]:
            cin = width + hidden
            cout = cin if grow else hidden
            blocks.append(SegBlock(cin, cout, dtype=dtype, rngs=rngs))
            width = cout
        self.blocks = nnx.List(blocks)
        self.out_channels = width

    def _mix_res(self, k: int) -> int:
        return self.res[min(k + 1, len(self.res) - 1)]

    def __call__(self, features) -> tuple[jax.Array, list[jax.Array]]:
        """Returns (fused map at the highest res, [low, SegBlock outputs...] before resizing)."""
        def level(k: int) -> jax.Array:
            r = self.res[k]
            x = features.maps[r]
            a = features.cross_attention.get(r) if features.cross_attention else None
            if a is not None:
                x = jnp.concatenate([x, a.reshape(a.shape[:3] + (-1,)).astype(x.dtype)], axis=-1)
            return self.proj[k](x)

        x = resize(level(0), self._mix_res(1) if len(self.res) > 1 else self.res[0])
        stages = [x]
        for k in range(1, len(self.res)):
            x = resize(x, self._mix_res(k))
            x = self.blocks[k - 1](jnp.concatenate([resize(level(k), self._mix_res(k)), x], axis=-1))
            stages.append(x)
        return x, stages


def memory_levels(stages: list[jax.Array], mask_size: int) -> list[jax.Array]:
    """Three memory maps (coarse -> fine) at mask_size/8, /4, /2 (20/40/80 for 160).

    Sources as in the official code for 4 levels: the lifted low projection, then the first two
    SegBlock outputs; with fewer levels the last available one is repeated.
    """
    src = stages[:-1] if len(stages) > 3 else stages
    sizes = [max(1, mask_size // 8), max(1, mask_size // 4), max(1, mask_size // 2)]
    return [resize(src[min(i, len(src) - 1)], s) for i, s in enumerate(sizes)]
