"""`datasetdm exp proof`: does the P-Decoder on frozen diffusion features beat a model trained from scratch?

The proof on the shapes world (results: docs/experiments/p_decoder_vs_scratch.md). For each task
(semantic, instance, depth, pose) and on the same 100 labelled real images: the P-Decoder
(``train.run``: frozen SD features -> decoder) and a
scratch conv backbone + the same head (``baselines``: same loss, steps, batch, optimiser, flips),
both scored by ``tasks.Evaluator`` on the same test and domain-shifted test images. One more row:
the semantic P-Decoder without Mask2Former deep supervision (the shapes configs turn it on). Writes ``report.json`` and ``table.md``
and prints the table (with parameter counts and train times) and the claims it checks.

Stages, cached in ``<workdir>/<row>/``: ``p_decoder/`` (the train workdir, resumable mid-run),
``scratch/`` (its params), ``p_decoder_eval.json`` and ``scratch_eval.json`` (results keyed by
their settings: a changed test setting rescores without retraining). A P-Decoder checkpoint made with another model or decoder setting is refused
with a one-line error rather than silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from datasetdm_jax import keyed_cache
from datasetdm_jax.config_utils import configs_dir, load_config

__all__ = ["ROWS", "METRICS", "model_fingerprint", "task_config", "run", "check_claims", "format_tables",
           "main_proof"]

CONFIGS_DIR = configs_dir()  # the shipped configs (installed package or checkout)
DS_ROW = "semantic_without_deep_supervision"
ROWS = ("semantic", "instance", "depth", "pose", DS_ROW)
# task -> (metric key, label, higher is better, as percent) ; the first is the task's headline metric.
METRICS: dict[str, tuple[tuple[str, str, bool, bool], ...]] = {
    "semantic": (("miou", "mIoU", True, True),),
    "instance": (("AP", "mask AP", True, True), ("AP50", "AP50", True, True), ("AP75", "AP75", True, True),
                 ("ap_agnostic", "class-agnostic AP", True, True)),
    "depth": (("rel", "REL", False, False), ("rmse", "RMSE", False, False), ("delta1", "δ1", True, True)),
    "pose": (("AP", "keypoint AP", True, True), ("AP50", "AP50", True, True), ("AP75", "AP75", True, True)),
}
KEY_FILE = "proof_key.json"
TIMING_FILE = "proof_timing.json"
# Train-config fields that do not change what the P-Decoder learns (steps may grow: training goes on).
_NOT_TRAINING = ("workdir", "pipeline", "steps", "max_steps", "eval", "val", "eval_every", "log_every",
                 "checkpoint_every_s", "keep_checkpoints", "generate")


def _task(row: str) -> str:
    return "semantic" if row == DS_ROW else row


def model_fingerprint(path: str) -> str:
    """sha256 over a model folder's files (names and bytes): cached stages follow the weights."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def task_config(config: ml_collections.ConfigDict, row: str, model: str, workdir: str) -> ml_collections.ConfigDict:
    """The row's train config: the task config with the proof's steps, model, workdir and test split."""
    t = config.tasks[_task(row)]
    cfg = load_config(os.path.join(CONFIGS_DIR, str(t.config)))
    if int(t.steps) > 0:
        cfg.steps = int(t.steps)
    cfg.pipeline, cfg.workdir, cfg.max_steps = model, os.path.join(workdir, row, "p_decoder"), 0
    cfg.eval_every = int(config.eval_every)
    if row == DS_ROW:
        cfg.deep_supervision = False
    e = config.eval
    cfg.eval.split, cfg.eval.num_images, cfg.eval.seed, cfg.eval.batch_size = (
        str(e.splits[0]), int(e.num_images), int(e.seed), int(e.batch_size))
    return cfg


def _training_key(cfg: ml_collections.ConfigDict, fingerprint: str) -> dict[str, Any]:
    d = {k: v for k, v in json.loads(cfg.to_json()).items() if k not in _NOT_TRAINING}
    return {"model": fingerprint, **d}


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def _latest_step(train_workdir: str) -> int:
    from datasetdm_jax import train

    folder = os.path.join(train_workdir, train.STAGE)
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=0)


