"""Where frozen parameters live on a data mesh: replicated on every device, or FSDP-sharded.

FSDP here shards over the mesh's own ``data`` axis, the devices the batch is already split over
(ZeRO-3 style): each large parameter (at least `MIN_ELEMENTS` elements) is cut along its largest
dimension that the axis size divides, small ones stay replicated, and XLA's GSPMD all-gathers each
sharded weight where a layer reads it. Why this design rather than a second ('data', 'model') axis:
every data-parallel program keeps its mesh (`devices.data_mesh`), batch placement and `MeshJit`
unchanged, only the parameters' shardings differ, and per-device parameter memory falls by the
device count while activations stay those of each device's slice of the batch. The cost: weights
are gathered once per layer per call, and a one-device mesh (a batch of 1) shards nothing, so run
FSDP with a batch that is a multiple of the device count (one image per chip).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MODES = ("replicated", "fsdp")
MIN_ELEMENTS = 2**20  # smaller parameters (norms, biases, small convs) are not worth a gather
AXIS = "data"


def check_mode(mode: str) -> str:
    """``mode`` itself; a one-line error when it is not one of `MODES`."""
    if mode not in MODES:
        raise ValueError(f"param_sharding must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def leaf_spec(shape: tuple[int, ...], axis_size: int, min_elements: int) -> PartitionSpec:
    """FSDP's spec of one parameter: `AXIS` on its largest dimension divisible by ``axis_size``
    (the first of equal ones), or replicated when it is small or nothing divides."""
    size = 1
    for d in shape:
        size *= d
    if axis_size <= 1 or size < min_elements:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[dim] % axis_size == 0:
            return PartitionSpec(*([None] * dim), AXIS)
    return PartitionSpec()


def param_specs(params: Any, axis_size: int, mode: str = "replicated", min_elements: int | None = None) -> Any:
    """The params tree -> a tree of `PartitionSpec`s for a ``data`` axis of ``axis_size`` devices
    (``min_elements`` defaults to `MIN_ELEMENTS`, read at call time)."""
    check_mode(mode)
    limit = MIN_ELEMENTS if min_elements is None else int(min_elements)
    if mode == "replicated":
        return jax.tree.map(lambda _: PartitionSpec(), params)
    return jax.tree.map(lambda x: leaf_spec(tuple(x.shape), axis_size, limit), params)


def param_shardings(params: Any, mesh: Mesh, mode: str = "replicated", min_elements: int | None = None) -> Any:
    """`param_specs` as `NamedSharding`s on ``mesh`` (its ``data`` axis): for ``jax.device_put``
    and a jit's ``in_shardings``."""
    specs = param_specs(params, int(mesh.shape[AXIS]), mode, min_elements)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec))

