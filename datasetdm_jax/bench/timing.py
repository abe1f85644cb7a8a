"""`datasetdm bench`: timings measured on whatever device runs it.

Reports compile time, steady-state time (median of repeats), FLOPs from XLA's cost analysis and
the achieved rate. Comparisons are ratios measured side by side in the same run, never asserts.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from datasetdm_jax import features
from datasetdm_jax.pretrained import random_params
from datasetdm_jax.models import presets
from datasetdm_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel

UNET_CONFIGS = {"sd15": presets.SD15_UNET, "sd21": presets.SD21_UNET}


@dataclasses.dataclass
class Timing:
    name: str
    compile_s: float
    median_s: float
    min_s: float
    max_s: float
    gflop: float

    @property
    def gflops_per_s(self) -> float:
        return self.gflop / self.median_s


def time_jitted(named_fns: list[tuple[str, Callable]], *args, repeats: int = 5) -> list[Timing]:
    """AOT-compiles each `fn(*args)`, warms each up once, then times them round-robin, interleaved,
    so that load from other processes hits every variant alike."""
    compiled, compile_s, gflop = [], [], []
    for _, fn in named_fns:
        t0 = time.perf_counter()
        c = jax.jit(fn).lower(*args).compile()
        compile_s.append(time.perf_counter() - t0)
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        gflop.append(float((cost or {}).get("flops", 0.0)) / 1e9)
        jax.block_until_ready(c(*args))
        compiled.append(c)
    times = [[] for _ in named_fns]
    for _ in range(repeats):
        for k, c in enumerate(compiled):
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            times[k].append(time.perf_counter() - t0)
    return [Timing(name, compile_s[k], statistics.median(times[k]), min(times[k]), max(times[k]), gflop[k])
            for k, (name, _) in enumerate(named_fns)]


def bench_unet(config: str = "sd15", size: int = 256, batch: int = 2, repeats: int = 5, capture: bool = True):
    """UNet forward at image `size` (latent size/8) on a CFG batch of `batch` rows, with/without capture."""
    cfg = UNet2DConditionConfig.from_dict(UNET_CONFIGS[config])
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    state = jax.device_put(random_params(abstract_state))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    latent = size // 8
    x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, latent, latent, 4), np.float32))
    ctx = jnp.asarray(np.random.default_rng(2).standard_normal((batch, 77, cfg.cross_attention_dim[0]), np.float32))
    t = jnp.full((batch,), 500, jnp.int32)

    def plain(state, x, t, ctx):
        return nnx.merge(graphdef, state)(x, t, ctx)

    def captured(state, x, t, ctx):
        eps, taps = nnx.merge(graphdef, state)(x, t, ctx, capture=True)
        feats = features.extract(taps, "datasetdm", batch // 2)
        # Reduce so the captured tensors are really computed, as a decoder would consume them.
        return eps, sum(jnp.mean(v) for v in jax.tree.leaves(feats))

    named = [(f"{config} unet {size}px b{batch}", plain)]
    if capture:
        named.append((f"{config} unet {size}px b{batch} +capture", captured))
    return n_params, time_jitted(named, state, x, t, ctx, repeats=repeats)


def print_table(rows: list[Timing], header: str = "") -> None:
    if header:
        print(header)
    print("| run | compile s | median s [min-max] | GFLOP | GFLOP/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.compile_s:.1f} | {r.median_s:.3f} [{r.min_s:.3f}-{r.max_s:.3f}] | {r.gflop:.1f} | {r.gflops_per_s:.1f} |")


def main_unet(config: str, size: int, batch: int, repeats: int, json_out: str | None = None) -> None:
    n_params, rows = bench_unet(config, size, batch, repeats)
    print_table(rows, f"{config} UNet, {n_params:,} params, device {jax.devices()[0].device_kind} x{jax.device_count()}")
    if len(rows) == 2:
        print(f"capture overhead: {rows[1].median_s / rows[0].median_s - 1:+.1%}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
