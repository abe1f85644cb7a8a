"""Capture under a data-parallel mesh: a batch sharded over 2 host devices gives the same features."""

import jax
import numpy as np
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
