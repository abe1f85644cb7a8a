"""models/group_norm.py: the project's GroupNorm equals flax's (two-pass variance) on NHWC and token
inputs, keeps flax's parameter names, and computes its statistics in fp32 for bf16 inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from datasetdm_jax.models.group_norm import GroupNorm


def _pair(channels, groups, eps):
    """Ours and flax's, with the same non-trivial affine parameters."""
    ours = GroupNorm(channels, groups, epsilon=eps)
    ref = nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    scale, bias = rng.uniform(0.5, 1.5, channels), rng.standard_normal(channels)
    for m in (ours, ref):
        m.scale[...] = jnp.asarray(scale, jnp.float32)
        m.bias[...] = jnp.asarray(bias, jnp.float32)
    return ours, ref


@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 64), 32), ((3, 5, 7, 12), 4), ((2, 10, 16), 8)],
                         ids=["nhwc", "odd-spatial", "tokens"])
def test_matches_flax_group_norm(shape, groups):
    ours, ref = _pair(shape[-1], groups, 1e-5)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape) * 3 + 2, jnp.float32)
    out = jax.jit(lambda m, x: m(x))(ours, x)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref(x), atol=1e-5, rtol=1e-5)
    assert set(nnx.state(ours, nnx.Param).keys()) == set(nnx.state(ref, nnx.Param).keys()) == {"scale", "bias"}


def test_bf16_input_fp32_statistics_and_dtype():
    ours, ref = _pair(32, 8, 1e-6)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, 32)) * 50 + 300, jnp.bfloat16)
    out = ours(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref(x.astype(jnp.float32)), atol=0.05)
    assert GroupNorm(32, 8, dtype=jnp.float32)(x).dtype == jnp.float32


def test_rejects_groups_that_do_not_divide():
    with pytest.raises(ValueError, match="12 channels do not split into 5 groups"):
        GroupNorm(12, 5)
