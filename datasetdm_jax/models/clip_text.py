"""CLIP text encoders (transformers' `CLIPTextModel`, `CLIPTextModelWithProjection`) in Flax NNX.

SD 1.x/2.x condition on one `CLIPTextModel`; SDXL on two (`SDXLTextEncoders`): CLIP ViT-L and
OpenCLIP ViT-bigG with its projection head, whose penultimate hidden states are concatenated and
whose projected EOS token is the pooled embedding (`PromptEmbeds`).

Attribute paths follow the keys of the `text_encoder/model.safetensors` files shipped in diffusers
folders (`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...), so
`convert.load_torch_state_dict(model, sd, ignore={POSITION_IDS_KEY})` loads them unchanged.
Note that transformers >= 5 drops the `text_model.` prefix from its in-memory state dict; the
files on disk (and this module) keep it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import attend, attention_logits

# Non-parameter buffer present in older checkpoints; pass it to `load_torch_state_dict(ignore=...)`.
POSITION_IDS_KEY = "text_model.embeddings.position_ids"


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU (SD 1.x text encoder)."""
    return x * jax.nn.sigmoid(1.702 * x)


def _exact_gelu(x: jax.Array) -> jax.Array:
    # transformers' "gelu" is the erf form, not the tanh approximation (SD 2.x / OpenCLIP).
    return jax.nn.gelu(x, approximate=False)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"quick_gelu": quick_gelu, "gelu": _exact_gelu}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture fields of a transformers `CLIPTextModel` config.json (defaults = transformers')."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    projection_dim: int = 512  # CLIPTextModelWithProjection's text_projection width

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
        """Parses a config.json dict; unknown keys (dropout, ...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"CLIP text encoder: unsupported hidden_act {cfg.hidden_act!r} (use one of {sorted(_ACTIVATIONS)})"
            )
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"CLIP text encoder: hidden_size {cfg.hidden_size} is not divisible by "
                f"num_attention_heads {cfg.num_attention_heads}"
            )
        if not isinstance(cfg.eos_token_id, int):
            raise ValueError(f"CLIP text encoder: eos_token_id must be one int, got {cfg.eos_token_id!r}")
        return cfg


class CLIPTextOutput(NamedTuple):
    """`last_hidden_state` (B, L, C) after final_layer_norm; `pooler_output` (B, C) at the EOS token;
    `hidden_states` = (embeddings, layer 1, ..., layer N) without final_layer_norm, or None."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


def _layer_norm(dim: int, eps: float, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Computed in fp32 (dtype=float32); callers cast the result back to the compute dtype.
    return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)


class CLIPTextEmbeddings(nnx.Module):
    """Token plus learned absolute position embeddings."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        embed = lambda n: nnx.Embed(n, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embedding = embed(config.vocab_size)
        self.position_embedding = embed(config.max_position_embeddings)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        seq_len = input_ids.shape[-1]
        max_len = self.position_embedding.num_embeddings
        if seq_len > max_len:
            raise ValueError(f"CLIP text encoder: sequence length {seq_len} exceeds max_position_embeddings {max_len}")
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(seq_len))[None]


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention with q/k/v/out projections named as in transformers."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        dim = config.hidden_size
        linear = lambda: nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.head_dim = config.num_attention_heads, dim // config.num_attention_heads
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = linear(), linear(), linear(), linear()

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.heads, self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        causal = jnp.tril(jnp.ones((n, n), dtype=bool))
        logits = jnp.where(causal, attention_logits(q, k), jnp.finfo(jnp.float32).min)
        out = attend(jax.nn.softmax(logits, axis=-1), v).reshape(b, n, -1)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.fc1 = linear(config.hidden_size, config.intermediate_size)
        self.fc2 = linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.self_attn = CLIPAttention(config, **kw)
        self.layer_norm1 = _layer_norm(config.hidden_size, config.layer_norm_eps, param_dtype, rngs)
        self.mlp = CLIPMLP(config, **kw)
        self.layer_norm2 = _layer_norm(config.hidden_size, config.layer_norm_eps, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x).astype(self.dtype))
        return x + self.mlp(self.layer_norm2(x).astype(self.dtype))


class CLIPEncoder(nnx.Module):
    """The stack of encoder layers (`encoder.layers.{i}`)."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([CLIPEncoderLayer(config, **kw) for _ in range(config.num_hidden_layers)])


class CLIPTextTransformer(nnx.Module):
    """Embeddings, encoder and final LayerNorm (the `text_model.` prefix of checkpoint keys)."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, **kw)
        self.final_layer_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, param_dtype, rngs)


class CLIPTextModel(nnx.Module):
    """transformers' `CLIPTextModel` (no projection head), built from its config.json dict or config."""

    def __init__(
        self,
        config: CLIPTextConfig | Mapping[str, Any],
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config if isinstance(config, CLIPTextConfig) else CLIPTextConfig.from_dict(config)
        self.dtype = dtype
        self.text_model = CLIPTextTransformer(self.config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _run_layers(self, input_ids: jax.Array, num_layers: int, keep_all: bool):
        """Embeddings then the first `num_layers` layers; returns (last, all states or None)."""
        x = self.text_model.embeddings(input_ids).astype(self.dtype)
        states = [x] if keep_all else None
        for layer in list(self.text_model.encoder.layers)[:num_layers]:
            x = layer(x)
            if keep_all:
                states.append(x)
        return x, states

    def _final_norm(self, x: jax.Array) -> jax.Array:
        return self.text_model.final_layer_norm(x).astype(self.dtype)

    def __call__(self, input_ids: jax.Array, *, output_hidden_states: bool = False) -> CLIPTextOutput:
        """Encodes (B, L) int token ids; pooling follows transformers' EOS rule (see `eos_positions`)."""
        x, states = self._run_layers(input_ids, self.config.num_hidden_layers, output_hidden_states)
        last = self._final_norm(x)
        pooled = jnp.take_along_axis(last, self.eos_positions(input_ids)[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last, pooled, tuple(states) if output_hidden_states else None)

    def eos_positions(self, input_ids: jax.Array) -> jax.Array:
        """(B,) pooled-token index. Legacy configs with eos_token_id == 2 (before transformers PR
        #24773, e.g. SD's) take the largest token id, which is EOS in the CLIP vocabulary; others
        take the first position holding eos_token_id (padding may repeat it)."""
        if self.config.eos_token_id == 2:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)

    def _check_skip(self, clip_skip: int | None, extra: int = 0) -> int:
        n = self.config.num_hidden_layers - extra
        k = 0 if clip_skip is None else clip_skip
        if not 0 <= k <= n:
            raise ValueError(f"CLIP text encoder: clip_skip must be in [0, {n}], got {clip_skip}")
        return k

    def penultimate(self, input_ids: jax.Array, clip_skip: int | None = None) -> jax.Array:
        """`hidden_states[-(clip_skip + 2)]` (no final_layer_norm): SDXL's prompt embedding from
        this tower, as diffusers' SDXL pipelines take it; later layers are not computed."""
        k = self._check_skip(clip_skip, extra=1)
        return self._run_layers(input_ids, self.config.num_hidden_layers - 1 - k, keep_all=False)[0]

    def encode(self, input_ids: jax.Array, clip_skip: int | None = None) -> jax.Array:
        """The (B, L, C) prompt embedding Stable Diffusion conditions on.

        `clip_skip=None` (or 0) is `last_hidden_state`; `clip_skip=k` takes the output of layer N-k
        (`hidden_states[-(k+1)]`) through final_layer_norm, as diffusers pipelines do. The skipped
        layers are not computed. SD 2.x diffusers folders already ship the OpenCLIP tower with its
        last layer dropped (23 of 24 layers), so `clip_skip=None` is the right value for them.
        """
        k = self._check_skip(clip_skip)
        x, _ = self._run_layers(input_ids, self.config.num_hidden_layers - k, keep_all=False)
        return self._final_norm(x)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' `CLIPTextModelWithProjection`: the text tower plus `text_projection` (no bias)
    of the pooled EOS token (SDXL's second encoder, OpenCLIP ViT-bigG)."""

    def __init__(self, config: CLIPTextConfig | Mapping[str, Any], *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_projection = nnx.Linear(self.config.hidden_size, self.config.projection_dim, use_bias=False,
                                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def text_embeds(self, input_ids: jax.Array, *, output_hidden_states: bool = False):
        """(text_embeds (B, projection_dim), `CLIPTextOutput`), as transformers' forward."""
        out = self(input_ids, output_hidden_states=output_hidden_states)
        return self.text_projection(out.pooler_output), out

    def penultimate_and_pooled(self, input_ids: jax.Array, clip_skip: int | None = None):
        """(hidden_states[-(clip_skip + 2)], text_embeds): both SDXL reads from this tower, one pass."""
        k = self._check_skip(clip_skip, extra=1)
        n = self.config.num_hidden_layers
        x, states = self._run_layers(input_ids, n, keep_all=True)
        pooled = jnp.take_along_axis(self._final_norm(x), self.eos_positions(input_ids)[:, None, None], axis=1)[:, 0]
        return states[n - 1 - k], self.text_projection(pooled)


class PromptEmbeds(NamedTuple):
    """SDXL's conditioning: `hidden` (B, L, D1 + D2) token embeddings for cross-attention, `pooled`
    (B, P) and `time_ids` ((B, 6) or (6,): original size, crop corner, target size, in pixels; None
    until the image size is known) for the UNet's micro-conditioning. A UNet call takes it in place
    of the token embeddings (`UNet2DConditionModel.__call__`)."""

    hidden: jax.Array
    pooled: jax.Array
    time_ids: jax.Array | None = None


class SDXLTextEncoders:
    """SDXL's two text encoders used as one: `encode(ids)` with ids (B, 2, L) (row 0 from
    `tokenizer`, row 1 from `tokenizer_2`) -> `PromptEmbeds`, as diffusers' SDXL `encode_prompt`.
    A plain holder of two merged modules (inside jit, built from their (graphdef, state) pairs)."""

    def __init__(self, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection):
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2

    def encode(self, input_ids: jax.Array, clip_skip: int | None = None) -> PromptEmbeds:
        if input_ids.ndim != 3 or input_ids.shape[1] != 2:
            raise ValueError(f"SDXL text encoders take ids of shape (B, 2, L), got {input_ids.shape}")
        h1 = self.text_encoder.penultimate(input_ids[:, 0], clip_skip)
        h2, pooled = self.text_encoder_2.penultimate_and_pooled(input_ids[:, 1], clip_skip)
        return PromptEmbeds(jnp.concatenate([h1, h2.astype(h1.dtype)], axis=-1), pooled)