def _sec_per_step(train_workdir: str, since: float) -> float | None:
    """Steady-state seconds per step from this invocation's metrics.jsonl rows (compile excluded)."""
    from datasetdm_jax import train

    path = os.path.join(train_workdir, train.METRICS_FILE)
    if not os.path.isfile(path):
        return None
    rows = [r for r in map(json.loads, open(path)) if r.get("time", 0) >= since and "loss" in r]
    if len(rows) < 2 or rows[-1]["step"] == rows[0]["step"]:
        return None
    return (rows[-1]["time"] - rows[0]["time"]) / (rows[-1]["step"] - rows[0]["step"])


def _p_decoder(cfg: ml_collections.ConfigDict, row: str, pipe, fingerprint: str, splits: Sequence[str],
               frozen_params: int) -> dict[str, Any]:
    """Train (or resume) the row's P-Decoder, then score it on every split; cached."""
    from datasetdm_jax import train

    wd = str(cfg.workdir)
    os.makedirs(wd, exist_ok=True)
    tkey = _training_key(cfg, fingerprint)
    key_file, timing_file = Path(wd, KEY_FILE), Path(wd, TIMING_FILE)
    if key_file.is_file() and json.loads(key_file.read_text()) != _jsonable(tkey):
        raise ValueError(f"{wd} holds a P-Decoder trained with another model or settings ({key_file} differs); "
                         f"delete that folder or use another --out")
    if not key_file.is_file() and _latest_step(wd) > 0:
        raise ValueError(f"{wd} holds a checkpoint of unknown origin (no {KEY_FILE}); delete it or use another --out")
    key_file.write_text(json.dumps(tkey, indent=1))
    done = _latest_step(wd)
    if done > int(cfg.steps):
        raise ValueError(f"{wd} is trained to step {done}, past steps={int(cfg.steps)}; delete it or raise the steps")
    eval_key = {"training": tkey, "steps": int(cfg.steps), "eval": json.loads(cfg.eval.to_json()),
                "splits": list(splits)}
    cache = Path(wd).parent / "p_decoder_eval.json"
    hit = keyed_cache.load(cache, eval_key)
    if hit is not None and done == int(cfg.steps):
        return hit
    t0, c0 = time.time(), time.process_time()
    if done == int(cfg.steps) and os.path.isfile(os.path.join(wd, train.RESULTS_FILE)):  # trained: only score
        trainer, params, _ = train.load_trained_decoder(cfg, wd, pipe=pipe)
    else:
        finished, trainer, params = train.run(cfg, pipe=pipe)
        if not finished:
            raise RuntimeError(f"{row}: the P-Decoder stopped before steps={int(cfg.steps)}; rerun to resume")
    if done < int(cfg.steps):  # this invocation trained: its timing (the finishing run's, if resumed)
        timing_file.write_text(json.dumps({"train_s": round(time.time() - t0, 2), "resumed_from_step": done,
                                           "sec_per_step": _sec_per_step(wd, t0),
                                           "train_cpu_s": round(time.process_time() - c0, 1)}))
    elif not timing_file.is_file():
        timing_file.write_text(json.dumps({"train_s": None, "resumed_from_step": done, "sec_per_step": None}))
    res: dict[str, Any] = {"model": "P-Decoder on frozen SD features", "steps": int(cfg.steps),
                           "trainable_params": trainer.num_params, "frozen_params": frozen_params,
                           **json.loads(timing_file.read_text())}
    res.update(_score(lambda split: train.evaluate(trainer, params, split=split, per_class=True), splits))
    keyed_cache.store(cache, eval_key, res)
    return res


def _score(evaluate: Callable[[str], dict[str, Any]], splits: Sequence[str]) -> dict[str, Any]:
    """Metrics of every split and the seconds they took (the same for both kinds of row)."""
    t1 = time.time()
    out: dict[str, Any] = {split: evaluate(split) for split in splits}
    out["eval_s"] = round(time.time() - t1, 1)
    return out


