"""Mask2Former-style segmentation P-Decoder (the official decoder, with
open-vocabulary queries).

Pixel stem -> mask features (mask_size^2) + 3 memory levels; L layers of masked cross-attention
(memory level i % 3) -> self-attention -> FFN, post-norm. Predictions (class logits, mask logits)
are made before layer 1 and after every layer and all are returned, stacked on a leading axis, so
the criterion can add deep supervision (the official decoder returns only the last one).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from datasetdm_jax.decoders.pixel_stem import FeatureSpec, PixelStem, memory_levels, resize


def sine_position_encoding(h: int, w: int, dim: int, temperature: float = 1e4) -> jax.Array:
    """2-D sine encoding (h*w, dim): dim/2 features per axis (y then x), normalised to 2*pi."""
    f = dim // 2
    scale = 2 * math.pi
    y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h * scale
    x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w * scale
    dim_t = temperature ** (2 * (jnp.arange(f) // 2) / f)

    def enc(v):
        p = v[:, None] / dim_t
        return jnp.where(jnp.arange(f) % 2 == 0, jnp.sin(p), jnp.cos(p))  # sin on even, cos on odd

    py, px = enc(y), enc(x)
    return jnp.concatenate([jnp.broadcast_to(py[:, None], (h, w, f)), jnp.broadcast_to(px[None], (h, w, f))],
                           axis=-1).reshape(h * w, 2 * f)


class Attention(nnx.Module):
    """Multi-head attention with an optional boolean mask (True = may attend); softmax in fp32."""

    def __init__(self, dim: int, heads: int, *, dtype=None, rngs: nnx.Rngs):
        self.heads = heads
        self.q = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.k = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.v = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, q, k, v, mask=None):
        b, nq, d = q.shape
        hd = d // self.heads
        split = lambda t, n: t.reshape(b, n, self.heads, hd)
        q, k, v = split(self.q(q), nq), split(self.k(k), k.shape[1]), split(self.v(v), v.shape[1])
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
        if mask is not None:
            logits = jnp.where(mask[:, None], logits, -1e9)
        p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, nq, d))


class DecoderLayer(nnx.Module):
    """Masked cross-attention -> self-attention -> FFN, each residual + LayerNorm (post-norm)."""

    def __init__(self, dim: int, heads: int, ffn: int, *, dtype=None, rngs: nnx.Rngs):
        self.cross = Attention(dim, heads, dtype=dtype, rngs=rngs)
        self.norm_cross = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.self_attn = Attention(dim, heads, dtype=dtype, rngs=rngs)
        self.norm_self = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.ffn1 = nnx.Linear(dim, ffn, dtype=dtype, rngs=rngs)
        self.ffn2 = nnx.Linear(ffn, dim, dtype=dtype, rngs=rngs)
        self.norm_ffn = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)

    def __call__(self, tgt, query_pos, memory, pos, mask):
        tgt = self.norm_cross(tgt + self.cross(tgt + query_pos, memory + pos, memory, mask))
        qk = tgt + query_pos
        tgt = self.norm_self(tgt + self.self_attn(qk, qk, tgt))
        return self.norm_ffn(tgt + self.ffn2(jax.nn.relu(self.ffn1(tgt))))


class SegmentationDecoder(nnx.Module):
    """Pixel stem + Mask2Former transformer decoder.

    `text_dim` enables the open-vocabulary query: a per-image text embedding (B, text_dim) of the
    real class name is concatenated to every learned query and projected by two bias-free Linears.
    """

    def __init__(self, spec: FeatureSpec, num_classes: int, *, hidden: int = 256, num_queries: int = 100,
                 num_layers: int = 10, heads: int = 8, ffn: int = 2048, mask_size: int | None = None,
                 text_dim: int | None = None, dtype=None, rngs: nnx.Rngs):
        if hidden % heads or hidden % 2:
            raise ValueError(f"hidden ({hidden}) must be even and divisible by heads ({heads})")
        self.stem = PixelStem(spec, hidden=hidden, dtype=dtype, rngs=rngs)
        self.num_classes = num_classes
        self.mask_size = mask_size or int(round(2.5 * max(spec)))
        self.num_layers = num_layers
        self.query_feat = nnx.Param(jax.random.normal(rngs.params(), (num_queries, hidden)))
        self.query_embed = nnx.Param(jax.random.normal(rngs.params(), (num_queries, hidden)))
        self.level_embed = nnx.Param(jax.random.normal(rngs.params(), (3, hidden)))
        if text_dim:
            self.text_feat = nnx.Linear(hidden + text_dim, hidden, use_bias=False, dtype=dtype, rngs=rngs)
            self.text_pos = nnx.Linear(hidden + text_dim, hidden, use_bias=False, dtype=dtype, rngs=rngs)
        else:
            self.text_feat = self.text_pos = None
        self.layers = nnx.List([DecoderLayer(hidden, heads, ffn, dtype=dtype, rngs=rngs) for _ in range(num_layers)])
        self.decoder_norm = nnx.LayerNorm(hidden, dtype=dtype, rngs=rngs)
        self.class_head = nnx.Linear(hidden, num_classes + 1, dtype=dtype, rngs=rngs)
        self.mask_mlp = nnx.List([nnx.Linear(hidden, hidden, dtype=dtype, rngs=rngs) for _ in range(3)])

    def _predict(self, tgt, mask_features, attn_size):
        out = self.decoder_norm(tgt)
        logits = self.class_head(out)
        e = out
        for i, lin in enumerate(self.mask_mlp):
            e = lin(e)
            if i < len(self.mask_mlp) - 1:
                e = jax.nn.relu(e)
        masks = jnp.einsum("bqc,bhwc->bqhw", e, mask_features)
        # Attention mask for the next layer: blocked where sigmoid < 0.5; fully blocked rows open.
        small = resize(jnp.moveaxis(masks, 1, -1), attn_size)
        allowed = jax.lax.stop_gradient(jax.nn.sigmoid(small.astype(jnp.float32)) >= 0.5)
        allowed = jnp.moveaxis(allowed, -1, 1).reshape(masks.shape[0], masks.shape[1], -1)
        allowed = allowed | ~jnp.any(allowed, axis=-1, keepdims=True)
        return logits, masks, allowed

    def __call__(self, features, text_embedding: jax.Array | None = None) -> dict[str, jax.Array]:
        """Returns {'logits': (L+1, B, Q, K+1), 'masks': (L+1, B, Q, S, S)}; index -1 is final."""
        x, stages = self.stem(features)
        mask_features = resize(x, self.mask_size)
        mems = memory_levels(stages, self.mask_size)
        b = x.shape[0]
        memory, pos, sizes = [], [], []
        for i, m in enumerate(mems):
            h, w = m.shape[1:3]
            memory.append(m.reshape(b, h * w, -1) + self.level_embed[...][i].astype(m.dtype))
            pos.append(sine_position_encoding(h, w, m.shape[-1]).astype(m.dtype)[None])
            sizes.append((h, w))
        qf = jnp.broadcast_to(self.query_feat[...], (b,) + self.query_feat.shape).astype(x.dtype)
        qe = jnp.broadcast_to(self.query_embed[...], (b,) + self.query_embed.shape).astype(x.dtype)
        if self.text_feat is not None:
            if text_embedding is None:
                raise ValueError("this decoder was built with text_dim; pass text_embedding (B, text_dim)")
            t = jnp.broadcast_to(text_embedding[:, None].astype(x.dtype), (b, qf.shape[1], text_embedding.shape[-1]))
            qf = self.text_feat(jnp.concatenate([qf, t], -1))
            qe = self.text_pos(jnp.concatenate([qe, t], -1))
        tgt = qf
        all_logits, all_masks = [], []
        logits, masks, allowed = self._predict(tgt, mask_features, sizes[0])
        all_logits.append(logits)
        all_masks.append(masks)
        for i, layer in enumerate(self.layers):
            lvl = i % 3
            tgt = layer(tgt, qe, memory[lvl], pos[lvl], allowed)
            logits, masks, allowed = self._predict(tgt, mask_features, sizes[(i + 1) % 3])
            all_logits.append(logits)
            all_masks.append(masks)
        return {"logits": jnp.stack(all_logits), "masks": jnp.stack(all_masks)}


def segmentation_config_defaults() -> dict[str, Any]:
    """The official decoder's sizes."""
    return dict(hidden=256, num_queries=100, num_layers=10, heads=8, ffn=2048, mask_size=None, text_dim=None)
