"""Markdown tables for a bench report (the same text goes into docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _gib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def format_report(rep: dict[str, Any]) -> str:
    if "model" not in rep:  # --memory-only
        d = rep["device"]
        head = f"device: {d['kind']} ({d['platform']}) x{d['count']}"
        return "\n".join([head] + _memory_lines(rep, d["platform"]))
    d, m, s = rep["device"], rep["model"], rep["settings"]
    p = m["params"]
    text = f"{p['text_encoder']:,}" + (f" + {p['text_encoder_2']:,}" if "text_encoder_2" in p else "")
    out = [
        f"device: {d['kind']} ({d['platform']}) x{d['count']}; peak {d['peak_tflops']:.3g} TFLOP/s per device "
        f"({d['peak_source']})",
        f"model: {m['name']} ({m['source']}); {m['size']} px, latent {'x'.join(map(str, m['latent']))}, "
        f"{m['tokens']} tokens, {m['dtype']}; params unet {p['unet']:,} / vae {p['vae']:,} / text {text}",
        f"settings: {s['steps']} {s['scheduler']} steps, guidance {s['guidance']}, capture {s['capture']}, "
        f"median of {s['repeats']} interleaved repeats",
        "",
        "| run | devices | compile s | median s [min-max] | img/s | GFLOP | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["rows"]:
        out.append(f"| {r['name']} | {r['devices']} | {_f(r['compile_s'], '.1f')} | {r['median_s']:.3f} "
                   f"[{r['min_s']:.3f}-{r['max_s']:.3f}] | {_f(r['images_per_s'], '.2f')} | "
                   f"{_f(r['gflop'] or None, '.1f')} | {_f(r['tflops'] if r['gflop'] else None, '.3f')} | "
                   f"{_f(r['mfu'], '.1%')} |")
    out += ["", f"capture overhead, one UNet forward: {rep['capture_overhead_unet']:+.1%}"]
    gens = rep.get("generation", [])
    if gens:
        cols = [k.removeprefix("speedup_vs_") for k in gens[0] if k.startswith("speedup_vs_")]
        head = ["batch", "JAX s", "JAX img/s", "+capture overhead", "generate.sample s (Python API)"]
        head += [h for c in cols for h in (f"diffusers {c} s", f"JAX speedup vs {c}", f"max abs image diff vs {c}")]
        out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g in gens:
            cells = [str(g["batch"]), f"{g['jax_s']:.3f}", f"{g['batch'] / g['jax_s']:.2f}",
                     f"{g['capture_overhead']:+.1%}", f"{g['python_api_s']:.3f}"]
            cells += [x for c in cols for x in (f"{g[f'diffusers_{c}_s']:.3f}", f"{g[f'speedup_vs_{c}']:.2f}x",
                                                 f"{g[f'max_abs_diff_vs_{c}']:.2g}")]
            out.append("| " + " | ".join(cells) + " |")
        if cols:
            t = rep.get("torch", {})
            out.append(f"(speedup = diffusers time / JAX time, same weights, scheduler, steps, batch and x_T; image "
                       f"diff in [0, 1] pixels; torch {t.get('torch')}, diffusers {t.get('diffusers')}, "
                       f"{t.get('threads')} threads)")
    if "compile" in rep:
        c = rep["compile"]
        out += ["", f"compile of `{c['program']}` in a fresh process: cold {c['cold']['compile_s']:.1f} s "
                f"(+{c['cold']['trace_s']:.1f} s tracing), warm persistent cache {c['warm']['compile_s']:.1f} s "
                f"(+{c['warm']['trace_s']:.1f} s tracing)"]
    out += _memory_lines(rep, d["platform"])
    return "\n".join(out)


def _memory_lines(rep: dict[str, Any], platform: str) -> list[str]:
    if not rep.get("memory"):
        return []
    if "program" in rep["memory"][0]:
        return _sdxl_memory_lines(rep["memory"], platform)
    out = ["", "| model | px | dtype | capture | peak GiB, batch 1 | GiB per extra image | fixed GiB | "
           "largest batch in budget | peak GiB at that batch | GFLOP per image (steps) | "
           "est. v5e img/s/chip at 50% MFU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["memory"]:
        flops = f"{r['gflop_per_image']:,.1f} ({r['steps']})" if "gflop_per_image" in r else "-"
        est = _f(r.get("est_v5e_img_per_s_at_50pct_mfu"), ".2f")
        out.append(f"| {r['model']} | {r['size']} | {r['dtype']} | {r['capture']} | {_gib(r['peak_b1_bytes'])} | "
                   f"{_gib(r['per_image_bytes'])} | {_gib(r['fixed_bytes'])} | {r['max_batch']} "
                   f"({_gib(r['budget_bytes'])} GiB) | {_gib(r['peak_at_max_batch_bytes'])} | {flops} | {est} |")
    out.append(f"(XLA memory analysis of the compiled generation program on {platform}, never run: arguments + "
               "outputs + temporaries. GFLOP from XLA's cost analysis; img/s at 50% MFU = 0.5 x 197 TFLOP/s / "
               "FLOPs per image: an estimate, not a measurement)")
    return out


def _sdxl_memory_lines(rows: list[dict[str, Any]], platform: str) -> list[str]:
    out = ["", "| model (compile only) | program | px | batch | dtype | peak GiB | arguments GiB | temporaries GiB | "
           "GFLOP per call |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['program']} | {r['size']} | {r['batch']} | {r['dtype']} | {r['peak_gib']:.2f} | "
                   f"{r['argument_gib']:.2f} | {r['temp_gib']:.2f} | {r['gflop']:,.1f} |")
    out.append(f"(XLA memory and cost analysis of each program compiled on {platform} from abstract weights, never "
               "run; sdxl is the SDXL base architecture, whatever model the timings above ran)")
    return out


def print_report(rep: dict[str, Any]) -> None:
    print(format_report(rep))
