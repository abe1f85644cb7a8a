"""Which devices a job runs on: the host's cores as XLA devices on CPU, and data meshes that fit a batch.

Why: XLA's CPU backend runs one device's convolutions on about one core, so a 2-core laptop
samples ~1.9x faster as two host devices running data-parallel halves of each batch (docs/benchmarks.md).
Accelerators are untouched: the setting only shapes the CPU backend.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ENV = "DATASETDM_HOST_DEVICES"


def use_host_cores() -> int:
    """Give the CPU backend one device per core (``$DATASETDM_HOST_DEVICES`` overrides; 1 = off).

    Call before JAX creates its backends (the CLI does, first thing). A device count the user set
    in ``XLA_FLAGS`` or ``jax_num_cpu_devices`` wins. Returns the count asked for (0: left alone).
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return 0
    if jax.config.jax_num_cpu_devices > 0:
        return 0
    n = int(os.environ.get(ENV, "0") or 0) or (os.cpu_count() or 1)
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already up (e.g. inside a notebook): keep what exists
        return 0
    return n


def data_mesh(batch_size: int, devices: int | None = None) -> Mesh:
    """A ``('data',)`` mesh over the most local devices (at most ``devices``) that divide the batch.

    A batch of 1 (the papers' decoder recipe) runs on one device; 16 on all of 2, 4 or 8.
    """
    local = jax.local_devices()
    n = min(devices or len(local), len(local))
    while int(batch_size) % n:
        n -= 1
    return Mesh(np.array(local[:n]), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


class MeshJit:
    """``jax.jit(fn, **jit_kwargs)`` traced, compiled and run under ``jax.set_mesh(mesh)``.

    Why: XLA splits ordinary ops over the mesh by itself, but not a Pallas kernel or a host
    callback; under the context mesh they see the ``data`` axis and split themselves
    (``jax.shard_map``): multi-chip hosts and pods get the fast attention kernel
    (models/attention.py), and each device matches its own examples (decoders/matching.py).
    """

    def __init__(self, fn, mesh: Mesh, **jit_kwargs):
        self.mesh, self.jitted = mesh, jax.jit(fn, **jit_kwargs)

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def data_axis_size() -> int:
    """The ``data`` axis size of the context mesh being traced under (1: none). Code that cannot be
    split by XLA itself (a Pallas kernel, a host callback) uses it to split over the batch."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else int(dict(mesh.shape).get("data", 1))


def data_shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, split over ``data`` along the leading axis): the two placements of data-parallel
    work (parameters everywhere, each device its slice of the batch)."""
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
