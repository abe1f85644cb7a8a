"""Standard downstream models, trained on generated (+ real) data to measure what the data is worth.

- ``DeepLabSegmenter``: a small DeepLabv3+-style network: a conv backbone of strided stages (output
  stride 8, the last stage dilated instead of strided), ASPP (1x1, dilated 3x3 at a few rates,
  image pooling), a decoder that fuses the upsampled ASPP output with the stride-4 skip, and
  bilinear upsampling of the logits to the input size.
- ``DepthNet``: a U-Net-style encoder-decoder predicting positive depth as ``exp(log depth)``.

Both use GroupNorm (no batch statistics: the train step stays a pure function of the params and
small per-device batches are fine), NHWC, and take images in [-1, 1]. Widths and rates come from
the config, so one class serves 64x64 shapes-world images on a CPU and 512x512 VOC on a TPU.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from datasetdm_jax.models.group_norm import GroupNorm

__all__ = ["DeepLabSegmenter", "DepthNet", "build_model"]


def _groups(ch: int) -> int:
    """Largest group count <= 8 that divides ``ch`` (GroupNorm needs a divisor)."""
    return next(g for g in (8, 4, 2, 1) if ch % g == 0)


class ConvNormAct(nnx.Module):
    """conv -> GroupNorm -> ReLU, the building block of both networks."""

    def __init__(self, cin: int, cout: int, *, kernel: int = 3, stride: int = 1, dilation: int = 1,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding="SAME",
                             kernel_dilation=(dilation, dilation), use_bias=False, dtype=dtype, rngs=rngs)
        self.norm = GroupNorm(cout, _groups(cout), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.norm(self.conv(x)))


class Stage(nnx.Module):
    """A strided (or dilated) conv followed by ``depth - 1`` residual conv blocks."""

    def __init__(self, cin: int, cout: int, *, stride: int, dilation: int = 1, depth: int = 2,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.down = ConvNormAct(cin, cout, stride=stride, dilation=1 if stride > 1 else dilation,
                                dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([ConvNormAct(cout, cout, dilation=dilation, dtype=dtype, rngs=rngs)
                                for _ in range(max(depth - 1, 0))])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.down(x)
        for b in self.blocks:
            x = x + b(x)
        return x


def _resize(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Bilinear resize of an NHWC tensor to ``hw`` (identity when already there)."""
    if tuple(x.shape[1:3]) == tuple(hw):
        return x
    return jax.image.resize(x, (x.shape[0], *hw, x.shape[-1]), method="bilinear")


class Backbone(nnx.Module):
    """Strided stages; ``stages`` = ((width, stride, dilation), ...). Returns every stage's output."""

    def __init__(self, stages: Sequence[Sequence[int]], *, depth: int = 2, dtype=jnp.float32, rngs: nnx.Rngs):
        mods, cin = [], 3
        for width, stride, dilation in stages:
            mods.append(Stage(cin, int(width), stride=int(stride), dilation=int(dilation), depth=depth,
                              dtype=dtype, rngs=rngs))
            cin = int(width)
        self.stages = nnx.List(mods)
        self.strides = tuple(math.prod(int(s[1]) for s in stages[:i + 1]) for i in range(len(stages)))

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        outs = []
        for s in self.stages:
            x = s(x)
            outs.append(x)
        return outs


