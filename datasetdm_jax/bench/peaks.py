"""The device's peak FLOP rate, the denominator of MFU.

Accelerators: published dense bf16 peaks per chip. CPUs have no useful published number, so the
peak is measured in the same run: the best rate of a large fp32 matmul under jit.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# (substring of jax's device_kind, lowercased) -> dense bf16 TFLOP/s per chip. First match wins,
# so more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918.0),   # TPU v6e (Trillium)
    ("v6e", 918.0),
    ("v5 lite", 197.0),   # TPU v5e
    ("v5e", 197.0),
    ("v5p", 459.0),
    ("tpu v5", 459.0),    # v5p reports "TPU v5"
    ("tpu v4", 275.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),      # SXM
    ("a100", 312.0),
)


def table_peak_tflops(device_kind: str) -> float | None:
    """Published dense bf16 peak for `device_kind` (e.g. "TPU v5 lite"), or None if unknown."""
    kind = device_kind.lower()
    for key, peak in PEAK_BF16_TFLOPS:
        if key in kind:
            return peak
    return None


def measure_matmul_tflops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """Best achieved TFLOP/s of an (n, n) @ (n, n) matmul on the default device."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e12


def device_peak(matmul_n: int = 2048) -> dict:
    """{'kind', 'platform', 'count', 'peak_tflops', 'peak_source'} for the default device (per chip)."""
    d = jax.devices()[0]
    peak = table_peak_tflops(d.device_kind)
    source = "published dense bf16 peak per chip"
    if peak is None:  # CPU (all host "devices" share one thread pool) or an unlisted accelerator
        dtype = jnp.float32 if d.platform == "cpu" else jnp.bfloat16
        peak = measure_matmul_tflops(matmul_n, dtype=dtype)
        source = f"measured in this run: best {jnp.dtype(dtype).name} {matmul_n}^3 matmul"
    return {"kind": d.device_kind, "platform": d.platform, "count": jax.device_count(), "peak_tflops": peak,
            "peak_source": source}
