"""PyTorch state dicts <-> NNX parameters, by naming convention (see docs/conventions.md).

Our modules name their attributes exactly like the PyTorch modules they mirror, so one pair of
functions serves the UNet, the VAE and the CLIP text encoder: no per-model key tables, and no torch
import.
"""

from __future__ import annotations

from typing import Callable, Iterable, MutableMapping

import jax
import numpy as np
from flax import nnx

# NNX leaf name -> PyTorch leaf name.
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class WeightsError(ValueError):
    """Weights do not fit the model: lists every missing, unexpected or mis-shaped tensor."""


def torch_key(path: tuple) -> str:
    """NNX param path -> PyTorch state-dict key, e.g. ('to_out', 0, 'kernel') -> 'to_out.0.weight'."""
    *parents, leaf = (str(p) for p in path)
    if leaf not in _LEAF_TO_TORCH:
        raise KeyError(f"no PyTorch name for parameter leaf {leaf!r} at {'.'.join(map(str, path))}")
    return ".".join([*parents, _LEAF_TO_TORCH[leaf]])


# PyTorch layout -> NNX layout of a kernel, by rank: conv (O, I, kh, kw) -> (kh, kw, I, O); linear
# (out, in) -> (in, out).
_TO_NNX_AXES = {4: (2, 3, 1, 0), 2: (1, 0)}


def _nnx_axes(leaf: str, ndim: int) -> tuple[int, ...]:
    return _TO_NNX_AXES.get(ndim, tuple(range(ndim))) if leaf == "kernel" else tuple(range(ndim))


def _to_nnx_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    return value.transpose(_nnx_axes(leaf, value.ndim))


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _flat_params(model: nnx.Module):
    return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def load_torch_state_dict(
    model: nnx.Module,
    tensors: MutableMapping[str, np.ndarray],
    *,
    source: str = "state dict",
    rename: Callable[[str], str] | None = None,
    ignore: Iterable[str] = (),
) -> None:
    """Moves PyTorch-layout `tensors` into `model`'s params (device arrays), in place.

    `rename` maps legacy checkpoint keys to current ones (e.g. old VAE attention names);
    keys in `ignore` (non-parameter buffers such as CLIP's `position_ids`) are skipped.
    Every shape is checked first: WeightsError names every missing, unexpected or mis-shaped
    tensor, and on error neither the model nor `tensors` is touched, so nothing half-loads. Then
    each tensor is converted, placed on the device and removed from `tensors`, so loading holds
    one copy of the weights plus one tensor (SDXL's UNet alone is 5 GB in bfloat16), not three.
    """
    ignore = set(ignore)
    source_key = {}  # model key -> key in `tensors`
    for key in tensors:
        new = rename(key) if rename else key
        if new not in ignore:
            source_key[new] = key
    problems, plan = [], []
    for path, var in _flat_params(model):
        key, leaf = torch_key(path), str(path[-1])
        expected = tuple(var.shape)
        if key not in source_key:
            problems.append(f"missing {key} (expected shape {expected})")
            continue
        found = tuple(np.shape(tensors[source_key[key]]))
        if tuple(found[a] for a in _nnx_axes(leaf, len(found))) != expected:
            problems.append(f"{key}: expected shape {_to_torch_layout(leaf, np.empty(expected)).shape} "
                            f"(PyTorch layout), found {found}")
            continue
        plan.append((var, leaf, source_key.pop(key)))
    problems += [f"unexpected {key} {tuple(np.shape(tensors[src]))}" for key, src in sorted(source_key.items())]
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise WeightsError(f"{source}: {len(problems)} tensor(s) do not fit the model: {shown}")
    for var, leaf, src in plan:
        value = _to_nnx_layout(leaf, np.asarray(tensors.pop(src)))
        var.set_value(jax.device_put(value.astype(var.dtype, copy=False)))


def to_torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """`model`'s params as a PyTorch-layout numpy state dict (for safetensors export)."""
    return {
        torch_key(path): np.ascontiguousarray(_to_torch_layout(str(path[-1]), np.asarray(var.get_value())))
        for path, var in _flat_params(model)
    }
