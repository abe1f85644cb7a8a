"""Peak device memory of generation with capture, from XLA's memory analysis of the compiled
program (compiled, never run), the largest batch that fits a memory budget (16 GiB: v5e), and
FLOPs per image from XLA's cost analysis (for an MFU-based throughput estimate).

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


V5E_PEAK_TFLOPS = 197.0  # dense bf16 per chip (bench/peaks.py)


def _compile_generation(pipe, batch: int, size: int, capture: str | None, scheduler: str):
    prog = programs.generation(pipe, batch, size, steps=2, scheduler=scheduler, capture=capture, devices=1)
    return compile_fn(prog.fn, *prog.args)


def peak_for(pipe, batch: int, size: int, capture: str | None, scheduler: str) -> int:
    """Peak bytes of one generation call of `batch` images at `size` px (steps do not change it)."""
    return _compile_generation(pipe, batch, size, capture, scheduler).peak_bytes


def gflop_per_image(pipe, size: int, steps: int, capture: str | None, scheduler: str, b1_gflop: float) -> float:
    """GFLOP of generating one image with `steps` steps, from the batch-1 program's cost analysis.

    XLA counts the sampler loop body once: `b1_gflop` (the 2-step program: text encoder, one loop
    body, capture step, VAE) plus the other `steps`-program loop trips times one sampler step.
    """
    step = programs.sampler_step(pipe, 1, size, steps=steps, scheduler=scheduler, devices=1)
    step_gflop = compile_fn(step.fn, *step.args).gflop
    return b1_gflop + (programs.loop_trips(pipe, steps, scheduler, capture) - 1) * step_gflop


def max_batch(pipe, size: int, *, capture: str | None = "datasetdm", budget_bytes: int = 16 * GIB,
              scheduler: str = "pndm", steps: int | None = None) -> dict[str, Any]:
    """Peak memory per image and the largest batch under `budget_bytes`, for one device; with
    `steps`, also GFLOP per image and the v5e img/s/chip that 50% MFU would mean (an estimate).

    Peak is close to linear in batch: weights are fixed, activations and outputs per image. The
    line through batches 1 and 2 predicts the largest batch; that batch is compiled to check it
    (and stepped down while over budget).
    """
    c1 = _compile_generation(pipe, 1, size, capture, scheduler)
    p1, p2 = c1.peak_bytes, peak_for(pipe, 2, size, capture, scheduler)
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
    out = {"size": size, "capture": capture, "dtype": jnp.dtype(pipe.dtype).name, "peak_b1_bytes": p1,
           "per_image_bytes": per_image, "fixed_bytes": fixed, "budget_bytes": budget_bytes,
           "max_batch": int(best), "peak_at_max_batch_bytes": checked}
    if steps:
        g = gflop_per_image(pipe, size, steps, capture, scheduler, c1.gflop)
        out.update(steps=steps, gflop_per_image=g,
                   est_v5e_img_per_s_at_50pct_mfu=0.5 * V5E_PEAK_TFLOPS * 1e3 / g)
    return out
