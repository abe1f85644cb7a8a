"""The premise probe: a per-resolution 1x1 conv equals a 1x1 conv on upsampled features; end to end on a tiny SD."""

import jax
import jax.numpy as jnp
import numpy as np

from datasetdm_jax import pretrained, smoke
from datasetdm_jax.research import probe


def test_per_resolution_head_equals_head_on_upsampled_features():
    rng = np.random.default_rng(0)
    feats = {8: rng.standard_normal((2, 8, 8, 5)).astype(np.float32),
             4: rng.standard_normal((2, 4, 4, 3)).astype(np.float32)}
    params = {"b": jnp.asarray(rng.standard_normal(4), jnp.float32),
              "w8": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32),
              "w4": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)}
    ours = probe._probe_logits(params, {r: jnp.asarray(f) for r, f in feats.items()}, 16)
    up = jnp.concatenate([jax.image.resize(feats[8], (2, 16, 16, 5), "bilinear"),
                          jax.image.resize(feats[4], (2, 16, 16, 3), "bilinear")], -1)
    direct = up @ jnp.concatenate([params["w8"], params["w4"]]) + params["b"]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(direct), rtol=1e-5, atol=1e-5)


def test_probe_runs_end_to_end_on_a_tiny_model(tmp_path):
    pipe = pretrained.load_pipeline(pretrained.save_pipeline(smoke.random_pipeline(tmp_path / "src"), tmp_path / "m"))
    report = probe.run_probe(pipe, num_train=4, num_test=4, image_size=32, probe_steps=3, scratch_steps=2)
    for key in ("probe", "scratch"):
        assert 0.0 <= report[key]["miou"] <= 1.0
        assert "background" in report[key]["per_class"]
    assert sum(report["probe"]["feature_channels"].values()) > 0
