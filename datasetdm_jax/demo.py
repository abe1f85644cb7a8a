"""`datasetdm demo`: DatasetDM proven end to end on the shapes world, on a CPU, with no downloads.

1. load the shipped shapes-world Stable Diffusion; 2. train the P-Decoders (semantic, depth) on 100
labelled real images; 3. generate an annotated synthetic dataset (one sampler pass, both decoders);
4. train the downstream segmenter and depth net on (a) real, (b) synthetic, (c) real + synthetic;
5. evaluate on the real test and domain-shifted splits; 6. print the paper-style table and write
``report.json`` and ``figure.png``. Every stage is cached in the workdir (decoder checkpoints,
generated shards, the downstream results), so rerunning skips finished work.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import ml_collections
import numpy as np

from datasetdm_jax.config_utils import load_config

__all__ = ["CONFIGS_DIR", "run", "check_claims", "main_demo"]

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TASKS = ("semantic", "depth")


def _config(name: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    return load_config(os.path.join(CONFIGS_DIR, name), list(overrides))


def _decoder_configs(config: ml_collections.ConfigDict, workdir: str, model: str) -> dict[str, Any]:
    out = {}
    for task in TASKS:
        d = config.decoders[task]
        cfg = _config(d.config, [f"steps={int(d.steps)}", f"pipeline={model}"])
        cfg.workdir = os.path.join(workdir, f"decoder_{task}")
        g = config.generate
        for k in ("steps", "guidance", "scheduler", "batch_size", "seed", "shard_size"):
            cfg.generate[k] = g[k]
        out[task] = cfg
    return out


def _downstream(config: ml_collections.ConfigDict, workdir: str, synthetic_dir: str) -> dict[str, Any]:
    """Rows (a)-(c) for both tasks, cached as downstream.json (keyed by the settings)."""
    from datasetdm_jax.downstream import compare, data

    cache = Path(workdir) / "downstream.json"
    d = config.downstream
    ds = _config(d.config)
    ds.semantic.steps, ds.depth.steps = int(d.semantic_steps), int(d.depth_steps)
    key = {"downstream": json.loads(ds.to_json()), "test_images": int(d.test_images),
           "synthetic": json.loads((Path(synthetic_dir) / "manifest.json").read_text())["shards"]}
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return stored["result"]
    real = data.shapes_arrays(ds.real.split, int(ds.real.num_images), int(ds.real.seed), int(ds.real.image_size))
    synthetic = data.records_arrays(synthetic_dir)
    tests = {s: data.shapes_arrays(s, int(d.test_images), int(ds.test.seed), int(ds.test.image_size))
             for s in ds.test.splits}
    result = compare.jsonable(compare.run_comparison(real, synthetic, tests, ds))
    cache.write_text(json.dumps({"key": key, "result": result}, indent=1))
    return result


def check_claims(result: dict[str, Any], min_gain: float) -> list[dict[str, Any]]:
    """The paper's claims, each with the measured numbers and whether it held."""
    sem, dep = result.get("semantic", {}), result.get("depth", {})
    claims = []
    if sem:
        gain = {s: 100 * (sem["real+synthetic"][s]["miou"] - sem["real"][s]["miou"]) for s in sem["real"]}
        claims.append({"claim": f"(c) real+synthetic beats (a) real by >= {min_gain:g} mIoU on the test split",
                       "measured": round(gain.get("test", float("nan")), 2),
                       "holds": bool(gain.get("test", -1e9) >= min_gain)})
        if "test_shifted" in gain:
            claims.append({"claim": "the gain is positive and larger on the domain-shifted split",
                           "measured": round(gain["test_shifted"], 2),
                           "holds": bool(gain["test_shifted"] > max(gain.get("test", 1e9), 0.0))})
    if dep:
        claims.append({"claim": "depth REL improves with synthetic data (c) vs (a), test split",
                       "measured": [round(dep["real"]["test"]["rel"], 4), round(dep["real+synthetic"]["test"]["rel"], 4)],
                       "holds": bool(dep["real+synthetic"]["test"]["rel"] < dep["real"]["test"]["rel"])})
    return claims


