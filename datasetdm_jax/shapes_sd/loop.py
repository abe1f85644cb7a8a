"""The resumable loop every shapes-world SD stage runs (``train_stage``): a ``Stage`` says what
differs (params, loss, held-out eval); the loop does AdamW with warmup + cosine, the EMA, logging,
checkpoints (``training_state``) and the stop on a deadline, a step budget, SIGTERM or Ctrl-C."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from datasetdm_jax import devices
from datasetdm_jax.shapes_sd import data as sd_data
from datasetdm_jax.training_state import (StopFlag, append_metrics, check_finite, checkpoint_manager,
                                          on_interrupt, truncate_metrics)

__all__ = ["STAGES", "Stage", "train_stage", "restore_item"]


# Appended, never reordered: a stage's random stream is keyed by its index here.
STAGES = ("vae", "diffusion", "vae_decoder")


def _optimizer(cfg: ml_collections.ConfigDict, params) -> tuple[optax.GradientTransformation, Callable]:
    steps = int(cfg.steps)
    warmup = min(int(cfg.warmup_steps), max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(cfg.lr), warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=float(cfg.lr) * float(cfg.final_lr_fraction))
    decay_mask = jax.tree.map(lambda p: p.ndim > 1, params)  # no decay on biases and norm scales
    tx = optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip)),
                     optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                                 weight_decay=float(cfg.weight_decay), mask=decay_mask))
    return tx, schedule


def _ema_decay(decay: float, step: jax.Array) -> jax.Array:
    """Warm-up EMA: a plain average early on, capped at ``decay``."""
    s = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + s) / (10.0 + s))


@dataclasses.dataclass
class Stage:
    """What differs between stages; the loop in ``train_stage`` is shared."""

    name: str
    cfg: ml_collections.ConfigDict
    params: Any
    frozen: Any
    # (params, frozen, batch, rng) -> (loss, aux dict); batch holds device arrays.
    loss_fn: Callable
    # (params, frozen) -> metrics dict, on the fixed held-out batch; params = EMA if kept.
    eval_fn: Callable | None
    # numpy batch from the data pipeline -> dict of numpy arrays to shard over 'data'.
    host_batch: Callable[[dict], dict]
    meta: dict
    # Host-side (params) -> metrics dict every ``cfg.fidelity_every`` steps: judged samples.
    sample_eval: Callable[[Any], dict] | None = None


def _ckpt_items(state: dict) -> dict:
    """Checkpoint items: 'params' and 'ema' apart (export and the next stage read only those),
    'train' = step + optimiser state."""
    items = {"params": state["params"], "train": {"step": state["step"], "opt": state["opt"]}}
    if "ema" in state:
        items["ema"] = state["ema"]
    return items


def _from_items(items: dict) -> dict:
    state = {"step": items["train"]["step"], "params": items["params"], "opt": items["train"]["opt"]}
    if "ema" in items:
        state["ema"] = items["ema"]
    return state


def train_stage(st: Stage, config: ml_collections.ConfigDict, workdir: str,
                 deadline: float | None, budget: list[int] | None) -> bool:
    """Train ``st`` to ``st.cfg.steps``, resuming from ``workdir/<stage>``. Returns True when done,
    False when stopped early (deadline, step budget or SIGTERM), with a checkpoint written either
    way. ``budget`` is a one-element list of steps left for this invocation, shared by stages."""
    from tqdm.auto import tqdm

    cfg = st.cfg
    total = int(cfg.steps)
    mesh = devices.data_mesh(int(cfg.batch_size))
    repl, data_sh = devices.data_shardings(mesh)
    tx, schedule = _optimizer(cfg, st.params)
    ema_decay = float(cfg.ema_decay)
    state = {"step": jnp.zeros((), jnp.int32), "params": st.params, "opt": tx.init(st.params)}
    if ema_decay > 0:
        state["ema"] = jax.tree.map(jnp.array, st.params)
    state = jax.device_put(state, repl)
    frozen = jax.device_put(st.frozen, repl)

    mngr = checkpoint_manager(workdir, st.name, config.keep_checkpoints)
    data_state, meta = None, dict(st.meta)
    latest = mngr.latest_step()
    if latest is not None:
        r = mngr.restore(latest, args=ocp.args.Composite(
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore(),
            **{k: ocp.args.StandardRestore(v) for k, v in _ckpt_items(state).items()}))
        state = _from_items({k: r[k] for k in _ckpt_items(state)})
        data_state, meta = r["data"], {**meta, **r["meta"]}
        st.meta.update(meta)
        truncate_metrics(workdir, st.name, latest)
    start = int(state["step"])
    if start >= total:
        mngr.close()
        return True
    base_key = jax.random.key(int(config.seed) + 1000 * STAGES.index(st.name))

    def train_step(state, batch, frozen):
        rng = jax.random.fold_in(base_key, state["step"])

        def lossf(p):
            return st.loss_fn(p, frozen, batch, rng)

        (loss, aux), grads = jax.value_and_grad(lossf, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"step": state["step"] + 1, "params": params, "opt": opt}
        if "ema" in state:
            d = _ema_decay(ema_decay, state["step"])
            new["ema"] = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return new, metrics

    step_fn = jax.jit(train_step, in_shardings=(repl, data_sh, repl), out_shardings=(repl, repl))
    eval_fn = jax.jit(st.eval_fn) if st.eval_fn is not None else None

    def save(step: int):
        mngr.save(step, args=ocp.args.Composite(
            data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(st.meta),
            **{k: ocp.args.StandardSave(v) for k, v in _ckpt_items(state).items()}), force=True)
        mngr.wait_until_finished()

    it = sd_data.train_iterator(config, int(cfg.batch_size), data_state)
    pre = sd_data.Prefetcher(it, int(config.data.prefetch))
    pending: list[tuple[int, dict]] = []
    t_log, n_log = time.time(), 0
    t_ckpt = time.time()
    bs = int(cfg.batch_size)
    log_every = max(1, int(cfg.log_every))
    eval_every = int(cfg.eval_every)
    bar = tqdm(total=total, initial=start, desc=st.name, dynamic_ncols=True, smoothing=0.05)

    sample_every = max(1, int(cfg.get("fidelity_every", 0)))

    def log_eval(step: int, ev: dict):
        nonlocal t_log
        rec = {"stage": st.name, "step": step, **{f"eval/{k}": float(v) for k, v in ev.items()}}
        append_metrics(workdir, rec)
        bar.write(f"{st.name} step {step}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in rec.items() if k.startswith("eval/")))
        t_log = time.time()  # evaluation time is not training throughput

    def flush(step: int):
        """Fetch pending metrics, stop on a non-finite loss, write the averaged record."""
        nonlocal t_log, n_log, pending
        if not pending:
            return
        host = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, host):
            check_finite(st.name, m["loss"], s, mngr.latest_step(), os.path.join(workdir, st.name))
        dt = time.time() - t_log
        rec = {"stage": st.name, "step": step,
               **{k: float(np.mean([m[k] for m in host])) for k in host[0]},
               "lr": float(schedule(step - 1)), "img_per_s": n_log * bs / max(dt, 1e-9),
               "time": time.time()}
        append_metrics(workdir, rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.1f}")
        pending, t_log, n_log = [], time.time(), 0

    finished = False
    try:
        with StopFlag() as stop:
            for step in range(start, total):
                batch, next_data_state = pre.next()
                batch = jax.device_put(st.host_batch(batch), data_sh)
                (state, metrics), data_state = step_fn(state, batch, frozen), next_data_state
                done = step + 1
                pending.append((done, metrics))
                n_log += 1
                bar.update(1)
                if done % log_every == 0 or done == total:
                    flush(done)
                if eval_fn is not None and eval_every > 0 and (done % eval_every == 0 or done == total):
                    flush(done)
                    log_eval(done, jax.device_get(eval_fn(state.get("ema", state["params"]), frozen)))
                if st.sample_eval is not None and (done % sample_every == 0 or done == total):
                    flush(done)
                    log_eval(done, st.sample_eval(jax.device_get(state.get("ema", state["params"]))))
                out_of_time = deadline is not None and time.time() >= deadline
                if budget is not None:
                    budget[0] -= 1
                    out_of_time = out_of_time or budget[0] <= 0
                if (time.time() - t_ckpt >= float(cfg.checkpoint_every_s) or done == total
                        or out_of_time or stop.set):
                    flush(done)
                    save(done)
                    t_ckpt = time.time()
                if out_of_time or stop.set:
                    return False
            finished = True
    except KeyboardInterrupt:
        flush(int(state["step"]))
        on_interrupt(st.name, int(state["step"]), start, mngr.latest_step(), save)
        raise
    finally:
        pre.close()
        bar.close()
        mngr.close()
    return finished


def restore_item(workdir: str, stage: str, item: str, target: Any, keep: int = 2) -> tuple[Any, dict]:
    """One item ('params' / 'ema' tree inside the state) of a stage's latest checkpoint, and its meta."""
    mngr = checkpoint_manager(workdir, stage, keep)
    step = mngr.latest_step()
    if step is None:
        mngr.close()
        raise FileNotFoundError(f"no {stage} checkpoint in {os.path.join(workdir, stage)}; train it first")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    has_ema = os.path.isdir(os.path.join(workdir, stage, str(step), "ema"))
    want = "ema" if (item == "ema" and has_ema) else "params"
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    r = mngr.restore(step, args=ocp.args.Composite(**{want: ocp.args.StandardRestore(abstract)}))
    mngr.close()
    return r[want], {**meta, "step": int(step)}
