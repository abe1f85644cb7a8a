"""Building blocks of the SD UNet (NHWC), attribute-named like diffusers so weights convert by name.

Capture is threaded explicitly: every block takes an optional `Taps` (two ordered dicts owned by
the caller of `UNet2DConditionModel.__call__`) plus its name prefix, and writes its intermediates
there. The attention labeller's request (`AttentionCapture`) is threaded the same way. With
`taps=None` and `attention=None` nothing extra is computed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import Attention, Identity, Kernel
from .group_norm import GroupNorm


class Taps(NamedTuple):
    """Captured intermediates: `maps` name -> (B, h, w, C); `cross_attention` name -> (B, H, hw, T) fp32."""

    maps: OrderedDict
    cross_attention: OrderedDict

    @classmethod
    def empty(cls) -> "Taps":
        return cls(OrderedDict(), OrderedDict())


class AttentionCapture(NamedTuple):
    """Head-averaged attention for the training-free labeller (Dataset Diffusion), per layer in forward order.

    Only the last `len(class_context)` rows of the batch are read (the conditional half of a CFG
    batch). Layers with `self_tokens` query positions append their self-attention (Bc, L, L);
    layers with `cross_tokens` positions append the softmax of their cross-attention queries
    against `class_context` keys (Bc, L, T), which never feeds the layer's output. fp32.
    """

    class_context: jax.Array
    self_tokens: int
    cross_tokens: int
    self_attention: list
    class_attention: list

    @classmethod
    def request(cls, class_context: jax.Array, self_tokens: int, cross_tokens: int) -> "AttentionCapture":
        return cls(class_context, int(self_tokens), int(cross_tokens), [], [])


def group_norm(channels: int, groups: int, eps: float, *, param_dtype, rngs: nnx.Rngs) -> GroupNorm:
    """GroupNorm computing in fp32 (call through `apply_norm` to cast back)."""
    return GroupNorm(channels, groups, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)


def layer_norm(channels: int, eps: float, *, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm computing in fp32 (call through `apply_norm` to cast back)."""
    return nnx.LayerNorm(
        channels, epsilon=eps, use_fast_variance=False, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs
    )


def apply_norm(norm: nnx.Module, x: jax.Array) -> jax.Array:
    """Normalises in fp32 and returns the input's dtype (bf16 statistics are too coarse)."""
    return norm(x.astype(jnp.float32)).astype(x.dtype)


