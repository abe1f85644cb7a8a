"""Does the quality filter help downstream? Row (c) real + synthetic against (c') real + only the
synthetic records whose annotation confidence (``image/quality``) reaches a threshold, on a demo
workdir (its ``synthetic/`` records, the demo's real / test data and downstream settings).

    python -m datasetdm_jax.downstream.quality --demo_config configs/shapes_demo.py [--min_quality Q |
        --drop_fraction 0.25] [--tasks semantic depth] [--steps N] [--workdir runs/demo]
        [--downstream_config configs/downstream_shapes.py]

Both rows train with the same steps, batch size, seed and synthetic share per batch; only the pool
of synthetic examples differs. Writes ``quality_filter.json`` and ``quality_filter.txt`` into the
workdir and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from datasetdm_jax.config_utils import configs_dir, load_config

__all__ = ["record_qualities", "threshold_for", "compare_quality_filter", "main"]

FILTERED = "real+filtered"


def record_qualities(folder: str) -> np.ndarray:
    """``image/quality`` of every record in index order (no image decoding)."""
    from datasetdm_jax.data import records

    out = []
    for s in records.read_manifest(folder)["shards"]:
        for data in records.read_tfrecord(os.path.join(folder, s["files"]["tfrecord"]["file"])):
            q = records.parse_example(data).get("image/quality")
            if not q:
                raise ValueError(f"{folder}: a record of {s['name']} has no image/quality")
            out.append(q[0])
    return np.asarray(out, np.float64)


def threshold_for(qualities: np.ndarray, drop_fraction: float) -> float:
    """The confidence below which ``drop_fraction`` of the records lie."""
    if not 0.0 < drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in (0, 1), got {drop_fraction}")
    return float(np.quantile(qualities, drop_fraction))


def compare_quality_filter(real: dict, synthetic_dir: str, tests: dict, config: ml_collections.ConfigDict,
                           min_quality: float, *, progress: bool = True) -> dict[str, Any]:
    """Rows ``real+synthetic`` (all records) and ``real+filtered`` (records >= ``min_quality``)
    for ``config.tasks``; the result has the shape of ``compare.run_comparison``'s plus
    ``synthetic_filter`` (read / kept / dropped / min_quality) and per-row synthetic counts."""
    from datasetdm_jax.downstream import compare, data

    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.rows = ("real+synthetic",)
    num = int(cfg.synthetic.get("num", 0)) or None
    everything = data.records_arrays(synthetic_dir, num, progress)
    counts: dict[str, Any] = {}
    kept = data.records_arrays(synthetic_dir, num, progress, min_quality=min_quality, counts=counts)
    full = compare.run_comparison(real, everything, tests, cfg, progress=progress)
    filt = compare.run_comparison(real, kept, tests, cfg, progress=progress)
    out = {**full, "rows": ["real+synthetic", FILTERED], "synthetic_filter": counts,
           "num_synthetic_by_row": {"real+synthetic": full["num_synthetic"], FILTERED: filt["num_synthetic"]},
           "row_names": {FILTERED: f"(c') real + synth. q>={min_quality:.3f}"}}
    for task in cfg.tasks:
        out[task] = {**full[task], FILTERED: filt[task]["real+synthetic"]}
        out["train"][task] = {**full["train"][task], FILTERED: filt["train"][task]["real+synthetic"]}
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from datasetdm_jax.downstream import compare, data

    p = argparse.ArgumentParser(prog="python -m datasetdm_jax.downstream.quality", description=__doc__.split("\n")[0])
    p.add_argument("--demo_config", default="configs/shapes_demo.py", help="the demo config (FILE.py[:variant])")
    p.add_argument("--downstream_config", default=None, help="downstream config (default: the demo's)")
    p.add_argument("--workdir", default=None, help="demo workdir (default: the config's); reads WORKDIR/synthetic")
    p.add_argument("--min_quality", type=float, default=None, help="keep synthetic records with quality >= this")
    p.add_argument("--drop_fraction", type=float, default=0.25,
                   help="without --min_quality: drop this least-confident share of the records")
    p.add_argument("--tasks", nargs="+", default=None, help="subset of the downstream tasks (semantic, depth)")
    p.add_argument("--steps", type=int, default=None, help="training steps per row (default: the demo's)")
    args = p.parse_args(argv)

    demo = load_config(args.demo_config)
    workdir = args.workdir or str(demo.workdir)
    synthetic_dir = os.path.join(workdir, "synthetic")
    d = demo.downstream
    ds = load_config(args.downstream_config or os.path.join(configs_dir(), str(d.config)))
    ds.semantic.steps, ds.depth.steps = int(d.semantic_steps), int(d.depth_steps)  # as the demo trains them
    if args.steps:
        ds.semantic.steps = ds.depth.steps = int(args.steps)
    if args.tasks:
        ds.tasks = tuple(args.tasks)
    qualities = record_qualities(synthetic_dir)
    q = args.min_quality if args.min_quality is not None else threshold_for(qualities, args.drop_fraction)
    print(f"{synthetic_dir}: {len(qualities)} records, quality min/25%/50%/75%/max "
          + " / ".join(f"{v:.3f}" for v in np.quantile(qualities, [0, .25, .5, .75, 1])) + f"; threshold {q:.4f}")
    real = data.shapes_arrays(ds.real.split, int(ds.real.num_images), int(ds.real.seed), int(ds.real.image_size))
    tests = {s: data.shapes_arrays(s, int(d.test_images), int(ds.test.seed), int(ds.test.image_size))
             for s in ds.test.splits}
    result = compare.jsonable(compare_quality_filter(real, synthetic_dir, tests, ds, q))
    c = result["synthetic_filter"]
    table = compare.format_table(result)
    print(table)
    print(f"quality filter: kept {c['kept']} of {c['read']} synthetic records ({c['dropped']} below {q:.4f} dropped)")
    with open(os.path.join(workdir, "quality_filter.json"), "w") as f:
        json.dump({"demo_config": args.demo_config, "downstream_config": ds.to_dict(), "steps": {t: int(ds[t].steps) for t in ds.tasks},
                   "quality_quantiles": np.quantile(qualities, [0, .25, .5, .75, 1]).tolist(), **result}, f, indent=1)
    with open(os.path.join(workdir, "quality_filter.txt"), "w") as f:
        f.write(table + "\n")
    return result


if __name__ == "__main__":
    from datasetdm_jax import devices

    devices.use_host_cores()
    main()
