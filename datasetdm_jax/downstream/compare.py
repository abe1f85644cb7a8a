"""The paper's downstream comparison: train the same model on (a) real only, (b) synthetic only,
(c) real + synthetic, and evaluate each on real test splits (DatasetDM Table 1 style).

Every row trains for the same number of steps with the same batch size, model, seed and
augmentation; only where the examples come from differs. In (c) each batch holds a fixed share of
synthetic examples (``config.synthetic_fraction``, default half).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import ml_collections
import numpy as np

from datasetdm_jax.downstream.data import ArraySource, Augment, MixedBatches, validate_arrays
from datasetdm_jax.downstream.trainer import LABEL_KEY, Trained, evaluate, train

__all__ = ["ROWS", "row_weights", "run_comparison", "format_table", "jsonable"]

ROWS = ("real", "synthetic", "real+synthetic")


def row_weights(row: str, synthetic_fraction: float = 0.5) -> dict[str, float]:
    """Mixing weights of a comparison row."""
    if row == "real":
        return {"real": 1.0}
    if row == "synthetic":
        return {"synthetic": 1.0}
    if row == "real+synthetic":
        f = float(synthetic_fraction)
        if not 0.0 < f < 1.0:
            raise ValueError(f"synthetic_fraction must be in (0, 1), got {f}")
        return {"real": 1.0 - f, "synthetic": f}
    raise ValueError(f"unknown comparison row {row!r}; expected one of {ROWS}")


def _augment(config: ml_collections.ConfigDict, image_hw: tuple[int, int]) -> Augment | None:
    a = config.get("augment")
    if a is None or not a.get("enabled", True):
        return None
    crop = tuple(int(v) for v in a.crop) if a.get("crop") else image_hw
    return Augment(crop=crop, flip=bool(a.flip), scale=tuple(float(v) for v in a.scale),
                   scale_depth=bool(a.get("scale_depth", True)))


def _train_row(task_cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict, row: str,
               data: Mapping[str, Mapping[str, np.ndarray]], progress: bool) -> Trained:
    weights = row_weights(row, float(config.get("synthetic_fraction", 0.5)))
    seed = int(task_cfg.seed)
    sources = {k: ArraySource(data[k], seed=seed + i, name=k) for i, k in enumerate(weights)}
    hw = tuple(next(iter(data.values()))["image"].shape[1:3])
    batches = MixedBatches(sources, weights, int(task_cfg.batch_size), _augment(config, hw), seed=seed)
    return train(task_cfg, batches, progress=progress, desc=f"{task_cfg.task} [{row}]")


def run_comparison(real: Mapping[str, np.ndarray], synthetic: Mapping[str, np.ndarray] | None,
                   test_sets: Mapping[str, Mapping[str, np.ndarray]], config: ml_collections.ConfigDict,
                   *, progress: bool = True, keep_models: bool = False) -> dict[str, Any]:
    """Train rows (a) real, (b) synthetic, (c) real + synthetic for each task in ``config.tasks``
    and evaluate on every test set. Returns::

        {"rows": [...], "num_real": N, "num_synthetic": M, "test_splits": [...],
         "semantic": {row: {split: {"miou", "per_class_iou", "pixel_acc"}}},
         "depth": {row: {split: {"rel", "rmse", "delta1"}}},
         "train": {task: {row: {"steps", "seconds", "img_per_s", "final_loss"}}}}

    ``config``: tasks, rows (default all three), synthetic_fraction, augment, eval, and one
    task config per task (``config.semantic``, ``config.depth``, see ``trainer.train``).
    With ``keep_models`` the trained models are returned under "models" (not JSON-able).
    """
    rows = tuple(config.get("rows", ROWS))
    tasks = tuple(config.tasks)
    needs_syn = any(r != "real" for r in rows)
    if needs_syn and synthetic is None:
        raise ValueError(f"rows {rows} need synthetic data, got none (set rows=('real',) to train on real only)")
    data = {"real": validate_arrays(real, "real")}
    if synthetic is not None:
        data["synthetic"] = validate_arrays(synthetic, "synthetic")
    tests = {k: validate_arrays(v, f"test split {k!r}") for k, v in test_sets.items()}
    ev = config.get("eval", ml_collections.ConfigDict())
    max_depth = float(ev.get("max_depth", 0.0)) or None
    result: dict[str, Any] = {"rows": list(rows), "num_real": int(len(data["real"]["image"])),
                              "num_synthetic": int(len(data["synthetic"]["image"])) if "synthetic" in data else 0,
                              "test_splits": list(tests), "train": {}}
    models: dict[str, dict[str, Trained]] = {}
    for task in tasks:
        task_cfg = config[task]
        key = LABEL_KEY[task]
        for name, arr in list(data.items()) + list(tests.items()):
            if key not in arr:
                raise ValueError(f"{name}: task {task!r} needs '{key}' labels")
        result[task], result["train"][task], models[task] = {}, {}, {}
        for row in rows:
            trained = _train_row(task_cfg, config, row, data, progress)
            result["train"][task][row] = {"steps": int(task_cfg.steps), "seconds": round(trained.seconds, 2),
                                          "img_per_s": round(trained.img_per_s, 2),
                                          "final_loss": trained.history[-1][1] if trained.history else None}
            result[task][row] = {split: evaluate(trained, t, int(ev.get("batch_size", 32)),
                                                 float(ev.get("min_depth", 1e-3)), max_depth)
                                 for split, t in tests.items()}
            if keep_models:
                models[task][row] = trained
    if keep_models:
        result["models"] = models
    return result


def _row_counts(result: Mapping[str, Any], row: str) -> tuple[str, str]:
    real = str(result["num_real"]) if row == "real" or row.startswith("real+") else "-"
    syn = str(result.get("num_synthetic_by_row", {}).get(row, result["num_synthetic"])) if row != "real" else "-"
    return real, syn


def format_table(result: Mapping[str, Any]) -> str:
    """The comparison as a plain-text table: # real, # synth., mIoU (%) and REL per test split."""
    splits = result["test_splits"]
    head = ["method", "# real", "# synth."]
    if "semantic" in result:
        head += [f"mIoU {s}" for s in splits]
    if "depth" in result:
        head += [f"REL {s}" for s in splits]
    names = {"real": "(a) real only", "synthetic": "(b) synthetic only", "real+synthetic": "(c) real + synth.",
             "attention": "(d) synth., attention labels", "real+attention": "(e) real + synth., attention",
             "consensus": "(f) synth., consensus labels",
             **result.get("row_names", {})}
    lines = [head]
    for row in result["rows"]:
        cells = [names.get(row, row), *_row_counts(result, row)]
        if "semantic" in result:  # a row may be scored for one task only ("-" for the other)
            sem = result["semantic"].get(row)
            cells += [f"{100 * sem[s]['miou']:.1f}" if sem else "-" for s in splits]
        if "depth" in result:
            dep = result["depth"].get(row)
            cells += [f"{dep[s]['rel']:.3f}" if dep else "-" for s in splits]
        lines.append(cells)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in lines)


def jsonable(x: Any) -> Any:
    """NaN -> None, numpy scalars -> Python, recursively (for ``json.dump``)."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items() if k != "models"}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x