def conv(cin: int, cout: int, k: int, *, stride: int = 1, padding: int | None = None,
         dtype, param_dtype, rngs) -> nnx.Conv:
    """k x k NHWC conv with symmetric padding (default 'same' for odd k)."""
    p = (k - 1) // 2 if padding is None else padding
    return nnx.Conv(
        cin, cout, kernel_size=(k, k), strides=(stride, stride), padding=((p, p), (p, p)),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-conv twice, timestep embedding added in between, 1x1 shortcut if widths differ."""

    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_channels: int | None,
                 groups: int = 32, eps: float = 1e-6, output_scale_factor: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        out = out_channels or in_channels
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.output_scale_factor = output_scale_factor
        self.norm1 = group_norm(in_channels, groups, eps, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = conv(in_channels, out, 3, **kw)
        self.time_emb_proj = nnx.Linear(temb_channels, out, **kw) if temb_channels else None
        self.norm2 = group_norm(out, groups, eps, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = conv(out, out, 3, **kw)
        self.conv_shortcut = conv(in_channels, out, 1, **kw) if in_channels != out else None

    def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
        h = self.conv1(jax.nn.silu(apply_norm(self.norm1, x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(apply_norm(self.norm2, h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv; padding 0 means pad right/bottom by one first (diffusers' convention)."""

    def __init__(self, channels: int, out_channels: int | None = None, *, padding: int = 1,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.padding = padding
        self.conv = conv(channels, out_channels or channels, 3, stride=2, padding=padding,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv(channels, out_channels or channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class GEGLU(nnx.Module):
    """Gated GELU: one projection to 2x width, half of it gates the other through exact GELU."""

    def __init__(self, dim: int, inner: int, *, dtype, param_dtype, rngs):
        self.proj = nnx.Linear(dim, 2 * inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """`net = [GEGLU, Dropout placeholder, Linear]`, indices as in the PyTorch Sequential."""

    def __init__(self, dim: int, *, mult: int = 4, dtype, param_dtype, rngs):
        inner = dim * mult
        self.net = nnx.List([
            GEGLU(dim, inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
            Identity(),
            nnx.Linear(inner, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        ])

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-norm self-attention, cross-attention to the text tokens, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, cross_attention_dim: int, upcast_attention: bool,
                 dtype, param_dtype, rngs):
        att = dict(heads=heads, dim_head=dim_head, upcast_attention=upcast_attention,
                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(dim, 1e-5, param_dtype=param_dtype, rngs=rngs)
        self.attn1 = Attention(dim, **att)
        self.norm2 = layer_norm(dim, 1e-5, param_dtype=param_dtype, rngs=rngs)
        self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **att)
        self.norm3 = layer_norm(dim, 1e-5, param_dtype=param_dtype, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, context, *, kernel: Kernel | None = None, capture: bool = False,
                 attention: AttentionCapture | None = None):
        """Returns (tokens, cross-attention probabilities (B, H, L, T) fp32 or None)."""
        h = apply_norm(self.norm1, x)
        if attention is not None and x.shape[1] == attention.self_tokens:
            a, self_probs = self.attn1(h, return_probs=True)
            attention.self_attention.append(self_probs[-attention.class_context.shape[0]:].mean(axis=1))
        else:
            a = self.attn1(h, kernel=kernel)
        x = a + x
        h = apply_norm(self.norm2, x)
        if attention is not None and x.shape[1] == attention.cross_tokens:
            rows = h[-attention.class_context.shape[0]:]
            attention.class_attention.append(self.attn2.probabilities(rows, attention.class_context).mean(axis=1))
        if capture:
            a, probs = self.attn2(h, context, return_probs=True)
        else:
            a, probs = self.attn2(h, context, kernel=kernel), None
        x = a + x
        x = self.ff(apply_norm(self.norm3, x)) + x
        return x, probs


class Transformer2DModel(nnx.Module):
    """Spatial transformer: GroupNorm, proj_in (1x1 conv or linear), transformer blocks, proj_out, residual."""

    def __init__(self, heads: int, dim_head: int, in_channels: int, *, num_layers: int, cross_attention_dim: int,
                 norm_num_groups: int, use_linear_projection: bool, upcast_attention: bool,
                 dtype, param_dtype, rngs):
        inner = heads * dim_head
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.use_linear_projection = use_linear_projection
        self.norm = group_norm(in_channels, norm_num_groups, 1e-6, param_dtype=param_dtype, rngs=rngs)
        if use_linear_projection:
            self.proj_in = nnx.Linear(in_channels, inner, **kw)
        else:
            self.proj_in = conv(in_channels, inner, 1, **kw)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim=cross_attention_dim,
                                  upcast_attention=upcast_attention, **kw)
            for _ in range(num_layers)
        ])
        if use_linear_projection:
            self.proj_out = nnx.Linear(inner, in_channels, **kw)
        else:
            self.proj_out = conv(inner, in_channels, 1, **kw)

    def __call__(self, x, context, *, kernel: Kernel | None = None, capture: bool = False,
                 attention: AttentionCapture | None = None):
        """Returns (x + transformer(x), list of per-block cross-attention probabilities or Nones)."""
        b, hh, ww, c = x.shape
        h = apply_norm(self.norm, x)
        if self.use_linear_projection:
            h = self.proj_in(h.reshape(b, hh * ww, c))
        else:
            h = self.proj_in(h)
            h = h.reshape(b, hh * ww, h.shape[-1])
        probs = []
        for block in self.transformer_blocks:
            h, p = block(h, context, kernel=kernel, capture=capture, attention=attention)
            probs.append(p)
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(b, hh, ww, c)
        else:
            h = self.proj_out(h.reshape(b, hh, ww, h.shape[-1]))
        return h + x, probs


class BlockSettings(NamedTuple):
    """Constructor arguments every UNet block shares."""

    temb_channels: int
    groups: int
    eps: float
    transformer_layers: int
    heads: int
    cross_attention_dim: int
    use_linear_projection: bool
    upcast_attention: bool


def _transformer(common: BlockSettings, channels: int, kw) -> Transformer2DModel:
    return Transformer2DModel(
        common.heads, channels // common.heads, channels, num_layers=common.transformer_layers,
        cross_attention_dim=common.cross_attention_dim, norm_num_groups=common.groups,
        use_linear_projection=common.use_linear_projection, upcast_attention=common.upcast_attention, **kw,
    )


def _record_attention(taps: Taps | None, name: str, probs: list) -> None:
    if taps is not None:
        for k, p in enumerate(probs):
            taps.cross_attention[f"{name}.block{k}"] = p


class DownBlock2D(nnx.Module):
    """`num_layers` resnets (+ transformers when `cross_attention`), then an optional stride-2 conv."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, common: BlockSettings,
                 cross_attention: bool, add_downsample: bool, downsample_padding: int,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=common.temb_channels,
                          groups=common.groups, eps=common.eps, **kw)
            for i in range(num_layers)
        ])
        if cross_attention:
            self.attentions = nnx.List([_transformer(common, out_channels, kw) for _ in range(num_layers)])
        else:
            self.attentions = None
        if add_downsample:
            self.downsamplers = nnx.List([Downsample2D(out_channels, out_channels, padding=downsample_padding, **kw)])
        else:
            self.downsamplers = None

    def __call__(self, x, temb, context, *, kernel: Kernel | None = None, taps: Taps | None = None, name: str = "down",
                 attention: AttentionCapture | None = None):
        """Returns (x, skip tensors for the up path: each layer's output, then the downsampled one)."""
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x, probs = self.attentions[j](x, context, kernel=kernel, capture=taps is not None,
                                              attention=attention)
                _record_attention(taps, f"{name}.layer{j}", probs)
            if taps is not None:
                taps.maps[f"{name}.layer{j}"] = x
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            if taps is not None:
                taps.maps[f"{name}.downsample"] = x
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet, then (transformer, resnet) pairs, at the lowest resolution."""

    def __init__(self, channels: int, *, common: BlockSettings, num_layers: int = 1, output_scale_factor: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(channels, channels, temb_channels=common.temb_channels, groups=common.groups,
                          eps=common.eps, output_scale_factor=output_scale_factor, **kw)
            for _ in range(num_layers + 1)
        ])
        self.attentions = nnx.List([_transformer(common, channels, kw) for _ in range(num_layers)])

    def __call__(self, x, temb, context, *, kernel: Kernel | None = None, taps: Taps | None = None, name: str = "mid",
                 attention: AttentionCapture | None = None):
        x = self.resnets[0](x, temb)
        for j, (attn, resnet) in enumerate(zip(self.attentions, self.resnets[1:])):
            x, probs = attn(x, context, kernel=kernel, capture=taps is not None, attention=attention)
            _record_attention(taps, f"{name}.layer{j}", probs)
            x = resnet(x, temb)
        if taps is not None:
            taps.maps[name] = x
        return x


class UpBlock2D(nnx.Module):
    """`num_layers` resnets on [x | skip] (+ transformers when `cross_attention`), then optional 2x upsampling."""

    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, *, num_layers: int,
                 common: BlockSettings, cross_attention: bool, add_upsample: bool,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            rin = prev_output_channel if i == 0 else out_channels
            resnets.append(ResnetBlock2D(rin + skip, out_channels, temb_channels=common.temb_channels,
                                         groups=common.groups, eps=common.eps, **kw))
        self.resnets = nnx.List(resnets)
        if cross_attention:
            self.attentions = nnx.List([_transformer(common, out_channels, kw) for _ in range(num_layers)])
        else:
            self.attentions = None
        self.upsamplers = nnx.List([Upsample2D(out_channels, out_channels, **kw)]) if add_upsample else None

    def __call__(self, x, skips: list, temb, context, *, kernel: Kernel | None = None, taps: Taps | None = None,
                 name: str = "up", attention: AttentionCapture | None = None):
        """Consumes the last `len(resnets)` skips (popped from the end of `skips`, in place)."""
        for j, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if self.attentions is not None:
                x, probs = self.attentions[j](x, context, kernel=kernel, capture=taps is not None,
                                              attention=attention)
                _record_attention(taps, f"{name}.layer{j}", probs)
            if taps is not None:
                taps.maps[f"{name}.layer{j}"] = x
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
            if taps is not None:
                taps.maps[f"{name}.upsample"] = x
        return x
