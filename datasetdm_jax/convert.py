"""PyTorch state dicts <-> NNX parameters, by naming convention (see docs/conventions.md).

Our modules name their attributes exactly like the PyTorch modules they mirror, so one pair of
numpy-only functions serves the UNet, the VAE and the CLIP text encoder: no per-model key tables,
and no torch import.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

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


def _to_nnx_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # conv (O, I, kh, kw) -> (kh, kw, I, O)
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:  # linear (out, in) -> (in, out)
        return value.T
    return value


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
    tensors: Mapping[str, np.ndarray],
    *,
    source: str = "state dict",
    rename: Callable[[str], str] | None = None,
    ignore: Iterable[str] = (),
) -> None:
    """Copies PyTorch-layout `tensors` into `model`'s params, in place.

    `rename` maps legacy checkpoint keys to current ones (e.g. old VAE attention names);
    keys in `ignore` (non-parameter buffers such as CLIP's `position_ids`) are skipped.
    Raises WeightsError naming every missing, unexpected or mis-shaped tensor; on error the
    model is left untouched, so nothing half-loads.
    """
    ignore = set(ignore)
    incoming = {}
    for key, value in tensors.items():
        key = rename(key) if rename else key
        if key not in ignore:
            incoming[key] = value
    problems, new_values, used = [], [], set()
    for path, var in _flat_params(model):
        key = torch_key(path)
        expected = tuple(var.shape)
        if key not in incoming:
            problems.append(f"missing {key} (expected shape {expected})")
            continue
        used.add(key)
        value = _to_nnx_layout(str(path[-1]), np.asarray(incoming[key]))
        if value.shape != expected:
            problems.append(
                f"{key}: expected shape {_to_torch_layout(str(path[-1]), np.empty(expected)).shape} "
                f"(PyTorch layout), found {tuple(np.asarray(incoming[key]).shape)}"
            )
            continue
        new_values.append((var, value.astype(var.dtype)))
    problems += [f"unexpected {key} {tuple(np.shape(incoming[key]))}" for key in sorted(set(incoming) - used)]
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise WeightsError(f"{source}: {len(problems)} tensor(s) do not fit the model: {shown}")
    for var, value in new_values:
        var.set_value(value)


def to_torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """`model`'s params as a PyTorch-layout numpy state dict (for safetensors export)."""
    return {
        torch_key(path): np.ascontiguousarray(_to_torch_layout(str(path[-1]), np.asarray(var.get_value())))
        for path, var in _flat_params(model)
    }
