"""Train a P-Decoder on a frozen Stable Diffusion (the official recipe): ``datasetdm
train``. The model and its step are ``p_decoder.Trainer``; this module is the loop around it.

Resumable like ``pretrain``: step, decoder params, optimiser state and the grain iterator position
go into an orbax checkpoint (``training_state``); randomness (noise, flips, loss point sampling) is
a pure function of ``(config.seed, step)``, so a stopped-and-rerun training equals an uninterrupted
one. SIGTERM finishes the step, checkpoints and returns; Ctrl-C checkpoints on the way out. Metrics
go to ``metrics.jsonl`` and to TensorBoard event files (tensorboardX) in ``<workdir>/tb``; the
validation split is scored every ``eval_every`` steps, the test split once at the end
(``results.json``). With ``config.select_metric`` (a validation metric, e.g. 'AP') the decoder of
the best validation score so far is kept (in the checkpoint too), tested at the end and loaded by
``load_trained_decoder``: early stopping for decoders that overfit 100 images.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from datasetdm_jax import devices, pretrained, storage
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.data import pipeline, sources
from datasetdm_jax.decoders import tasks
from datasetdm_jax.p_decoder import (BATCH_DTYPES, PRETRAIN_HINT, TASK_KEYS, Trainer, frozen_pipeline_for,
                                     load_frozen_pipeline)
from datasetdm_jax.training_state import (METRICS_FILE, RESUME_HINT, BestCheckpoint, StopFlag, TrainingDiverged,
                                          append_metrics, check_finite, checkpoint_manager, on_interrupt,
                                          truncate_metrics)

# Trainer, load_frozen_pipeline, frozen_pipeline_for, TASK_KEYS, BATCH_DTYPES and PRETRAIN_HINT live
# in p_decoder; they are named here too because `train.Trainer` / `train.load_frozen_pipeline` are the documented calls.
__all__ = ["run", "evaluate", "predict_split", "main_train", "load_trained_decoder", "data_source", "train_source",
           "train_iterator", "Trainer", "load_frozen_pipeline", "frozen_pipeline_for", "TASK_KEYS", "BATCH_DTYPES", "PRETRAIN_HINT",
           "METRICS_FILE", "RESULTS_FILE", "TrainingDiverged"]

STAGE = "decoder"
RESULTS_FILE = "results.json"
COMMAND_FILE = "command.txt"
# Validation metrics where lower is better; every other metric is maximised by ``select_metric``.
LOWER_IS_BETTER = ("rel", "rmse")


# ------------------------------------------------------------------------------------------ data

def data_source(config: ml_collections.ConfigDict, split: str, num: int, seed: int):
    """The random-access source ``config.data.source`` (default 'shapes') names, for one split
    (``data/sources.py``); a real dataset's few-shot selection applies to the training split only."""
    return sources.build(config.data, split, train=split == str(config.data.split), num=int(num), seed=int(seed))


def train_source(config: ml_collections.ConfigDict):
    """The training split's source."""
    return data_source(config, str(config.data.split), int(config.data.num_images), int(config.data.seed))


def train_iterator(config: ml_collections.ConfigDict, data_state: Any | None):
    """The endless, shuffled training batches (with source positions), resumed at ``data_state``."""
    it = iter(pipeline.grain_dataset(train_source(config), int(config.batch_size), int(config.data.seed),
                                     num_epochs=None, with_index=True))
    if data_state is not None:
        it.set_state(data_state)
    return it


def evaluate(trainer: Trainer, params: Any, split: str | None = None, num: int | None = None,
             seed: int | None = None, which: str = "eval", per_class: bool = False) -> dict[str, Any]:
    """The task's metrics (``tasks.Evaluator``) on ``num`` images of ``split`` with fixed noise.

    Defaults come from ``config.<which>``: 'eval' (the test split, scored at the end) or 'val'
    (the validation split scored during training). ``per_class``: semantic per-class IoU too.
    """
    config = trainer.config
    ecfg = config.get(which) or config.eval
    split = split or str(ecfg.split)
    num = int(num or ecfg.num_images)
    seed = int(ecfg.get("seed", config.data.seed) if seed is None else seed)
    ev = tasks.Evaluator(trainer.spec)
    for pred, b in predict_split(trainer, params, split, num, seed, int(ecfg.batch_size)):
        ev.update(pred, b)
    return ev.compute(per_class=per_class)


