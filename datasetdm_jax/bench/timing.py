"""Compile, cost and time jitted programs; time any callables interleaved.

Timings are medians of repeats taken round-robin across all variants, so load from other
processes hits every variant alike and the ratios between them stay meaningful.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax


@dataclasses.dataclass
class Compiled:
    """An AOT-compiled program with what XLA says about it."""

    fn: Any
    compile_s: float
    gflop: float
    memory: dict[str, int]

    @property
    def peak_bytes(self) -> int:
        return peak_bytes(self.memory)


@dataclasses.dataclass
class Timing:
    """One row of the report: a program's compile time, steady-state time and achieved rate."""

    name: str
    median_s: float
    min_s: float
    max_s: float
    compile_s: float | None = None
    gflop: float = 0.0  # per call, from XLA's cost analysis
    images: int = 0  # images per call; 0 for rows that are not per image
    devices: int = 1
    mfu: float | None = None

    @property
    def tflops(self) -> float:
        return self.gflop / 1e3 / self.median_s

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.median_s if self.images else None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tflops": self.tflops, "images_per_s": self.images_per_s}


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def memory_stats(compiled) -> dict[str, int]:
    """The byte counts of `compiled.memory_analysis()` ({} where the backend gives none)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
             "generated_code_size_in_bytes")
    return {n.removesuffix("_size_in_bytes"): int(getattr(_first(m), n, 0) or 0) for n in names}


def peak_bytes(mem: dict[str, int]) -> int:
    """Live device memory of one call: arguments + outputs + temporaries, minus donated aliases."""
    return mem.get("argument", 0) + mem.get("output", 0) + mem.get("temp", 0) - mem.get("alias", 0)


def compile_fn(fn: Callable, *args, **jit_kwargs) -> Compiled:
    """AOT-compiles `fn(*args)` (args may be `jax.ShapeDtypeStruct`s); `fn` may already be jitted.

    FLOPs are XLA's count for one call. XLA counts a loop body once, whatever its trip count:
    callers scale loops themselves.
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn, **jit_kwargs)
    t0 = time.perf_counter()
    c = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    cost = _first(c.cost_analysis()) or {}
    return Compiled(c, compile_s, float(cost.get("flops", 0.0)) / 1e9, memory_stats(c))


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int,
                     outputs: dict[str, Any] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument callable: one warm-up each, then `repeats` rounds
    in which every callable runs once. JAX results are blocked on before the clock stops. The
    warm-up results go into `outputs` when given (to compare what the variants computed)."""
    for name, fn in calls.items():
        out = jax.block_until_ready(fn())
        if outputs is not None:
            outputs[name] = out
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return times


def make_timing(name: str, seconds: list[float], compiled: Compiled | None = None, *, gflop: float | None = None,
                images: int = 0, devices: int = 1, peak_tflops: float | None = None) -> Timing:
    """A report row; MFU is against `peak_tflops` per device times the devices used."""
    g = compiled.gflop if gflop is None and compiled is not None else (gflop or 0.0)
    row = Timing(name, statistics.median(seconds), min(seconds), max(seconds),
                 compiled.compile_s if compiled is not None else None, g, images, devices)
    if peak_tflops and g > 0:
        row.mfu = row.tflops / (peak_tflops * devices)
    return row
