"""Stable Diffusion's UNet2DConditionModel in Flax NNX (NHWC), with optional feature capture.

Built from a diffusers `unet/config.json` dict (SD 1.x, 2.x and SDXL); attribute paths equal the
PyTorch state-dict keys so `convert.load_torch_state_dict` loads released weights. With
`capture=True` the call also returns the intermediates DatasetDM reads (see `features.py`):
`taps["maps"]` (28 tensors for SD 1.5, names like `down1.layer0`) and `taps["cross_attention"]`
(fp32 probabilities of every attn2, names like `up1.layer2.block0`), both in forward order.
With `attention=AttentionCapture.request(...)` it also returns the head-averaged self-attention
and class-prompt attention the training-free labeller reads (`labelers/attention.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from .abstract import abstract_module
from .attention import Kernel
from .clip_text import PromptEmbeds
from .embeddings import TimestepEmbedding, timestep_embedding
from .unet_blocks import (AttentionCapture, BlockSettings, DownBlock2D, Taps, UNetMidBlock2DCrossAttn, UpBlock2D,
                          apply_norm, conv, group_norm)

_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}

# Keys whose only supported value is the diffusers default (anything else changes the architecture).
_FIXED = {
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "act_fn": "silu",
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_type": "default",
    "cross_attention_norm": None,
    "class_embeddings_concat": False,
    "reverse_transformer_layers_per_block": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}


def _per_block(key: str, value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != n or not all(isinstance(v, int) for v in value):
            raise ValueError(f"unet config {key}={value!r}: expected an int or {n} ints (one per down block)")
        return tuple(value)
    if not isinstance(value, int):
        raise ValueError(f"unet config {key}={value!r}: expected an int or a list of ints")
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """Validated architecture of a diffusers UNet2DConditionModel (per-block values expanded)."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: tuple[int, ...] = (1280,) * 4
    num_attention_heads: tuple[int, ...] = (8,) * 4  # head COUNT per down block
    transformer_layers_per_block: tuple[int, ...] = (1,) * 4
    use_linear_projection: bool = False
    upcast_attention: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # SDXL's micro-conditioning ("text_time"): each of the 6 time ids gets `addition_time_embed_dim`
    # sinusoidal features; with the pooled text embedding they feed `add_embedding`
    # (`projection_class_embeddings_input_dim` = pooled dim + 6 * addition_time_embed_dim).
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNet2DConditionConfig":
        """Parses a diffusers unet config.json dict; unknown keys are ignored, unsupported values refused.

        diffusers quirk kept on purpose: when `num_attention_heads` is absent, `attention_head_dim`
        is the number of heads (SD 1.x: 8 heads everywhere; SD 2.x: [5, 10, 20, 20]).
        """
        get = lambda k, default: default if d.get(k) is None else d[k]
        for key, ok in _FIXED.items():
            value = d.get(key, ok)
            if key == "only_cross_attention" and isinstance(value, (list, tuple)):
                value = any(value)  # per-block list of False is fine
            if value != ok:
                raise ValueError(f"unet config {key}={d[key]!r} is not supported (only {ok!r})")
        if d.get("mid_block_only_cross_attention"):
            raise ValueError("unet config mid_block_only_cross_attention=True is not supported")
        down = tuple(get("down_block_types", cls.down_block_types))
        up = tuple(get("up_block_types", cls.up_block_types))
        for key, types, allowed in (("down_block_types", down, _DOWN_TYPES), ("up_block_types", up, _UP_TYPES)):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"unet config {key} has unsupported block type {bad[0]!r} (only {sorted(allowed)})")
        channels = tuple(get("block_out_channels", cls.block_out_channels))
        n = len(channels)
        if len(down) != n or len(up) != n:
            raise ValueError(f"unet config down_block_types/up_block_types need {n} entries (block_out_channels)")
        layers = get("layers_per_block", cls.layers_per_block)
        if not isinstance(layers, int):
            raise ValueError(f"unet config layers_per_block={layers!r}: only an int is supported")
        head_dim = get("attention_head_dim", 8)
        heads_key = "attention_head_dim" if d.get("num_attention_heads") is None else "num_attention_heads"
        heads = _per_block(heads_key, get("num_attention_heads", head_dim), n)
        tlayers = _per_block("transformer_layers_per_block", get("transformer_layers_per_block", 1), n)
        add_type = d.get("addition_embed_type")
        add_dim = d.get("addition_time_embed_dim")
        proj_dim = d.get("projection_class_embeddings_input_dim")
        if add_type not in (None, "text_time"):
            raise ValueError(f"unet config addition_embed_type={add_type!r} is not supported (only 'text_time')")
        if add_type == "text_time":
            for key, v in (("addition_time_embed_dim", add_dim), ("projection_class_embeddings_input_dim", proj_dim)):
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise ValueError(f"unet config {key}={v!r}: addition_embed_type 'text_time' needs a positive int")
            if proj_dim <= 6 * add_dim:
                raise ValueError(f"unet config projection_class_embeddings_input_dim={proj_dim} leaves no room for "
                                 f"the pooled text embedding beside 6 time ids x {add_dim}")
        groups = get("norm_num_groups", 32)
        for c in channels:
            if c % groups:
                raise ValueError(f"unet config norm_num_groups={groups} does not divide block_out_channels {channels}")
        for c, h, kind in zip(channels, heads, down):
            if _DOWN_TYPES[kind] and c % h:
                raise ValueError(f"unet config attention heads {h} do not divide block channels {c}")
        for key in ("conv_in_kernel", "conv_out_kernel"):
            if get(key, 3) % 2 != 1:
                raise ValueError(f"unet config {key}={d[key]!r}: only odd kernel sizes are supported")
        return cls(
            sample_size=get("sample_size", 64) if isinstance(get("sample_size", 64), int) else tuple(d["sample_size"]),
            in_channels=get("in_channels", 4),
            out_channels=get("out_channels", 4),
            center_input_sample=bool(get("center_input_sample", False)),
            flip_sin_to_cos=bool(get("flip_sin_to_cos", True)),
            freq_shift=get("freq_shift", 0),
            down_block_types=down,
            up_block_types=up,
            block_out_channels=channels,
            layers_per_block=layers,
            downsample_padding=get("downsample_padding", 1),
            mid_block_scale_factor=float(get("mid_block_scale_factor", 1.0)),
            norm_num_groups=groups,
            norm_eps=float(get("norm_eps", 1e-5)),
            cross_attention_dim=_per_block("cross_attention_dim", get("cross_attention_dim", 1280), n),
            num_attention_heads=heads,
            transformer_layers_per_block=tlayers,
            use_linear_projection=bool(get("use_linear_projection", False)),
            upcast_attention=bool(get("upcast_attention", False)),
            conv_in_kernel=get("conv_in_kernel", 3),
            conv_out_kernel=get("conv_out_kernel", 3),
            addition_embed_type=add_type,
            addition_time_embed_dim=add_dim if add_type else None,
            projection_class_embeddings_input_dim=proj_dim if add_type else None,
        )

    @property
    def pooled_dim(self) -> int | None:
        """Width of the pooled text embedding `text_embeds` an SDXL UNet takes (None without one)."""
        if self.addition_embed_type != "text_time":
            return None
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim


