"""Multi-head attention shared by the UNet and the VAE, named like diffusers' `Attention`.

Two kernels sit behind one function: plain dot-product (always used when the probabilities are
wanted, e.g. for captured cross-attention maps) and `jax.nn.dot_product_attention`, which picks a
fused kernel where the backend has one (cuDNN flash attention on GPU) and falls back to XLA.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

Kernel = Literal["dot", "fused"]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool = True):
    """softmax(q k^T / sqrt(d)) v over (B, L, H, D) inputs; returns (out, probs (B, H, Lq, Lk))."""
    scale = q.shape[-1] ** -0.5
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return out, probs


def multi_head_attention(q, k, v, *, kernel: Kernel = "dot", upcast: bool = True) -> jax.Array:
    """Attention output for (B, L, H, D) inputs with the chosen kernel."""
    if kernel == "fused":
        return jax.nn.dot_product_attention(q, k, v)
    return dot_product_attention(q, k, v, upcast=upcast)[0]


class Identity(nnx.Module):
    """Parameter-free placeholder keeping PyTorch `Sequential` indices (e.g. a Dropout)."""

    def __call__(self, x):
        return x


class Attention(nnx.Module):
    """diffusers-style attention: `to_q`, `to_k`, `to_v`, `to_out[0]` on (B, L, C) tokens."""

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = True,
        upcast_attention: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        linear = lambda i, o, b: nnx.Linear(i, o, use_bias=b, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.dim_head, self.upcast_attention = heads, dim_head, upcast_attention
        self.to_q = linear(query_dim, inner, qkv_bias)
        self.to_k = linear(kv_dim, inner, qkv_bias)
        self.to_v = linear(kv_dim, inner, qkv_bias)
        self.to_out = nnx.List([linear(inner, query_dim, out_bias), Identity()])

    def __call__(self, x, context=None, *, kernel: Kernel = "dot", return_probs: bool = False):
        """Returns the attended tokens, and (B, H, Lq, Lk) fp32 probabilities if `return_probs`."""
        context = x if context is None else context
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.dim_head)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        if return_probs:
            out, probs = dot_product_attention(q, k, v, upcast=True)
        else:
            out, probs = multi_head_attention(q, k, v, kernel=kernel, upcast=self.upcast_attention), None
        out = self.to_out[0](out.reshape(*out.shape[:2], -1))
        return (out, probs) if return_probs else out

    def probabilities(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """fp32 (B, H, Lq, Lk) softmax of `x`'s queries against `context`'s keys, no values.

        The attention labeller reads queries against a second key set (the class prompt) that must
        not change the layer's output, so only the probabilities are computed.
        """
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.dim_head)
        q, k = split(self.to_q(x)).astype(jnp.float32), split(self.to_k(context)).astype(jnp.float32)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.dim_head ** -0.5
        return jax.nn.softmax(logits, axis=-1)