def _figure(path: str, synthetic_dir: str, result: dict[str, Any]) -> None:
    """Sample generated images with their labels, and the results as bar charts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from datasetdm_jax import export
    from datasetdm_jax.data import records

    examples = []
    for ex in records.read_tfrecords(synthetic_dir):
        examples.append(ex)
        if len(examples) == 6:
            break
    fig = plt.figure(figsize=(13, 7.5))
    for i, ex in enumerate(examples):
        ax = fig.add_subplot(3, 6, 1 + i)
        ax.imshow(ex["image"])
        ax.set_title(ex.get("prompt", "")[:34], fontsize=6)
        ax = fig.add_subplot(3, 6, 7 + i)
        ax.imshow(export.overlay(ex))
        ax = fig.add_subplot(3, 6, 13 + i) if i < 3 else None
        if ax is not None and "depth" in ex:
            ax.imshow(ex["depth"], cmap="magma_r")
    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    rows = result["rows"]
    splits = result["test_splits"]
    for j, (task, metric, label) in enumerate((("semantic", "miou", "mIoU (higher is better)"),
                                               ("depth", "rel", "depth REL (lower is better)"))):
        if task not in result:
            continue
        ax = fig.add_axes([0.55 + 0.23 * j, 0.06, 0.19, 0.25])
        width = 0.8 / len(rows)
        for k, row in enumerate(rows):
            vals = [result[task][row][s][metric] for s in splits]
            ax.bar(np.arange(len(splits)) + k * width, vals, width, label=row)
        ax.set_xticks(np.arange(len(splits)) + width * (len(rows) - 1) / 2, splits, fontsize=7)
        ax.set_title(label, fontsize=8)
        ax.legend(fontsize=6)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config: ml_collections.ConfigDict, *, progress: bool = True) -> dict[str, Any]:
    """All stages; returns the report (also written to ``<workdir>/report.json``)."""
    import jax.numpy as jnp

    from datasetdm_jax import assets, generate, pretrained, train
    from datasetdm_jax.downstream import compare

    workdir = str(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.time()
    model = str(config.model) or assets.shapes_sd_path()
    pipe = pretrained.load_pipeline(model, dtype=jnp.float32)
    times["load"] = time.time() - t0

    print("[1/4] P-Decoders on 100 labelled real images")
    t = time.time()
    decoder_cfgs = _decoder_configs(config, workdir, model)
    decoder_results = {}
    for task, cfg in decoder_cfgs.items():
        train.run(cfg, pipe=pipe)
        decoder_results[task] = json.loads((Path(cfg.workdir) / train.RESULTS_FILE).read_text())
    times["decoders"] = time.time() - t

    print(f"[2/4] generating {int(config.generate.num_images)} annotated images")
    t = time.time()
    synthetic_dir = os.path.join(workdir, "synthetic")
    labeler = generate.DecoderLabeler(decoder_cfgs["semantic"], pipe=pipe, also=[decoder_cfgs["depth"]])
    manifest = generate.generate_dataset(decoder_cfgs["semantic"], int(config.generate.num_images), synthetic_dir,
                                         pipe=pipe, labeler=labeler, progress=progress)
    times["generate"] = time.time() - t

    print("[3/4] downstream models: (a) real, (b) synthetic, (c) real + synthetic")
    t = time.time()
    result = _downstream(config, workdir, synthetic_dir)
    times["downstream"] = time.time() - t

    print("[4/4] report")
    claims = check_claims(result, float(config.claims.min_miou_gain))
    report = {"model": model, "decoders": decoder_results, "generated": manifest["counts"],
              "downstream": result, "claims": claims, "seconds": {k: round(v, 1) for k, v in times.items()}}
    Path(workdir, "report.json").write_text(json.dumps(report, indent=1))
    _figure(os.path.join(workdir, "figure.png"), synthetic_dir, result)
    print(compare.format_table(result))
    for c in claims:
        print(f"- {'HOLDS' if c['holds'] else 'DOES NOT HOLD'}: {c['claim']} (measured {c['measured']})")
    total = time.time() - t0
    print(f"demo: {total / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f"); report {workdir}/report.json, figure {workdir}/figure.png")
    return report


def main_demo(config_path: str | None = None, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI body of ``datasetdm demo [--config configs/shapes_demo.py[:small]] [key=value ...]``."""
    config = load_config(config_path or os.path.join(CONFIGS_DIR, "shapes_demo.py"), overrides)
    return run(config)
