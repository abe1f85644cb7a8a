"""The plumbing every resumable training loop shares: `datasetdm train`'s P-Decoder loop and
`datasetdm pretrain`'s shapes-world SD stages (``shapes_sd/loop.py``).

- ``checkpoint_manager``: one orbax CheckpointManager per stage folder ``<workdir>/<stage>/``,
  synchronous (a checkpoint is on disk when ``save`` returns);
- ``append_metrics`` / ``truncate_metrics``: the ``metrics.jsonl`` log, one JSON record a line,
  cut back to the checkpoint's step on resume (the steps after it are redone);
- ``StopFlag``: SIGTERM sets a flag; the loop finishes its step, checkpoints and returns;
- ``on_interrupt``: Ctrl-C (KeyboardInterrupt) checkpoints the last finished step on the way out
  and says how to resume;
- ``check_finite``: a non-finite loss stops the run with ``TrainingDiverged``, nothing newer saved;
- ``BestCheckpoint``: the parameters of the best validation score so far, saved in every
  checkpoint so that a resumed run selects what an uninterrupted one would.

A workdir is a local folder or ``gs://BUCKET/PREFIX`` (``datasetdm_jax.storage``; orbax writes
checkpoint arrays through tensorstore's GCS client, the rest through etils.epath).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from datasetdm_jax import storage

__all__ = ["METRICS_FILE", "RESUME_HINT", "TrainingDiverged", "checkpoint_manager", "append_metrics",
           "truncate_metrics", "StopFlag", "on_interrupt", "check_finite", "BestCheckpoint"]

METRICS_FILE = "metrics.jsonl"
RESUME_HINT = "rerun the same command to resume"


class TrainingDiverged(FloatingPointError):
    """A non-finite loss; the last good checkpoint is kept and nothing newer is written."""


def checkpoint_manager(workdir: str, stage: str, keep: int) -> ocp.CheckpointManager:
    """The stage's checkpoints in ``<workdir>/<stage>/``, the newest ``keep`` kept."""
    folder = storage.join(workdir, stage)
    return ocp.CheckpointManager(
        folder if storage.is_remote(folder) else os.path.abspath(folder),
        options=ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True,
                                             enable_async_checkpointing=False))


def append_metrics(workdir: str, record: dict) -> None:
    """One line more; in a bucket (no appends there) the small file is uploaded whole again."""
    path, line = storage.join(workdir, METRICS_FILE), json.dumps(record) + "\n"
    if not storage.is_remote(path):
        with open(path, "a") as f:
            f.write(line)
        return
    try:
        old = storage.read_text(path)
    except FileNotFoundError:
        old = ""
    storage.write_bytes(path, old + line)


def truncate_metrics(workdir: str, stage: str, step: int) -> None:
    """On resume, drop records of this stage newer than the checkpoint (those steps are redone)."""
    path = storage.join(workdir, METRICS_FILE)
    try:
        lines = storage.read_text(path).splitlines(keepends=True)
    except FileNotFoundError:
        return
    keep = []
    for line in lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not (r.get("stage") == stage and r.get("step", 0) > step):
            keep.append(line if line.endswith("\n") else line + "\n")
    storage.write_bytes(path, "".join(keep))


class StopFlag:
    """SIGTERM -> finish the current step, checkpoint, return (so background runs stop cleanly)."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, *_):
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def on_interrupt(name: str, step: int, start: int, latest: int | None, save: Callable[[int], None]) -> None:
    """Ctrl-C: checkpoint ``step`` (the last finished one) unless nothing ran since ``start`` or it
    is already saved (``latest``), and say how to go on. The caller re-raises."""
    if step > start and latest != step:
        save(step)
    print(f"{name}: interrupted at step {step} (checkpointed); {RESUME_HINT}", file=sys.stderr)


def check_finite(name: str, loss: Any, step: int, latest: int | None, folder: str) -> None:
    """Raise ``TrainingDiverged`` on a non-finite loss at ``step``, naming the last good checkpoint."""
    if not np.isfinite(loss):
        raise TrainingDiverged(f"{name}: loss is {loss} at step {step}; stopped without saving (last good "
                               f"checkpoint: step {latest} in {folder})")


class BestCheckpoint:
    """The parameters of the best validation ``metric`` so far (host copy), saved with every
    checkpoint so that a resumed run selects exactly what an uninterrupted one would. ``metric=''``:
    off. ``lower_is_better``: the metrics minimised (every other one is maximised)."""

    def __init__(self, metric: str, lower_is_better: tuple[str, ...] = (), name: str = "train"):
        self.metric, self.name = metric, name
        self.sign = -1.0 if metric in lower_is_better else 1.0
        self.step, self.value, self.params = 0, -np.inf, None

    def update(self, step: int, ev: dict[str, Any], params: Any) -> bool:
        if not self.metric:
            return False
        if self.metric not in ev:
            raise KeyError(f"{self.name}: select_metric={self.metric!r} is not a validation metric of this task "
                           f"(it has {sorted(ev)})")
        score = self.sign * float(ev[self.metric])
        if not score > self.value:  # ties and NaN keep the earlier parameters
            return False
        self.step, self.value, self.params = step, score, jax.device_get(params)
        return True

    def params_or(self, params: Any) -> Any:
        """The selected parameters (placed like ``params``), or ``params`` when nothing was selected."""
        if self.params is None:
            return params
        return jax.tree.map(lambda p, x: jax.device_put(x, p.sharding), params, self.params)

    def summary(self, total: int) -> dict[str, Any]:
        if not self.metric:
            return {}
        return {"selected_step": int(self.step or total), "select_metric": self.metric,
                "selected_val": float(self.sign * self.value) if self.params is not None else None}

    def save_args(self) -> dict[str, Any]:
        if self.params is None:
            return {}
        return {"best": ocp.args.StandardSave(self.params),
                "best_meta": ocp.args.JsonSave({"step": self.step, "value": self.value, "metric": self.metric})}

    def restore_args(self, checkpoint_dir: str, target: Any) -> dict[str, Any]:
        """Restore items for a checkpoint written before any validation too (it has no 'best')."""
        if not self.metric or not storage.isdir(storage.join(checkpoint_dir, "best")):
            return {}
        return {"best": ocp.args.StandardRestore(target), "best_meta": ocp.args.JsonRestore()}

    def restored(self, r: Any) -> None:
        meta = r.get("best_meta") if self.metric else None
        if meta:
            self.step, self.value, self.params = int(meta["step"]), float(meta["value"]), r["best"]
