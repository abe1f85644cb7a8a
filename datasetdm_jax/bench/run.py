"""`datasetdm bench`: every measurement of one run, as one report (a JSON-ready dict).

Sections: UNet forward with / without capture and one sampler step; full generation over a
batch sweep, side by side with diffusers' PyTorch pipeline on the same weights (fp32, and bf16
as the stretch), timings interleaved; one P-Decoder train step; compile time cold and warm in
fresh processes; and peak memory of SD-sized generation from the compiled memory analysis.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from datasetdm_jax import pretrained
from datasetdm_jax.bench import memory, models, peaks, programs
from datasetdm_jax.bench.config import SDXL_MEMORY_MODELS, BenchConfig, memory_settings
from datasetdm_jax.bench.timing import compile_fn, make_timing, time_interleaved


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _micro(cfg: BenchConfig, pipe, size: int, batch: int, peak: float) -> list:
    """UNet forward with and without capture, and one sampler step, interleaved."""
    progs = {
        f"unet fwd (CFG batch {2 * batch})": programs.unet_forward(pipe, batch, size, devices=cfg.devices),
        f"unet fwd +capture (CFG batch {2 * batch})": programs.unet_forward(pipe, batch, size, capture=cfg.capture,
                                                                            devices=cfg.devices),
        f"sampler step ({cfg.scheduler}, {batch} images)": programs.sampler_step(
            pipe, batch, size, steps=cfg.steps, scheduler=cfg.scheduler, guidance=cfg.guidance, devices=cfg.devices),
    }
    compiled = {k: compile_fn(p.fn, *p.args) for k, p in progs.items()}
    times = time_interleaved({k: (lambda c=compiled[k], p=p: c.fn(*p.args)) for k, p in progs.items()}, cfg.repeats)
    return [make_timing(k, times[k], compiled[k], devices=progs[k].devices, peak_tflops=peak) for k in progs]


def _step_gflop(cfg: BenchConfig, pipe, size: int, batch: int, known: dict[int, float]) -> float:
    """FLOPs of one sampler step at `batch` (compiled once per batch: `known` caches them)."""
    if batch not in known:
        step = programs.sampler_step(pipe, batch, size, steps=cfg.steps, scheduler=cfg.scheduler,
                                     guidance=cfg.guidance, devices=cfg.devices)
        known[batch] = compile_fn(step.fn, *step.args).gflop
    return known[batch]


def _generation(cfg: BenchConfig, pipe, size: int, batch: int, peak: float, torch_pipes: dict,
                step_gflops: dict[int, float]) -> tuple[list, dict]:
    """Generation of `batch` images with and without capture, and diffusers on the same batch."""
    rows, calls, comp = [], {}, {}
    step_gflop = _step_gflop(cfg, pipe, size, batch, step_gflops)
    for capture in (None, cfg.capture):
        name = f"generate b{batch}" + (" +capture" if capture else "")
        prog = programs.generation(pipe, batch, size, steps=cfg.steps, scheduler=cfg.scheduler,
                                   guidance=cfg.guidance, capture=capture, devices=cfg.devices)
        c = compile_fn(prog.fn, *prog.args)
        # XLA counts the sampler loop's body once: add the other iterations.
        gflop = c.gflop + (programs.loop_trips(pipe, cfg.steps, cfg.scheduler, capture) - 1) * step_gflop
        comp[name] = (c, gflop, prog.devices)
        calls[name] = lambda c=c, p=prog: c.fn(*p.args)
    # The documented Python API, as a notebook user calls it: tokenizes, splits the batch over the
    # local devices and returns host arrays; it should run at the CLI program's speed.
    from datasetdm_jax import generate
    api_devices = min(cfg.devices or jax.local_device_count(), jax.local_device_count())
    comp[f"generate.sample b{batch}"] = (None, 0.0, api_devices)  # timed only (its program is "generate bN")
    calls[f"generate.sample b{batch}"] = lambda: generate.sample(
        pipe, [programs.PROMPT] * batch, steps=cfg.steps, guidance=cfg.guidance, scheduler=cfg.scheduler,
        height=size, width=size, num_devices=cfg.devices)
    from datasetdm_jax.bench import torch_ref
    x_T = generate.latent_noise(pipe, 0, np.arange(batch), programs.latent_shape(pipe, size)[:2])
    for dt, tp in torch_pipes.items():
        calls[f"diffusers {dt} b{batch}"] = torch_ref.generator(tp, programs.PROMPT, batch, size, cfg.steps,
                                                                 cfg.guidance, x_T)
    outputs: dict[str, Any] = {}
    times = time_interleaved(calls, cfg.repeats, outputs)
    for name, secs in times.items():
        c, gflop, devs = comp.get(name, (None, 0.0, 1))
        rows.append(make_timing(name, secs, c, gflop=gflop, images=batch, devices=devs,
                                peak_tflops=peak if c is not None else None))
    med = {k: statistics.median(v) for k, v in times.items()}
    jax_s = med[f"generate b{batch}"]
    cmp = {"batch": batch, "jax_s": jax_s, "jax_capture_s": med[f"generate b{batch} +capture"],
           "capture_overhead": med[f"generate b{batch} +capture"] / jax_s - 1,
           "python_api_s": med[f"generate.sample b{batch}"]}
    ours = np.asarray(outputs[f"generate.sample b{batch}"], np.float32)
    for dt in torch_pipes:
        cmp[f"diffusers_{dt}_s"] = med[f"diffusers {dt} b{batch}"]
        cmp[f"speedup_vs_{dt}"] = med[f"diffusers {dt} b{batch}"] / jax_s  # > 1: JAX is faster
        # the same x_T, prompts and scheduler: the images agree up to float error (bf16's is larger)
        theirs = np.asarray(outputs[f"diffusers {dt} b{batch}"], np.float32)
        cmp[f"max_abs_diff_vs_{dt}"] = float(np.abs(ours - theirs).max())
    return rows, cmp


def _train_step(cfg: BenchConfig, pipe, size: int, peak: float):
    """One P-Decoder train step (datasetdm_jax.train.Trainer) on shapes-world images at `size`."""
    from datasetdm_jax import train
    from datasetdm_jax.config_utils import load_config

    spec = models.configs_file("shapes_semantic.py") + (":tiny" if cfg.model == "tiny" else "")
    config = load_config(spec, [f"data.image_size={size}", f"capture={cfg.capture}"])
    tr = train.Trainer(config, pipe)
    batch = jax.device_put(tr.host_batch(next(train.train_iterator(config, None)), 0), tr.data_sharding)
    state = jax.device_put({"step": np.zeros((), np.int32), "params": tr.init_params,
                            "opt": tr.tx.init(tr.init_params)}, tr.repl)
    # The step's two jits (frozen SD features under the mesh, then the decoder's update), as step_fn runs them.
    key = jax.random.key(0)
    feats_c = compile_fn(tr.features_fn, tr.frozen, batch["image"], batch["input_ids"], key)
    feats = feats_c.fn(tr.frozen, batch["image"], batch["input_ids"], key)
    update_c = compile_fn(tr.decoder_step, state, feats, batch, in_shardings=(tr.repl, tr.data_sharding,
                                                                              tr.data_sharding))
    c = dataclasses.replace(feats_c, fn=None, compile_s=feats_c.compile_s + update_c.compile_s,
                            gflop=feats_c.gflop + update_c.gflop)
    step = lambda: update_c.fn(state, feats_c.fn(tr.frozen, batch["image"], batch["input_ids"], key), batch)  # noqa: E731
    times = time_interleaved({"p": step}, cfg.repeats)["p"]
    n = int(config.batch_size)
    return make_timing(f"P-Decoder train step ({config.task}, batch {n})", times, c, images=n,
                       devices=tr.mesh.size, peak_tflops=peak)


def _memory(cfg: BenchConfig, workdir: str) -> list[dict[str, Any]]:
    """Compile-only memory: for SD, peak, largest batch in budget and GFLOP per image of generation;
    for SDXL, peak and GFLOP of each program at batch 1 (bench/sdxl.py)."""
    name, sizes = memory_settings(cfg)
    rows = []
    if name in SDXL_MEMORY_MODELS:
        from datasetdm_jax.bench import sdxl
        for s in sizes:
            _log(f"memory analysis: {name} at {s} px, per program (compile only)")
            rows += [{"model": name, **r} for r in sdxl.report(s, [1], jnp.dtype(cfg.memory_dtype),
                                                                configs=sdxl.ARCHITECTURES[name], out=sys.stderr)]
        return rows
    abstract = models.abstract_pipeline(name, f"{workdir}/{name}_abstract", jnp.dtype(cfg.memory_dtype))
    for s in sizes:
        _log(f"memory analysis: {name} at {s} px (compile only)")
        rows.append({"model": name, **memory.max_batch(
            abstract, s, capture=cfg.capture, budget_bytes=int(cfg.memory_budget_gib * memory.GIB),
            scheduler=cfg.scheduler, steps=cfg.steps)})
    return rows


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Runs every section `cfg` asks for; returns the report."""
    if cfg.model not in models.MODELS:
        raise ValueError(f"--model must be one of {', '.join(models.MODELS)}, got {cfg.model!r}")
    if not cfg.batches or min(cfg.batches) < 1:
        raise ValueError(f"--batch must list positive batch sizes, got {cfg.batches!r}")
    workdir = cfg.workdir or tempfile.mkdtemp(prefix="datasetdm_bench_")
    _log("device peak")
    device = peaks.device_peak()
    if cfg.memory_only:
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "workdir"}
        return {"device": device, "settings": settings, "rows": [], "memory": _memory(cfg, workdir)}
    peak = device["peak_tflops"]
    dtype = str(pretrained.resolve_dtype(cfg.dtype or "auto"))  # as the configs' dtype="auto"
    _log(f"model {cfg.model}")
    pipe, source, folder = models.load_model(cfg.model, f"{workdir}/{cfg.model}", jnp.dtype(dtype))
    size = cfg.size or models.native_size(pipe)
    report: dict[str, Any] = {
        "device": device,
        "model": {"name": cfg.model, "source": source, "params": models.param_counts(pipe), "size": size,
                  "latent": list(programs.latent_shape(pipe, size)), "tokens": pipe.max_length, "dtype": dtype},
        "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "workdir"},
        "rows": [], "generation": [],
    }
    head = cfg.batches[-1]
    _log(f"unet / sampler step, batch {head}")
    micro = _micro(cfg, pipe, size, head, peak)
    step_gflops = {head: micro[2].gflop}
    report["rows"] += micro
    report["capture_overhead_unet"] = micro[1].median_s / micro[0].median_s - 1

    torch_pipes = {}
    if cfg.torch or cfg.torch_bf16:
        from datasetdm_jax.bench import torch_ref
        folder = models.export(pipe, f"{workdir}/{cfg.model}", folder)
        for dt, on in (("float32", cfg.torch), ("bfloat16", cfg.torch_bf16)):
            if on:
                torch_pipes[dt] = torch_ref.load(folder, dt, cfg.scheduler)
        report["torch"] = torch_ref.info()
    for b in cfg.batches:
        _log(f"generation, batch {b}")
        rows, cmp = _generation(cfg, pipe, size, b, peak, torch_pipes, step_gflops)
        report["rows"] += rows
        report["generation"].append(cmp)
    del torch_pipes

    if cfg.train_step:
        _log("P-Decoder train step")
        report["rows"].append(_train_step(cfg, pipe, size, peak))

    if cfg.compile_probe:
        from datasetdm_jax.bench import compile_probe
        _log("compile time in fresh processes (cold, then warm persistent cache)")
        folder = models.export(pipe, f"{workdir}/{cfg.model}", folder)
        with tempfile.TemporaryDirectory(prefix="datasetdm_bench_cache_") as cache:
            report["compile"] = {"program": f"generate b{head} +capture", **compile_probe.run_twice(
                cache, folder, head, size, cfg.steps, cfg.scheduler, cfg.capture, dtype)}

    if cfg.memory:
        report["memory"] = _memory(cfg, workdir)
    report["rows"] = [r.to_dict() for r in report["rows"]]
    return report