def _scratch(cfg: ml_collections.ConfigDict, row: str, scfg: ml_collections.ConfigDict, target_params: int,
             splits: Sequence[str], progress: bool) -> dict[str, Any]:
    """Train the scratch model (same recipe; params cached) and score it on every split (cached)."""
    from flax import serialization

    from datasetdm_jax.research import baselines

    width = scfg.width
    width = baselines.match_width(cfg, target_params, tuple(scfg.widths)) if str(width) == "auto" else int(width)
    folder = Path(cfg.workdir).parent / "scratch"
    folder.mkdir(parents=True, exist_ok=True)
    tkey = {"training": _training_key(cfg, "-"), "steps": int(cfg.steps), "width": width}
    key = {"training": tkey, "eval": json.loads(cfg.eval.to_json()), "splits": list(splits)}
    cache = folder.parent / "scratch_eval.json"
    hit = keyed_cache.load(cache, key)
    if hit is not None:
        return hit
    trained = keyed_cache.load(folder / "trained.json", tkey)
    params_file = folder / "params.msgpack"
    if trained is not None and params_file.is_file():
        scratch = baselines.Scratch(cfg, width)
        params = baselines.load_params(scratch, params_file)
        timing = trained
    else:
        scratch, params, timing = baselines.train_scratch(cfg, width=width, progress=progress)
        tmp = params_file.with_suffix(".tmp")
        tmp.write_bytes(serialization.msgpack_serialize(serialization.to_state_dict(params)))
        os.replace(tmp, params_file)
        timing = {k: round(v, 4 if "per_step" in k else 2) for k, v in timing.items()}
        keyed_cache.store(folder / "trained.json", tkey, timing)
    res: dict[str, Any] = {"model": f"scratch conv backbone (width {width}) + the same head", "steps": int(cfg.steps),
                           "trainable_params": scratch.num_params, "frozen_params": 0, **timing}
    res.update(_score(lambda split: baselines.evaluate(scratch, params, split=split, per_class=True), splits))
    keyed_cache.store(cache, key, res)
    return res


def check_claims(rows: dict[str, dict[str, Any]], splits: Sequence[str]) -> list[dict[str, Any]]:
    """Per task and split: does the P-Decoder beat the scratch model on the headline metric? And
    does deep supervision help the semantic P-Decoder? Each with its measured numbers."""
    claims = []
    for row, r in rows.items():
        if "scratch" not in r:
            continue
        key, label, higher, _ = METRICS[_task(row)][0]
        for s in splits:
            pd, sc = r["p_decoder"][s][key], r["scratch"][s][key]
            claims.append({"claim": f"{row}: P-Decoder beats scratch on {label} ({s})",
                           "measured": {"p_decoder": round(pd, 4), "scratch": round(sc, 4)},
                           "holds": bool(pd > sc if higher else pd < sc)})
    if DS_ROW in rows and rows.get("semantic", {}).get("p_decoder", {}).get("deep_supervision"):
        for s in splits:
            a, b = rows[DS_ROW]["p_decoder"][s]["miou"], rows["semantic"]["p_decoder"][s]["miou"]
            claims.append({"claim": f"deep supervision helps the semantic P-Decoder (mIoU, {s})",
                           "measured": {"without": round(a, 4), "with": round(b, 4)}, "holds": bool(b > a)})
    return claims


