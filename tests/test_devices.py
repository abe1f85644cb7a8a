"""Host cores as XLA devices (the CLI's default on CPU) and data meshes that fit any batch."""

import os
import subprocess
import sys

import jax
import pytest

from datasetdm_jax import devices

# importing the package sets the count; a later call, once the backends exist, changes nothing
PROBE = ("import jax; import datasetdm_jax; from datasetdm_jax import devices; "
         "print(jax.config.jax_num_cpu_devices, jax.device_count(), devices.use_host_cores())")


@pytest.mark.parametrize("batch, cap, want", [(1, None, 1), (3, None, 1), (4, None, 2), (16, None, 2), (4, 1, 1)])
def test_data_mesh_uses_the_most_devices_that_divide_the_batch(batch, cap, want):
    assert jax.local_device_count() == 2  # conftest
    mesh = devices.data_mesh(batch, cap)
    assert mesh.axis_names == ("data",) and mesh.size == want and batch % mesh.size == 0


def _probe(env):
    env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [int(x) for x in out.stdout.split()]


def test_host_cores_become_devices_unless_the_user_chose():
    # asked for 3, got 3 on import of the package (a Python user needs no call)
    assert _probe({"XLA_FLAGS": None, devices.ENV: "3"}) == [3, 3, 0]
    # default: one per core
    assert _probe({"XLA_FLAGS": None, devices.ENV: None}) == [os.cpu_count(), os.cpu_count(), 0]
    # the user's XLA_FLAGS win
    assert _probe({"XLA_FLAGS": "--xla_force_host_platform_device_count=2", devices.ENV: "3"}) == [-1, 2, 0]
    # 1 turns it off
    assert _probe({"XLA_FLAGS": None, devices.ENV: "1"}) == [1, 1, 0]
