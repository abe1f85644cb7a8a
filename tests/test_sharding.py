"""Sharding over 2 host devices: capture with the batch split gives the same features, and FSDP
parameter sharding (datasetdm_jax/sharding.py) halves per-device weights and keeps the images."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from datasetdm_jax import features


def test_capture_with_batch_sharded_over_devices(pipe):
    assert jax.device_count() >= 2, "conftest sets --xla_force_host_platform_device_count=2"
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    rng = np.random.default_rng(0)
    b = 2  # images; the CFG batch has 2b rows
    latents = rng.standard_normal((b, 16, 16, 4)).astype(np.float32)
    cfg_latents = np.concatenate([latents, latents])
    emb = np.asarray(pipe.encode_prompt([""] * b + ["a red circle", "a blue square"]))
    t = np.full((2 * b,), 7, np.float32)
    gd = pipe.graphdefs["unet"]

    def run(state, x, t, c):
        eps, taps = nnx.merge(gd, state)(x, t, c, capture=True)
        return eps, features.extract(taps, "datasetdm", x.shape[0] // 2)

    rows, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    params = jax.device_put(pipe.params["unet"], repl)
    sharded = jax.jit(run, in_shardings=(repl, rows, rows, rows), out_shardings=rows)
    eps_s, feats_s = sharded(params, *(jax.device_put(a, rows) for a in (cfg_latents, t, emb)))
    eps, feats = pipe.unet_apply(cfg_latents, t, emb, capture="datasetdm")

    assert len(eps_s.sharding.device_set) == 2
    np.testing.assert_allclose(eps_s, eps, rtol=1e-5, atol=1e-5)
    for a, b_ in zip(jax.tree.leaves(feats_s), jax.tree.leaves(feats)):
        assert a.shape == b_.shape and a.shape[0] == b
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5)


# --- FSDP parameter sharding (datasetdm_jax/sharding.py) -----------------------------------------

def _bytes_per_device(params, specs, axis_size):
    leaves, spec_leaves = jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    assert len(leaves) == len(spec_leaves)
    return sum(x.size * x.dtype.itemsize // (axis_size if "data" in tuple(s) else 1)
               for x, s in zip(leaves, spec_leaves))


def test_fsdp_rule_halves_the_real_sdxl_unet():
    """On SDXL base's UNet (abstract, 2.6B parameters) over 2 devices, every large parameter is
    split (all have an even dimension) and one device holds half of them; small ones stay whole."""
    import jax.numpy as jnp

    from datasetdm_jax import sharding
    from datasetdm_jax.models import presets
    from datasetdm_jax.models.abstract import abstract_module
    from datasetdm_jax.models.unet import UNet2DConditionModel

    unet = abstract_module(lambda rngs: UNet2DConditionModel(presets.SDXL_UNET, dtype=jnp.bfloat16,
                                                             param_dtype=jnp.bfloat16, rngs=rngs))
    params = nnx.state(unet)
    big = lambda x: x.size >= sharding.MIN_ELEMENTS  # noqa: E731
    for n in (2, 8):
        specs = sharding.param_specs(params, n, "fsdp")
        pairs = list(zip(jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))))
        big_bytes = sum(x.size * x.dtype.itemsize for x, _ in pairs if big(x))
        small_bytes = sum(x.size * x.dtype.itemsize for x, _ in pairs if not big(x))
        assert big_bytes > 0.95 * (big_bytes + small_bytes)  # the big ones are nearly all of it
        assert all(s == P() for x, s in pairs if not big(x))
        sharded = _bytes_per_device(params, specs, n)
        assert sharded == pytest.approx(big_bytes / n + small_bytes, rel=0.01)
        repl = _bytes_per_device(params, sharding.param_specs(params, n, "replicated"), n)
        assert repl == big_bytes + small_bytes and sharded < repl * (1 / n + 0.02)
    # the largest divisible dimension: a (3, 3, 640, 1280) conv kernel splits its 1280 outputs
    assert sharding.leaf_spec((3, 3, 640, 1280), 2, 1) == P(None, None, None, "data")
    assert sharding.leaf_spec((1280, 1281), 2, 1) == P("data")
    assert sharding.leaf_spec((3, 5), 2, 1) == P()
    assert sharding.leaf_spec((1280, 1280), 2, 2**30) == P()


def test_sample_fsdp_matches_replicated(pipe, monkeypatch):
    """generate.sample with the tiny SD's weights FSDP-sharded over 2 devices draws the same images
    (the threshold is lowered so the tiny weights actually split)."""
    from datasetdm_jax import devices, generate, sharding

    monkeypatch.setattr(sharding, "MIN_ELEMENTS", 1024)
    mesh = devices.data_mesh(2, 2)
    placed = sharding.param_shardings(pipe.params, mesh, "fsdp")
    assert sum(s.spec != P() for s in jax.tree.leaves(placed, is_leaf=lambda s: isinstance(s, NamedSharding))) >= 10
    prompts = ["a red circle", "a blue square"]
    repl = generate.sample(pipe, prompts, steps=2, scheduler="ddim", num_devices=2)
    fsdp = generate.sample(pipe, prompts, steps=2, scheduler="ddim", num_devices=2, param_sharding="fsdp")
    np.testing.assert_allclose(fsdp, repl, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="param_sharding must be one of"):
        generate.sample(pipe, prompts, steps=2, param_sharding="zero3")


def test_fsdp_compiled_argument_bytes_drop(monkeypatch):
    """Compile only: the guided SDXL UNet step (tiny SDXL layout) on a 2-device data mesh holds half
    the weights per device with fsdp, by XLA's own memory analysis."""
    import jax.numpy as jnp

    from datasetdm_jax import sharding
    from datasetdm_jax.bench import sdxl

    monkeypatch.setattr(sharding, "MIN_ELEMENTS", 1024)
    rows = {m: sdxl.report(32, [1], jnp.float32, ["unet_cfg"], sdxl.TINY_SDXL, num_devices=2, param_sharding=m)[0]
            for m in sharding.MODES}
    repl, fsdp = rows["replicated"], rows["fsdp"]
    assert repl["devices"] == fsdp["devices"] == 2 and fsdp["param_sharding"] == "fsdp"
    assert fsdp["argument_gib"] < 0.6 * repl["argument_gib"]
    assert fsdp["gflop"] == pytest.approx(repl["gflop"], rel=0.05)
