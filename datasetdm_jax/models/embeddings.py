"""Diffusion timestep embeddings (sinusoidal projection + MLP), named like diffusers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal features (B,) -> (B, dim) in fp32, the layout SD checkpoints were trained with.

    Frequencies are exp(-log(max_period) * i / (half - freq_shift)); `flip_sin_to_cos` puts the
    cosines first (SD uses True). Odd `dim` gets one zero column at the end.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """`linear_1 -> SiLU -> linear_2`, mapping sinusoidal features to the resnets' temb width."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.linear_1 = nnx.Linear(in_channels, time_embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = nnx.Linear(time_embed_dim, time_embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))
