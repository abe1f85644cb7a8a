"""Attention kernel switch (models/attention.py): every kernel that runs on CPU matches the einsum
path to fp32 tolerance, alone and in a tiny UNet forward with and without capture; captured
layers keep explicit probabilities whatever the kernel. Splash runs in Pallas interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from datasetdm_jax.models import attention as att
from datasetdm_jax.models.unet import UNet2DConditionModel
from datasetdm_jax.models.unet_blocks import AttentionCapture
from tiny_sd import rel_err

# 16x16 latent: 256 self-attention tokens at the first level (splash), 64 at the second (fallback).
TINY = {"sample_size": 16, "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
        "norm_num_groups": 8}
FUSED = ("dot_product", "splash")
TOL = 2e-5


def _qkv(lk: int, d: int = 40):
    keys = jax.random.split(jax.random.key(0), 3)
    shapes = ((2, 256, 2, d), (2, lk, 2, d), (2, lk, 2, d))
    return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]


@pytest.mark.parametrize("lk", [256, 7], ids=["self", "cross-short"])
@pytest.mark.parametrize("impl", ["xla", *FUSED])
def test_kernel_matches_einsum(impl, lk):
    q, k, v = _qkv(lk)
    ref = att.dot_product_attention(q, k, v)[0]
    out = jax.jit(lambda q, k, v: att.multi_head_attention(q, k, v, kernel=impl))(q, k, v)
    assert out.shape == ref.shape and rel_err(out, ref) < TOL
    # the XLA reference implementation of jax.nn.dot_product_attention, named explicitly
    assert rel_err(jax.nn.dot_product_attention(q, k, v, implementation="xla"), ref) < TOL


def test_deferred_normalisation_in_bf16():
    """softmax_attention divides by the row sums after the value matmul: in bf16 (upcast or not) it
    stays within bf16 rounding of the fp32 softmax-then-matmul reference, and keeps the dtype."""
    q, k, v = _qkv(256)
    ref = att.dot_product_attention(q, k, v)[0]
    for upcast in (True, False):
        out = att.softmax_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), upcast=upcast)
        assert out.dtype == jnp.bfloat16 and rel_err(out.astype(jnp.float32), ref) < 2e-2


def test_splash_pads_head_dim_and_runs_the_pallas_kernel():
    q, k, v = _qkv(256, d=40)  # 40 -> padded to 128 inside
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: att.splash_attention(q, k, v))(q, k, v))
    assert "pallas_call" in jaxpr and "128" in jaxpr
    assert not att.splash_fits(q, _qkv(7)[1])  # short key sets fall back to the einsum path


def test_auto_and_module_default():
    assert att.resolve_impl("auto") == "xla"  # this suite runs on CPU
    before = att.get_attention_impl()
    try:
        att.set_attention_impl("splash")
        assert att.resolve_impl(None) == "splash" and att.resolve_impl("dot_product") == "dot_product"
    finally:
        att.set_attention_impl(before)
    with pytest.raises(ValueError, match="attention impl must be one of auto, xla, dot_product, splash"):
        att.set_attention_impl("flash3")


def _count_pallas(jaxpr) -> int:
    """pallas_call equations in a jaxpr, nested jaxprs included (each use counted)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "pallas_call"
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    n += _count_pallas(getattr(sub, "jaxpr", sub))
    return n


@pytest.fixture(scope="module")
def unet():
    model = UNet2DConditionModel(TINY, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32)
    t = jnp.float32(500.0)
    call = lambda impl, **kw: (lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c, attention_kernel=impl, **kw))
    return call, state, (x, t, ctx)


@pytest.fixture(scope="module")
def reference(unet):
    call, state, args = unet
    return jax.jit(call("xla"))(state, *args), jax.jit(call("xla", capture=True))(state, *args)


@pytest.mark.parametrize("impl", FUSED)
def test_unet_forward_matches_einsum_path(unet, reference, impl):
    call, state, args = unet
    plain_ref, (eps_ref, taps_ref) = reference
    assert rel_err(jax.jit(call(impl))(state, *args), plain_ref) < TOL
    eps, taps = jax.jit(call(impl, capture=True))(state, *args)
    assert rel_err(eps, eps_ref) < TOL
    assert list(taps["maps"]) == list(taps_ref["maps"]) and list(taps["cross_attention"]) == list(
        taps_ref["cross_attention"])
    for kind in ("maps", "cross_attention"):
        for name, ref in taps_ref[kind].items():
            assert rel_err(taps[kind][name], ref) < TOL, (kind, name)
    probs = next(iter(taps["cross_attention"].values()))
    assert probs.dtype == jnp.float32 and np.allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)


def test_captured_layers_keep_explicit_probabilities(unet):
    """With splash as the module default, uncaptured long self-attention uses the Pallas kernel;
    the labeller's requested self-attention layers (256 tokens) and captured cross-attention do not."""
    call, state, (x, t, ctx) = unet
    before = att.get_attention_impl()
    try:
        att.set_attention_impl("splash")
        n_calls = lambda f: _count_pallas(jax.make_jaxpr(f)(state, x, t, ctx).jaxpr)
        plain, captured = n_calls(call(None)), n_calls(call(None, capture=True))
        request = AttentionCapture.request(ctx[1:], self_tokens=256, cross_tokens=256)
        labeller = n_calls(call(None, attention=request))
        eps, out = jax.jit(call(None, attention=request))(state, x, t, ctx)
    finally:
        att.set_attention_impl(before)
    assert plain == captured == 3  # down0 (1 layer) + up1 (2 layers) self-attention at 256 tokens
    assert labeller == 0
    assert len(out["self_attention"]) == 3 and out["self_attention"][0].shape == (1, 256, 256)
    ref_eps, ref_out = jax.jit(call("xla", attention=request))(state, x, t, ctx)
    assert rel_err(eps, ref_eps) < TOL and rel_err(out["self_attention"][0], ref_out["self_attention"][0]) < TOL


def test_splash_splits_itself_over_the_data_mesh(unet, reference):
    """Under a 2-device ``data`` mesh (``devices.MeshJit``, as generation and training run) the Pallas
    kernel runs inside ``shard_map``, one batch slice per device, and the UNet still matches the
    einsum path; on TPU, "auto" picks splash under such a mesh and not without one (XLA would
    gather the whole batch onto every device around a Pallas call)."""
    from datasetdm_jax import devices

    call, state, (x, t, ctx) = unet
    mesh = devices.data_mesh(2)
    assert mesh.size == 2
    repl, data = devices.data_shardings(mesh)
    fn = devices.MeshJit(call("splash"), mesh, in_shardings=(repl, data, repl, data), out_shardings=data)
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(call("splash"))(state, x, t, ctx))
    assert jaxpr.count("shard_map") == 3 and "pallas_call" in jaxpr
    eps = fn(state, x, t, ctx)
    assert rel_err(eps, reference[0]) < TOL and eps.sharding.spec == jax.sharding.PartitionSpec("data")


def test_auto_picks_splash_on_a_tpu_mesh(monkeypatch):
    from datasetdm_jax import devices

    monkeypatch.setattr(att.jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(att.jax, "device_count", lambda: 2)
    assert att.resolve_impl("auto") == "xla"
    with jax.set_mesh(devices.data_mesh(2)):
        assert att.resolve_impl("auto") == "splash"