class UNet2DConditionModel(nnx.Module):
    """Text-conditioned noise predictor eps(x_t, t, text) on NHWC latents."""

    def __init__(self, config: UNet2DConditionConfig | Mapping[str, Any], *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if not isinstance(config, UNet2DConditionConfig):
            config = UNet2DConditionConfig.from_dict(config)
        cfg = self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch = cfg.block_out_channels
        temb = ch[0] * 4
        self.dtype = dtype
        self.conv_in = conv(cfg.in_channels, ch[0], cfg.conv_in_kernel, **kw)
        self.time_embedding = TimestepEmbedding(ch[0], temb, **kw)
        if cfg.addition_embed_type == "text_time":  # `add_time_proj` is parameter-free: a function here
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb, **kw)
        else:
            self.add_embedding = None

        def common(i: int) -> BlockSettings:
            return BlockSettings(temb, cfg.norm_num_groups, cfg.norm_eps, cfg.transformer_layers_per_block[i],
                           cfg.num_attention_heads[i], cfg.cross_attention_dim[i],
                           cfg.use_linear_projection, cfg.upcast_attention)

        n = len(ch)
        self.down_blocks = nnx.List([
            DownBlock2D(ch[max(i - 1, 0)], ch[i], num_layers=cfg.layers_per_block, common=common(i),
                        cross_attention=_DOWN_TYPES[kind], add_downsample=i < n - 1,
                        downsample_padding=cfg.downsample_padding, **kw)
            for i, kind in enumerate(cfg.down_block_types)
        ])
        self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], common=common(n - 1),
                                                 output_scale_factor=cfg.mid_block_scale_factor, **kw)
        rev = list(reversed(range(n)))
        ups = []
        for i, kind in enumerate(cfg.up_block_types):
            b = rev[i]  # down block mirrored by this up block: its heads, cross dim, transformer depth
            ups.append(UpBlock2D(ch[rev[min(i + 1, n - 1)]], ch[b], ch[rev[max(i - 1, 0)]],
                                 num_layers=cfg.layers_per_block + 1, common=common(b),
                                 cross_attention=_UP_TYPES[kind], add_upsample=i < n - 1, **kw))
        self.up_blocks = nnx.List(ups)
        self.conv_norm_out = group_norm(ch[0], cfg.norm_num_groups, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = conv(ch[0], cfg.out_channels, cfg.conv_out_kernel, **kw)

    def __call__(self, sample: jax.Array, timesteps: jax.Array | float,
                 encoder_hidden_states: jax.Array | PromptEmbeds, *, text_embeds: jax.Array | None = None,
                 time_ids: jax.Array | None = None,
                 capture: bool = False, attention_kernel: Kernel | None = None,
                 attention: AttentionCapture | None = None):
        """eps for `sample` (B, H, W, C_in) at `timesteps` (scalar or (B,)) given text tokens (B, T, D).

        An SDXL UNet (`addition_embed_type="text_time"`) also needs the pooled text embedding
        `text_embeds` (B, P) and the micro-conditioning `time_ids` (B, 6) or (6,): original (h, w),
        crop top-left (y, x), target (h, w), in pixels. `encoder_hidden_states` may be a
        `PromptEmbeds`, which carries all three (explicit `text_embeds` / `time_ids` win).

        With `capture=True` returns `(eps, {"maps": ..., "cross_attention": ...})`, two ordered dicts
        in forward order; cross-attention probabilities are then computed explicitly in fp32 ("xla"),
        self-attention keeps `attention_kernel` (None: `attention.get_attention_impl()`, "auto" by
        default). With `attention` (an `AttentionCapture.request`) the dict (returned even without
        `capture`) also holds its `self_attention` and `class_attention` lists; the requested
        self-attention layers then compute explicit probabilities too.
        """
        cfg = self.config
        if isinstance(encoder_hidden_states, PromptEmbeds):
            text_embeds = encoder_hidden_states.pooled if text_embeds is None else text_embeds
            time_ids = encoder_hidden_states.time_ids if time_ids is None else time_ids
            encoder_hidden_states = encoder_hidden_states.hidden
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if sample.shape[1] % factor or sample.shape[2] % factor:
            raise ValueError(f"latent size {sample.shape[1:3]} must be divisible by {factor}")
        b = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
        temb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  freq_shift=cfg.freq_shift)
        temb = self.time_embedding(temb.astype(self.dtype))
        if self.add_embedding is not None:
            temb = temb + self.add_embedding(self._added_embedding(b, text_embeds, time_ids).astype(self.dtype))
        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        context = encoder_hidden_states.astype(self.dtype)
        taps = Taps.empty() if capture else None
        if attention is not None:  # fresh lists: a request object may be reused across calls
            attention = attention._replace(self_attention=[], class_attention=[])

        x = self.conv_in(x)
        if taps is not None:
            taps.maps["conv_in"] = x
        skips = [x]
        for i, block in enumerate(self.down_blocks):
            x, s = block(x, temb, context, kernel=attention_kernel, taps=taps, name=f"down{i}", attention=attention)
            skips += s
        x = self.mid_block(x, temb, context, kernel=attention_kernel, taps=taps, name="mid", attention=attention)
        for i, block in enumerate(self.up_blocks):
            x = block(x, skips, temb, context, kernel=attention_kernel, taps=taps, name=f"up{i}",
                      attention=attention)
        x = self.conv_out(jax.nn.silu(apply_norm(self.conv_norm_out, x)))
        if taps is None and attention is None:
            return x
        out = {} if taps is None else {"maps": taps.maps, "cross_attention": taps.cross_attention}
        if attention is not None:
            out.update(self_attention=attention.self_attention, class_attention=attention.class_attention)
        return x, out


    def _added_embedding(self, b: int, text_embeds: jax.Array | None, time_ids: jax.Array | None) -> jax.Array:
        """[text_embeds | sinusoidal(time_ids)] (B, projection_class_embeddings_input_dim), fp32."""
        cfg = self.config
        if text_embeds is None or time_ids is None:
            raise ValueError("this UNet (addition_embed_type='text_time', SDXL) needs text_embeds and time_ids")
        if text_embeds.shape[-1] != cfg.pooled_dim:
            raise ValueError(f"text_embeds width {text_embeds.shape[-1]} != the UNet's pooled width {cfg.pooled_dim}")
        ids = jnp.broadcast_to(jnp.asarray(time_ids, jnp.float32).reshape(-1, 6), (b, 6))
        time = timestep_embedding(ids.reshape(-1), cfg.addition_time_embed_dim, flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  freq_shift=cfg.freq_shift).reshape(b, -1)
        pooled = jnp.broadcast_to(jnp.asarray(text_embeds, jnp.float32), (b, cfg.pooled_dim))
        return jnp.concatenate([pooled, time], axis=-1)


def count_params(model_or_config: nnx.Module | UNet2DConditionConfig | Mapping[str, Any]) -> int:
    """Number of parameters, built abstractly (no memory) when given a config."""
    if isinstance(model_or_config, nnx.Module):
        model = model_or_config
    else:
        model = abstract_module(lambda rngs: UNet2DConditionModel(model_or_config, rngs=rngs))
    return sum(int(v.size) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


__all__ = ["AttentionCapture", "UNet2DConditionConfig", "UNet2DConditionModel", "count_params"]