def predict_split(trainer: Trainer, params: Any, split: str, num: int, seed: int, batch_size: int):
    """Yields (the decoder's labels, the source batch) over ``num`` images of ``split``, in order,
    with fixed noise (as `evaluate` scores them)."""
    src = data_source(trainer.config, split, num, seed)
    ds = pipeline.grain_dataset(src, batch_size, None, drop_remainder=False)
    for i, b in enumerate(ds):
        hb = trainer.host_batch(b, 0, augment=False)
        n = len(hb["image"])
        if n < batch_size:  # a short last batch: pad (one compiled shape, divisible over the devices), then cut
            hb = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)]) for k, v in hb.items()}
        key = jax.random.key(int(trainer.config.seed) + 7 + i)
        pred = jax.device_get(trainer.predict_fn(params, trainer.frozen, hb, key))
        yield {k: v[:n] for k, v in pred.items()}, b


class _Summaries:
    """Metrics to ``metrics.jsonl`` and TensorBoard event files (tensorboardX, no TensorFlow needed).

    On resume the event writer purges events after the checkpoint step, as the JSONL is truncated.
    """

    def __init__(self, workdir: str, start: int):
        from tensorboardX import SummaryWriter
        self.workdir = workdir
        # tensorboardX writes gs:// event files itself (google-cloud-storage)
        self.tb = SummaryWriter(storage.join(workdir, "tb"), purge_step=start if start > 0 else None)

    def write(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        append_metrics(self.workdir, {"stage": STAGE, "step": step, **{prefix + k: v for k, v in values.items()},
                                       "time": time.time()})
        for k, v in values.items():
            self.tb.add_scalar(f"{prefix or 'train/'}{k}", float(v), step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def run(config: ml_collections.ConfigDict, workdir: str | None = None, *, pipe: pretrained.Pipeline | None = None,
        trainer: Trainer | None = None, max_steps: int | None = None) -> tuple[bool, Trainer, Any]:
    """Train (or resume) to ``config.steps``; returns (finished, trainer, decoder params).

    ``max_steps`` (or ``config.max_steps`` > 0) stops this invocation after that many steps, with
    a checkpoint, as a kill would; rerun to go on. ``trainer`` reuses a built Trainer (same config).
    A finished run scores the test split (``config.eval``) into ``results.json``.
    """
    from tqdm.auto import tqdm

    workdir = storage.check(workdir or str(config.workdir))  # local or gs://; another scheme: one line, at once
    storage.makedirs(workdir)
    storage.write_bytes(storage.join(workdir, "config.json"), config.to_json(indent=2))
    trainer = trainer or Trainer(config, pipe)
    total = int(config.steps)
    budget = int(max_steps if max_steps is not None else config.max_steps)
    repl, data_sh = trainer.repl, trainer.data_sharding
    params = trainer.init_params
    # Checkpoints hold host (numpy) copies: the state is replicated, and saving device arrays
    # would compile a slice per array and device.
    state = jax.device_get({"step": np.zeros((), np.int32), "params": params, "opt": trainer.tx.init(params)})
    frozen = trainer.frozen
    mngr = checkpoint_manager(workdir, STAGE, int(config.keep_checkpoints))
    data_state = None
    best = BestCheckpoint(str(config.get("select_metric", "")), LOWER_IS_BETTER)
    latest = mngr.latest_step()
    if latest is not None:
        r = mngr.restore(latest, args=ocp.args.Composite(
            data=ocp.args.JsonRestore(),
            params=ocp.args.StandardRestore(state["params"]),
            train=ocp.args.StandardRestore({"step": state["step"], "opt": state["opt"]}),
            **best.restore_args(storage.join(workdir, STAGE, str(latest)), state["params"])))
        state = {"step": r["train"]["step"], "params": r["params"], "opt": r["train"]["opt"]}
        data_state = r["data"]
        best.restored(r)
        truncate_metrics(workdir, STAGE, latest)
    start = int(state["step"])
    state = jax.device_put(state, repl)
    step_fn = trainer.step_fn

    def save(step: int):
        host = jax.device_get(state)
        mngr.save(step, args=ocp.args.Composite(
            data=ocp.args.JsonSave(data_state), params=ocp.args.StandardSave(host["params"]),
            train=ocp.args.StandardSave({"step": host["step"], "opt": host["opt"]}), **best.save_args()),
            force=True)
        mngr.wait_until_finished()

    if bool(config.get("cache_features", False)) and start < total:  # a finished run needs no bank
        bank = jax.device_put(trainer.feature_bank(train_source(config)), repl)
        bank_step = devices.MeshJit(trainer.bank_step, trainer.mesh, in_shardings=(repl, repl, data_sh),
                                    out_shardings=(repl, repl))
        step_fn = lambda st, b, _frozen: bank_step(st, bank, b)  # noqa: E731
    it = train_iterator(config, data_state)
    log_every, eval_every = max(1, int(config.log_every)), int(config.eval_every)
    summaries = _Summaries(workdir, start)
    bar = tqdm(total=total, initial=start, desc=f"train {config.task}", dynamic_ncols=True)
    t_ckpt, done_here = time.time(), 0
    try:
        with StopFlag() as stop:
            for step in range(start, total):
                batch = jax.device_put(trainer.host_batch(next(it), step), data_sh)
                new_state, m = step_fn(state, batch, frozen)
                m = jax.device_get(m)
                check_finite("train", m["loss"], step + 1, mngr.latest_step(), storage.join(workdir, STAGE))
                state, data_state = new_state, it.get_state()
                done, done_here = step + 1, done_here + 1
                bar.update(1)
                if done % log_every == 0 or done == total:
                    summaries.write(done, {k: float(v) for k, v in m.items()})
                    bar.set_postfix(loss=f"{float(m['loss']):.4f}")
                if eval_every > 0 and (done % eval_every == 0 or done == total):
                    ev = evaluate(trainer, state["params"], which="val")
                    summaries.write(done, ev, prefix="val/")
                    kept = best.update(done, ev, state["params"])
                    bar.write(f"step {done} val: " + ", ".join(f"{k}={v:.4g}" for k, v in ev.items())
                              + (" (best so far, kept)" if kept else ""))
                stop_now = stop.set or (budget > 0 and done_here >= budget)
                if time.time() - t_ckpt >= float(config.checkpoint_every_s) or done == total or stop_now:
                    save(done)
                    t_ckpt = time.time()
                if stop_now and done < total:
                    return False, trainer, state["params"]
        final = best.params_or(state["params"])
        if not storage.exists(storage.join(workdir, RESULTS_FILE)) or start < total:
            res = evaluate(trainer, final)
            summaries.write(total, res, prefix="test/")
            storage.write_bytes(storage.join(workdir, RESULTS_FILE), json.dumps(
                {"task": trainer.task, "step": total, "split": str(config.eval.split),
                 "num_images": int(config.eval.num_images), "decoder_params": trainer.num_params,
                 **best.summary(total), **res}, indent=2))
    except KeyboardInterrupt:
        on_interrupt("train", int(state["step"]), start, mngr.latest_step(), save)
        raise
    finally:
        bar.close()
        summaries.close()
        mngr.close()
    return True, trainer, final


def main_train(config_path: str, workdir: str | None = None, overrides: Sequence[str] | None = None) -> bool:
    """CLI body of ``datasetdm train --config configs/<task>.py[:arg] [--workdir DIR] [key=value ...]``."""
    config = load_config(config_path, overrides)
    wd = storage.check(workdir or str(config.workdir))  # local or gs://; another scheme: one line, at once
    storage.makedirs(wd)
    cmd = " ".join(["datasetdm train --config", config_path] + (["--workdir", workdir] if workdir else [])
                   + list(overrides or ()))
    storage.write_bytes(storage.join(wd, COMMAND_FILE), cmd + "\n")
    done, trainer, params = run(config, workdir)
    if done:
        res = json.loads(storage.read_bytes(storage.join(wd, RESULTS_FILE)))
        print(f"train: finished; test ({res['split']}, {res['num_images']} images): "
              + ", ".join(f"{k}={v:.4g}" for k, v in res.items() if isinstance(v, float)))
    else:
        print(f"train: stopped early; {RESUME_HINT}")
    print(f"train: workdir {wd}")
    return done


def _config_and_workdir(config: ml_collections.ConfigDict | str, workdir: str | None):
    """A ConfigDict, a config file (``path.py[:arg]``) or a train workdir (holds config.json)."""
    if isinstance(config, ml_collections.ConfigDict):
        return config, workdir or str(config.workdir)
    path = str(config)
    if storage.is_remote(path) or os.path.isdir(path):
        cfg_file = storage.join(path, "config.json")
        if not storage.exists(cfg_file):
            raise FileNotFoundError(f"{path} is not a `datasetdm train` workdir (no config.json)")
        return ml_collections.ConfigDict(json.loads(storage.read_bytes(cfg_file))), workdir or path
    cfg = load_config(path)
    return cfg, workdir or str(cfg.workdir)


def load_trained_decoder(config: ml_collections.ConfigDict | str, workdir: str | None = None, *,
                         pipe: pretrained.Pipeline | None = None, config_path: str | None = None
                         ) -> tuple[Trainer, Any, int]:
    """The decoder `datasetdm train` saved: (trainer, params, step): the latest checkpoint's, or
    with ``select_metric`` the best-validation decoder that checkpoint holds (and its step).

    ``config``: a ConfigDict, a config file path (``configs/shapes_semantic.py[:arg]``) or the
    train workdir itself. Use ``trainer.decode_fn(params, features)`` on captured Features, or
    ``trainer.predict_fn(params, trainer.frozen, batch, key)`` on real images. ``pipe``: an already
    loaded frozen pipeline (else ``config.pipeline`` is loaded). A missing checkpoint is a one-line
    FileNotFoundError naming the train command that makes it.
    """
    if isinstance(config, str) and config_path is None and not storage.is_remote(config) and not os.path.isdir(config):
        config_path = config
    config, workdir = _config_and_workdir(config, workdir)
    folder = storage.join(storage.check(workdir), STAGE)  # a local folder or gs://
    folder = folder if storage.is_remote(folder) else os.path.abspath(folder)
    steps = sorted(int(n) for n in storage.listdir(folder) if n.isdigit())
    if not steps:
        cmd_file = storage.join(workdir, COMMAND_FILE)
        if config_path is None and storage.exists(cmd_file):
            cmd = storage.read_text(cmd_file).strip()
        else:
            cmd = f"datasetdm train --config {config_path or 'configs/' + str(config.name) + '.py'}"
            if workdir != str(config.workdir):
                cmd += f" --workdir {workdir}"
        raise FileNotFoundError(f"no trained decoder in {folder}; train one with `{cmd}`")
    trainer = Trainer(config, pipe)
    # Read-only and process-local: every process of a multi-host run (generation) reads the same
    # files, with none of the cross-process barriers orbax puts around a shared checkpoint.
    me = jax.process_index()
    mngr = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(
        create=False, read_only=True, enable_async_checkpointing=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})))
    try:
        step = mngr.latest_step()
        selected = storage.isdir(storage.join(folder, str(step), "best"))
        item = "best" if selected else "params"
        args = {item: ocp.args.StandardRestore(trainer.init_params)}
        if selected:
            args["best_meta"] = ocp.args.JsonRestore()
        r = mngr.restore(step, args=ocp.args.Composite(**args))
    finally:
        mngr.close()
    if selected:
        step = r["best_meta"]["step"]
    return trainer, jax.device_put(r[item], trainer.repl), int(step)   # replicated, as in training
