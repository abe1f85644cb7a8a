"""Multi-head attention shared by the UNet and the VAE, named like diffusers' `Attention`.

One dispatch function, `multi_head_attention`, picks the kernel for attention whose probabilities
nobody reads ("impl"):

* "xla": `softmax_attention` below, exp-matmul-divide in XLA ops; every captured layer uses
  `dot_product_attention` instead (softmax then matmul: the P-Decoder's cross-attention maps and
  the attention labeller need the probabilities);
* "dot_product": `jax.nn.dot_product_attention`, which picks cuDNN flash attention on GPU where
  shapes and dtypes allow and falls back to XLA elsewhere;
* "splash": the Pallas TPU splash-attention kernel (interpret mode off TPU, for tests), head dim
  zero-padded to a multiple of 128; used where both sequence lengths are multiples of 128
  (long self-attention), other calls fall back to "xla". XLA cannot split a Pallas call over
  devices, so under a context mesh with a ``data`` axis (``jax.set_mesh``; the project's jitted
  programs run under their mesh, ``devices.MeshJit``) the kernel runs per device on its slice of
  the batch (``jax.shard_map``);
* "auto" (default): "splash" on TPU (one device, or any count under a context mesh),
  "dot_product" on GPU, "xla" elsewhere.

The default is module-wide (`set_attention_impl`, or the env var DATASETDM_ATTENTION_IMPL) and
read at trace time: set it before the first jit of a model. Fused kernels, like diffusers' SDPA
processor, ignore `upcast_attention` (they accumulate in fp32 anyway).
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from datasetdm_jax import devices

Kernel = Literal["auto", "xla", "dot_product", "splash"]
IMPLS: tuple[str, ...] = ("auto", "xla", "dot_product", "splash")
_SPLASH_LANES = 128  # splash tiles: sequence blocks and head dim in multiples of this


def _check(impl: str, where: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{where}: attention impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return impl


_default: str = _check(os.environ.get("DATASETDM_ATTENTION_IMPL", "auto"), "env DATASETDM_ATTENTION_IMPL")


def set_attention_impl(impl: Kernel) -> None:
    """Sets the module-wide default kernel for uncaptured attention (takes effect at the next trace)."""
    global _default
    _default = _check(impl, "set_attention_impl")


def get_attention_impl() -> str:
    return _default


def resolve_impl(impl: Kernel | None = None) -> str:
    """The concrete kernel for `impl` (None: the module default); "auto" picks by backend."""
    impl = _check(impl or _default, "attention impl")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "tpu" and (jax.device_count() == 1 or devices.data_axis_size() > 1):  # see splash_attention
        return "splash"
    return "dot_product" if backend == "gpu" else "xla"


def _heads_first(x: jax.Array) -> jax.Array:
    """(B, L, H, D) -> (B, H, L, D): batched matmuls with leading batch dims. XLA's CPU backend ran
    the head-interleaved einsum 5x slower at the shapes model's 16x16 self-attention (docs/benchmarks.md)."""
    return jnp.transpose(x, (0, 2, 1, 3))


def attention_logits(q: jax.Array, k: jax.Array, *, upcast: bool = True) -> jax.Array:
    """fp32 (B, H, Lq, Lk) scaled logits q k^T / sqrt(d) of (B, L, H, D) queries and keys."""
    dtype = jnp.float32 if upcast else q.dtype
    # q is scaled before the matmul: a scale after it became a materialised (B, H, Lq, Lk) constant
    # operand of XLA CPU's fused matmul (10 ms a layer at the shapes model's 16x16 self-attention).
    q = (q.astype(jnp.float32) * q.shape[-1] ** -0.5).astype(dtype)
    return jnp.einsum("bhqd,bhkd->bhqk", _heads_first(q), _heads_first(k.astype(dtype))).astype(jnp.float32)


def attend(weights: jax.Array, v: jax.Array) -> jax.Array:
    """(B, H, Lq, Lk) weights times (B, Lk, H, D) values -> (B, Lq, H, D)."""
    return _heads_first(jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), _heads_first(v)))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool = True):
    """softmax(q k^T / sqrt(d)) v over (B, L, H, D) inputs; returns (out, probs (B, H, Lq, Lk))."""
    probs = jax.nn.softmax(attention_logits(q, k, upcast=upcast), axis=-1)
    return attend(probs, v), probs


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool = True) -> jax.Array:
    """The output of `dot_product_attention` without materialising the probabilities: exp(logits - max)
    times v, divided by the row sums afterwards (as flash attention does); 4x faster than softmax
    then matmul on the CPU at the shapes model's 16x16 self-attention."""
    logits = attention_logits(q, k, upcast=upcast)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out = attend(weights, v).astype(jnp.float32) / _heads_first(jnp.sum(weights, axis=-1, keepdims=True))
    return out.astype(v.dtype)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, lq: int, lk: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    block = lambda n: next(b for b in (512, 256, 128) if n % b == 0)
    bq, bk = block(lq), block(lk)
    mask = sa.MultiHeadMask([sa.FullMask((lq, lk)) for _ in range(heads)])
    sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk)
    with jax.ensure_compile_time_eval():  # concrete mask arrays, safe to cache across traces
        return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_fits(q: jax.Array, k: jax.Array) -> bool:
    """Whether the splash kernel takes these shapes (both sequence lengths multiples of 128)."""
    return q.shape[1] % _SPLASH_LANES == 0 and k.shape[1] % _SPLASH_LANES == 0


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool | None = None) -> jax.Array:
    """Pallas splash attention over (B, L, H, D) inputs, D zero-padded to a multiple of 128.

    Zero columns leave q k^T unchanged and give zero output columns, which are cut off. The
    kernel does not scale: q is scaled by 1/sqrt(D) (the unpadded D) first.
    """
    d = q.shape[-1]
    pad = -d % _SPLASH_LANES
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    kern = _splash_kernel(q.shape[2], q.shape[1], k.shape[1], interpret)
    prep = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad))).transpose(0, 2, 1, 3)  # (B, H, L, D')
    q = (q.astype(jnp.float32) * d ** -0.5).astype(v.dtype)

    def per_device(q, k, v):
        return jax.vmap(kern)(prep(q), prep(k.astype(v.dtype)), prep(v))[..., :d].transpose(0, 2, 1, 3)

    n = devices.data_axis_size()
    if n > 1 and q.shape[0] % n == 0:  # each device its rows of the batch, as the mesh lays them out
        spec = jax.sharding.PartitionSpec("data")
        per_device = jax.shard_map(per_device, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return per_device(q, k, v)


def multi_head_attention(q, k, v, *, kernel: Kernel | None = None, upcast: bool = True) -> jax.Array:
    """Attention output for (B, L, H, D) inputs with the chosen kernel (None: the module default)."""
    impl = resolve_impl(kernel)
    if impl == "dot_product":
        return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype))
    if impl == "splash" and splash_fits(q, k):
        return splash_attention(q, k, v)
    return softmax_attention(q, k, v, upcast=upcast)


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

    def __call__(self, x, context=None, *, kernel: Kernel | None = None, return_probs: bool = False):
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
        logits = attention_logits(split(self.to_q(x)), split(self.to_k(context)), upcast=True)
        return jax.nn.softmax(logits, axis=-1)
