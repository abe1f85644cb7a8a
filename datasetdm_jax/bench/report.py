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
    out = [
        f"device: {d['kind']} ({d['platform']}) x{d['count']}; peak {d['peak_tflops']:.3g} TFLOP/s per device "
        f"({d['peak_source']})",
        f"model: {m['name']} ({m['source']}); {m['size']} px, latent {'x'.join(map(str, m['latent']))}, "
        f"{m['tokens']} tokens, {m['dtype']}; params unet {p['unet']:,} / vae {p['vae']:,} / text {p['text_encoder']:,}",
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
        out += ["", "| batch | JAX s | JAX img/s | +capture overhead | generate.sample s (Python API) | "
                + " | ".join(f"diffusers {c} s | JAX speedup vs {c}" for c in cols) + " |",
                "|---|---|---|---|---|" + "---|---|" * len(cols)]
        for g in gens:
            out.append(f"| {g['batch']} | {g['jax_s']:.3f} | {g['batch'] / g['jax_s']:.2f} | {g['capture_overhead']:+.1%} | "
                       f"{g['python_api_s']:.3f} | "
                       + " | ".join(f"{g[f'diffusers_{c}_s']:.3f} | {g[f'speedup_vs_{c}']:.2f}x" for c in cols) + " |")
        if cols:
            t = rep.get("torch", {})
            out.append(f"(speedup = diffusers time / JAX time, same weights, scheduler, steps and batch; "
                       f"torch {t.get('torch')}, diffusers {t.get('diffusers')}, {t.get('threads')} threads)")
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


def print_report(rep: dict[str, Any]) -> None:
    print(format_report(rep))