class ASPP(nnx.Module):
    """Atrous spatial pyramid pooling: parallel 1x1, dilated 3x3 and global-pool branches, fused 1x1."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int], *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.branches = nnx.List([ConvNormAct(cin, cout, kernel=1, dtype=dtype, rngs=rngs)]
                                 + [ConvNormAct(cin, cout, dilation=int(r), dtype=dtype, rngs=rngs) for r in rates])
        self.pool = ConvNormAct(cin, cout, kernel=1, dtype=dtype, rngs=rngs)
        self.project = ConvNormAct(cout * (len(rates) + 2), cout, kernel=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        ys = [b(x) for b in self.branches]
        pooled = self.pool(jnp.mean(x, axis=(1, 2), keepdims=True))
        ys.append(jnp.broadcast_to(pooled, ys[0].shape))
        return self.project(jnp.concatenate(ys, axis=-1))


class DeepLabSegmenter(nnx.Module):
    """DeepLabv3+-style semantic segmenter: (B, H, W, 3) in [-1, 1] -> (B, H, W, num_classes) logits."""

    def __init__(self, num_classes: int, *, stages: Sequence[Sequence[int]] = ((16, 2, 1), (32, 2, 1),
                 (64, 2, 1), (96, 1, 2)), depth: int = 2, aspp_width: int = 64, aspp_rates: Sequence[int] = (2, 4, 6),
                 skip_stage: int = 1, skip_width: int = 24, decoder_width: int = 64,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_classes, self.skip_stage = int(num_classes), int(skip_stage)
        self.backbone = Backbone(stages, depth=depth, dtype=dtype, rngs=rngs)
        self.aspp = ASPP(int(stages[-1][0]), aspp_width, aspp_rates, dtype=dtype, rngs=rngs)
        self.skip = ConvNormAct(int(stages[skip_stage][0]), skip_width, kernel=1, dtype=dtype, rngs=rngs)
        self.fuse = nnx.List([ConvNormAct(aspp_width + skip_width, decoder_width, dtype=dtype, rngs=rngs),
                              ConvNormAct(decoder_width, decoder_width, dtype=dtype, rngs=rngs)])
        self.classifier = nnx.Conv(decoder_width, self.num_classes, (1, 1), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        feats = self.backbone(x)
        skip = self.skip(feats[self.skip_stage])
        y = _resize(self.aspp(feats[-1]), skip.shape[1:3])
        y = jnp.concatenate([y, skip], axis=-1)
        for f in self.fuse:
            y = f(y)
        return _resize(self.classifier(y), x.shape[1:3]).astype(jnp.float32)


class DepthNet(nnx.Module):
    """U-Net-style depth network: (B, H, W, 3) in [-1, 1] -> (B, H, W) positive depth.

    The stem is strided (``stem_stride``), the decoder predicts at that resolution and the result
    is upsampled bilinearly: full-resolution convs would cost most of the time for little gain.
    The last layer predicts log depth around ``log(init_depth)``, so training starts at a sensible
    scale whatever the dataset's units.
    """

    def __init__(self, *, widths: Sequence[int] = (16, 32, 64, 96), depth: int = 2, init_depth: float = 8.0,
                 stem_stride: int = 2, dtype=jnp.float32, rngs: nnx.Rngs):
        widths = [int(w) for w in widths]
        self.stem = ConvNormAct(3, widths[0], stride=int(stem_stride), dtype=dtype, rngs=rngs)
        self.down = nnx.List([Stage(widths[i], widths[i + 1], stride=2, depth=depth, dtype=dtype, rngs=rngs)
                              for i in range(len(widths) - 1)])
        self.up = nnx.List([ConvNormAct(widths[i + 1] + widths[i], widths[i], dtype=dtype, rngs=rngs)
                            for i in reversed(range(len(widths) - 1))])
        self.head = nnx.Conv(widths[0], 1, (3, 3), padding="SAME", dtype=dtype, rngs=rngs,
                             kernel_init=nnx.initializers.zeros,
                             bias_init=nnx.initializers.constant(math.log(float(init_depth))))

    def __call__(self, x: jax.Array) -> jax.Array:
        skips = [self.stem(x)]
        for d in self.down:
            skips.append(d(skips[-1]))
        y = skips.pop()
        for u in self.up:
            s = skips.pop()
            y = u(jnp.concatenate([_resize(y, s.shape[1:3]), s], axis=-1))
        log_depth = _resize(self.head(y), x.shape[1:3])
        return jnp.exp(log_depth[..., 0].astype(jnp.float32))


def build_model(task: str, model_cfg, num_classes: int, seed: int = 0) -> nnx.Module:
    """The downstream model for ``task`` ('semantic' or 'depth') from a config dict of its kwargs."""
    kw = dict(model_cfg)
    rngs = nnx.Rngs(int(seed))
    if task == "semantic":
        kw = {k: (tuple(tuple(s) for s in v) if k == "stages" else v) for k, v in kw.items()}
        return DeepLabSegmenter(int(num_classes), **kw, rngs=rngs)
    if task == "depth":
        return DepthNet(**kw, rngs=rngs)
    raise ValueError(f"downstream task must be 'semantic' or 'depth', got {task!r}")