def _fmt(v: float, percent: bool) -> str:
    if v is None or not np.isfinite(v):
        return "-"
    return f"{100 * v:.1f}" if percent else f"{v:.3f}"


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def format_tables(report: dict[str, Any]) -> str:
    """Markdown: one line per (task, model) with params, train time and the metrics; per-class IoU."""
    splits = report["settings"]["splits"]
    names = {"p_decoder": "P-Decoder", "scratch": "scratch"}
    head = ("| task | model | trainable params | train time | metric | " + " | ".join(splits)
            + f" | more ({splits[0]}) |")
    lines = [head, "|" + "---|" * (5 + len(splits) + 1)]
    for row, r in report["rows"].items():
        task = _task(row)
        (key, label, higher, pct), *more = METRICS[task]
        for m, res in r.items():
            name = names[m] + (" without deep supervision" if row == DS_ROW else "")
            params = _millions(res["trainable_params"])
            if res.get("frozen_params"):
                params += f" (+{_millions(res['frozen_params'])} frozen)"
            extra = ", ".join(f"{lb} {_fmt(res[splits[0]].get(k), p)}" for k, lb, _, p in more)
            minutes = "-" if res.get("train_s") is None else f"{res['train_s'] / 60:.1f} min"
            lines.append(f"| {task} | {name} | {params} | {minutes} | {label} "
                         f"{'↑' if higher else '↓'}{' (%)' if pct else ''} | "
                         + " | ".join(_fmt(res[s][key], pct) for s in splits) + f" | {extra} |")
    sem = [(row, m, res) for row, r in report["rows"].items() if _task(row) == "semantic" for m, res in r.items()]
    if sem:
        classes = report["settings"]["class_names"]
        cols = [f"{names[m]}{' - DS' if row == DS_ROW else ''} {s}" for row, m, _ in sem for s in splits]
        lines += ["", "Per-class IoU (%):", "", "| class | " + " | ".join(cols) + " |", "|" + "---|" * (1 + len(cols))]
        for c, name in enumerate(classes):
            values = [res[s]["per_class_iou"][c] for _, _, res in sem for s in splits]
            if not any(v is not None and np.isfinite(v) for v in values):
                continue  # a class absent from every test set (not in this world's classes)
            lines.append(f"| {name} | " + " | ".join(_fmt(res[s]["per_class_iou"][c], True)
                                                     for _, _, res in sem for s in splits) + " |")
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, *, progress: bool = True) -> dict[str, Any]:
    """All rows; returns the report (also ``<workdir>/report.json`` and ``table.md``)."""
    import jax

    from datasetdm_jax import assets, train
    from datasetdm_jax.data import shapes

    workdir = str(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    model = str(config.model) or assets.shapes_sd_path()
    fingerprint = model_fingerprint(model)
    pipe = train.load_frozen_pipeline(model)
    frozen_params = int(sum(np.size(x) for k in ("vae", "unet", *pipe.text_encoders)
                            for x in jax.tree.leaves(pipe.params[k])))
    splits = [str(s) for s in config.eval.splits]
    rows_cfg = config.rows  # 'depth,pose' or a sequence of names
    row_names = [r.strip() for r in rows_cfg.split(",")] if isinstance(rows_cfg, str) else [str(r) for r in rows_cfg]
    if not row_names or set(row_names) - set(ROWS):
        raise ValueError(f"rows={tuple(row_names)}: expected a non-empty subset of {ROWS}")
    rows: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for i, row in enumerate(row_names):
        t = time.time()
        cfg = task_config(config, row, model, workdir)
        print(f"[{i + 1}/{len(row_names)}] {row}: P-Decoder" + ("" if row == DS_ROW else " and scratch")
              + f", {int(cfg.steps)} steps each", flush=True)
        pd = _p_decoder(cfg, row, pipe, fingerprint, splits, frozen_params)
        rows[row] = {"p_decoder": {**pd, "deep_supervision": bool(cfg.get("deep_supervision", False))}}
        if row != DS_ROW:
            rows[row]["scratch"] = _scratch(cfg, row, config.scratch, pd["trainable_params"], splits, progress)
        seconds[row] = round(time.time() - t, 1)
    semantic = [r["p_decoder"][splits[0]] for row, r in rows.items() if _task(row) == "semantic"]
    num_classes = len(semantic[0]["per_class_iou"]) if semantic else 0
    names = list(shapes.CLASSES) if num_classes == len(shapes.CLASSES) else [str(k) for k in range(num_classes)]
    report = {"model": model, "model_fingerprint": fingerprint, "rows": rows,
              "settings": {"splits": splits, "num_test_images": int(config.eval.num_images),
                           "eval_seed": int(config.eval.seed), "class_names": names,
                           "configs": {t: str(config.tasks[t].config) for t in config.tasks}},
              "claims": check_claims(rows, splits)}
    seconds["total"] = round(time.time() - t0, 1)
    report["seconds"] = seconds
    table = format_tables(report)
    Path(workdir, "report.json").write_text(json.dumps(report, indent=1))
    Path(workdir, "table.md").write_text(table + "\n")
    print(table)
    for c in report["claims"]:
        print(f"- {'HOLDS' if c['holds'] else 'DOES NOT HOLD'}: {c['claim']} (measured {c['measured']})")
    print(f"proof: {seconds['total'] / 60:.1f} min; report {workdir}/report.json, table {workdir}/table.md")
    return report


def main_proof(config_path: str | None = None, out: str | None = None,
               overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI body of ``datasetdm exp proof [--config configs/shapes_proof.py[:small]] [--out DIR] [key=value ...]``."""
    config = load_config(config_path or os.path.join(CONFIGS_DIR, "shapes_proof.py"), overrides)
    if out:
        config.workdir = out
    return run(config)
