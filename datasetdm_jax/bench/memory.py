"""Peak device memory of generation with capture, from XLA's memory analysis of the compiled
program (compiled, never run), and the largest batch that fits a memory budget (16 GiB: v5e).

Peak = arguments (weights, inputs) + outputs (images, captured features) + temporaries. The
buffer assignment is the one for the device the bench runs on; a TPU compile of the same
program assigns buffers differently, so off-TPU numbers are estimates for TPU.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from datasetdm_jax.bench import programs
from datasetdm_jax.bench.timing import compile_fn

GIB = 2**30


def peak_for(pipe, batch: int, size: int, capture: str | None, scheduler: str) -> int:
    """Peak bytes of one generation call of `batch` images at `size` px (steps do not change it)."""
    prog = programs.generation(pipe, batch, size, steps=2, scheduler=scheduler, capture=capture, devices=1)
    return compile_fn(prog.fn, *prog.args).peak_bytes


def max_batch(pipe, size: int, *, capture: str | None = "datasetdm", budget_bytes: int = 16 * GIB,
              scheduler: str = "pndm") -> dict[str, Any]:
    """Peak memory per image and the largest batch under `budget_bytes`, for one device.

    Peak is close to linear in batch: weights are fixed, activations and outputs per image. The
    line through batches 1 and 2 predicts the largest batch; that batch is compiled to check it
    (and stepped down while over budget).
    """
    p1, p2 = peak_for(pipe, 1, size, capture, scheduler), peak_for(pipe, 2, size, capture, scheduler)
    per_image = max(p2 - p1, 1)
    fixed = p1 - per_image
    best = max(0, (budget_bytes - fixed) // per_image)
    checked = None
    for _ in range(4):
        if best < 1:
            break
        checked = peak_for(pipe, int(best), size, capture, scheduler)
        if checked <= budget_bytes:
            break
        best = max(0, int(best) - max(1, -(-(checked - budget_bytes) // per_image)))
        checked = None
    return {"size": size, "capture": capture, "dtype": jnp.dtype(pipe.dtype).name, "peak_b1_bytes": p1,
            "per_image_bytes": per_image, "fixed_bytes": fixed, "budget_bytes": budget_bytes,
            "max_batch": int(best), "peak_at_max_batch_bytes": checked}
