"""AutoencoderKL (the SD VAE) in Flax NNX, NHWC, attribute-named like diffusers' state dict.

Only the VAE flavour Stable Diffusion uses is supported: `DownEncoderBlock2D` / `UpDecoderBlock2D`
stacks, SiLU, GroupNorm, a single-head self-attention in each mid block. Latent scaling
(`scaling_factor`, `shift_factor`) is the pipeline's job; the values are exposed on the config.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import Attention
from .unet_blocks import Downsample2D, ResnetBlock2D, Upsample2D, apply_norm, conv, group_norm

_EPS = 1e-6  # diffusers hard-codes this for every VAE norm


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The fields of diffusers' `vae/config.json` that shape the model (defaults are diffusers')."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # The weights overflow in float16 (SDXL's VAE): pipelines run this VAE in float32 when asked
    # for float16, as diffusers does.
    force_upcast: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AutoencoderKLConfig":
        """Parses a diffusers config dict; unknown keys are ignored, unsupported values refused."""
        boc = tuple(int(c) for c in d.get("block_out_channels", cls.block_out_channels))
        n = len(boc)
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(d.get(key, (want,) * n))
            if any(t != want for t in types):
                raise ValueError(f"{key}: only {want} is supported, got {list(types)}")
            if len(types) != n:
                raise ValueError(f"{key}: {len(types)} entries but block_out_channels has {n}")
        if d.get("act_fn", "silu") != "silu":
            raise ValueError(f"act_fn: only 'silu' is supported, got {d['act_fn']!r}")
        if d.get("norm_type", "group") != "group":
            raise ValueError(f"norm_type: only 'group' is supported, got {d['norm_type']!r}")
        groups = int(d.get("norm_num_groups", cls.norm_num_groups))
        if any(c % groups for c in boc):
            raise ValueError(f"norm_num_groups: {groups} does not divide block_out_channels {list(boc)}")
        shift = d.get("shift_factor")
        return cls(
            in_channels=int(d.get("in_channels", cls.in_channels)),
            out_channels=int(d.get("out_channels", cls.out_channels)),
            block_out_channels=boc,
            layers_per_block=int(d.get("layers_per_block", cls.layers_per_block)),
            latent_channels=int(d.get("latent_channels", cls.latent_channels)),
            norm_num_groups=groups,
            sample_size=int(d.get("sample_size", cls.sample_size)),
            scaling_factor=float(d.get("scaling_factor", cls.scaling_factor)),
            shift_factor=None if shift is None else float(shift),
            use_quant_conv=bool(d.get("use_quant_conv", True)),
            use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(d.get("mid_block_add_attention", True)),
            force_upcast=bool(d.get("force_upcast", True)),
        )

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)


class VAEAttention(Attention):
    """The VAE's mid-block attention: GroupNorm, one head over all channels, residual added.

    Extends the shared `Attention` (same to_q/to_k/to_v/to_out.0 names) with the `group_norm`
    that diffusers keeps inside the attention module; works on NHWC maps, not tokens.
    """

    def __init__(self, channels: int, *, groups: int, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(channels, heads=1, dim_head=channels, qkv_bias=True, out_bias=True,
                         upcast_attention=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = group_norm(channels, groups, _EPS, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # type: ignore[override]
        b, h, w, c = x.shape
        tokens = apply_norm(self.group_norm, x).reshape(b, h * w, c)
        return x + super().__call__(tokens).reshape(b, h, w, c)


class UNetMidBlock2D(nnx.Module):
    """resnet, then (attention, resnet) once: the VAE's bottleneck, without time embedding."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        res = lambda: ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=_EPS, **kw)
        self.attentions = nnx.List([VAEAttention(channels, groups=groups, **kw)] if add_attention else [])
        self.resnets = nnx.List([res(), res()])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x, None)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x, None)


class DownEncoderBlock2D(nnx.Module):
    """`num_layers` resnets then an optional stride-2 conv with diffusers' right/bottom padding."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, add_downsample: bool,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                          groups=groups, eps=_EPS, **kw)
            for i in range(num_layers)
        ])
        self.downsamplers = nnx.List([Downsample2D(out_channels, padding=0, **kw)] if add_downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x, None)
        for d in self.downsamplers:
            x = d(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    """`num_layers` resnets then an optional nearest x2 upsample + conv."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, add_upsample: bool,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                          groups=groups, eps=_EPS, **kw)
            for i in range(num_layers)
        ])
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)] if add_upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x, None)
        for u in self.upsamplers:
            x = u(x)
        return x


