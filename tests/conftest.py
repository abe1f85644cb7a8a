"""Shared test setup: fp32 CPU, 2 host devices, and the persistent compilation cache."""

import os

# The suite is dominated by XLA compiles of tiny models: LLVM at -O0 cuts their CPU time by ~30%
# (tests/test_train.py resume tests, cold cache: 200 -> 139 s user) and leaves fp32 results within
# the parity tolerances.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import tiny_sd  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random diffusers-format SD folder written by diffusers itself."""
    return tiny_sd.build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "sd")


@pytest.fixture(scope="session")
def torch_pipe(tiny_dir):
    return tiny_sd.torch_pipeline(tiny_dir)


@pytest.fixture(scope="session")
def pipe(tiny_dir):
    from datasetdm_jax.pretrained import load_pipeline

    return load_pipeline(tiny_dir, dtype=jnp.float32)


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    """A tiny random SDXL folder (tests/tiny_sdxl.py) written by diffusers itself."""
    import tiny_sdxl

    return tiny_sdxl.build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "sdxl")


@pytest.fixture(scope="session")
def sdxl_pipe(sdxl_dir):
    from datasetdm_jax.pretrained import load_pipeline

    return load_pipeline(sdxl_dir, dtype=jnp.float32)