class Encoder(nnx.Module):
    """Image (B, H, W, in) -> (B, H/f, W/f, 2 * latent) concatenated mean and log-variance."""

    def __init__(self, cfg: AutoencoderKLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        boc, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv(cfg.in_channels, boc[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(boc[max(i - 1, 0)], c, num_layers=cfg.layers_per_block, groups=g,
                               add_downsample=i < len(boc) - 1, **kw)
            for i, c in enumerate(boc)
        ])
        self.mid_block = UNetMidBlock2D(boc[-1], groups=g, add_attention=cfg.mid_block_add_attention, **kw)
        self.conv_norm_out = group_norm(boc[-1], g, _EPS, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = conv(boc[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(apply_norm(self.conv_norm_out, x)))


class Decoder(nnx.Module):
    """Latent (B, h, w, latent) -> image (B, h*f, w*f, out); up blocks have one resnet more than down."""

    def __init__(self, cfg: AutoencoderKLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rev, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = conv(cfg.latent_channels, rev[0], 3, **kw)
        self.mid_block = UNetMidBlock2D(rev[0], groups=g, add_attention=cfg.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(rev[max(i - 1, 0)], c, num_layers=cfg.layers_per_block + 1, groups=g,
                             add_upsample=i < len(rev) - 1, **kw)
            for i, c in enumerate(rev)
        ])
        self.conv_norm_out = group_norm(rev[-1], g, _EPS, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = conv(rev[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z: jax.Array, capture: bool = False):
        """``capture``: also return each up block's output, {"up{i}": (B, h_i, w_i, C_i)} (after its
        upsampler), the decoder features a P-Decoder can read above the latent resolution."""
        x = self.mid_block(self.conv_in(z))
        taps = {}
        for i, block in enumerate(self.up_blocks):
            x = block(x)
            taps[f"up{i}"] = x
        image = self.conv_out(jax.nn.silu(apply_norm(self.conv_norm_out, x)))
        return (image, taps) if capture else image


class AutoencoderKL(nnx.Module):
    """SD's KL-regularised autoencoder; `encode` gives Gaussian moments, `decode` maps latents back."""

    def __init__(self, config: AutoencoderKLConfig | Mapping[str, Any], *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        cfg = config if isinstance(config, AutoencoderKLConfig) else AutoencoderKLConfig.from_dict(config)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.dtype = dtype
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        lat = cfg.latent_channels
        self.quant_conv = conv(2 * lat, 2 * lat, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(lat, lat, 1, **kw) if cfg.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """NHWC image in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent), logvar clipped to [-30, 20]."""
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array, capture: bool = False):
        """Unscaled NHWC latents -> NHWC image (nominally [-1, 1], not clipped); with ``capture``,
        (image, the decoder's up-block outputs) (see `Decoder`)."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, capture=capture)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction: decode the posterior mean, or a sample from it when `key` is given."""
        mean, logvar = self.encode(x)
        return self.decode(mean if key is None else sample_latent(mean, logvar, key))


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """One draw from the diagonal Gaussian posterior N(mean, exp(logvar)), noise drawn in fp32."""
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps).astype(mean.dtype)


# Old diffusers checkpoints (the deprecated `AttentionBlock`) name the mid-block attention
# projections differently; group_norm kept its name.
LEGACY_KEY_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTN = re.compile(r"(^|\.)(attentions\.\d+\.)(query|key|value|proj_attn)\.")


def rename_legacy_vae_key(key: str) -> str:
    """`...attentions.0.query.weight` -> `...attentions.0.to_q.weight` (other keys unchanged)."""
    return _LEGACY_ATTN.sub(lambda m: f"{m.group(1)}{m.group(2)}{LEGACY_KEY_RENAMES[m.group(3)]}.", key)


_ATTN_PROJ_WEIGHT = re.compile(r"(^|\.)attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def prepare_vae_state_dict(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Normalises a diffusers-layout VAE state dict before `convert.load_torch_state_dict`.

    Renames legacy attention keys, and squeezes attention projections stored as (C, C, 1, 1)
    1x1-conv weights (as in checkpoints converted from the original LDM code, where the VAE
    attention was built from 1x1 convs) to the (C, C) Linear weights the model expects.
    """
    out = {}
    for key, value in sd.items():
        key = rename_legacy_vae_key(key)
        shape = tuple(value.shape)
        if _ATTN_PROJ_WEIGHT.search(key) and len(shape) == 4 and shape[2:] == (1, 1):
            value = value.reshape(shape[:2])
        out[key] = value
    return out
