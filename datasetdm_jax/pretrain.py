"""Train a small Stable Diffusion from scratch on the shapes world, resumably
(the shipped model's legs: docs/experiments/shapes_sd.md).

``run(config, workdir)`` runs the stages named in ``config.stages`` in order, each in its own
orbax checkpoint folder ``workdir/<stage>/``:

1. ``vae``: an AutoencoderKL on shapes images (L1 + L2 reconstruction, tiny KL); tracks
   reconstruction PSNR on a fixed held-out batch.
1b. ``vae_decoder``: the VAE's decoder fine-tuned with its encoder frozen. The latents do not
   change, so a UNet trained on them stays valid: this is how a shipped model's images get sharper
   without retraining its UNet (a round trip through the first VAE cost the judge 14 points of
   class accuracy).
2. ``diffusion``: VAE frozen; UNet2DConditionModel and CLIPTextModel trained jointly from scratch on
   (latent, caption) with eps-prediction, Min-SNR-gamma weighting, AdamW with warmup + cosine, grad
   clipping, an EMA of the weights and caption dropout for classifier-free guidance. Tracks the EMA
   model's eps-MSE on a fixed held-out batch at fixed timesteps and noise, with the true caption
   and with the empty one: an honest, cheap proxy. With ``diffusion.fidelity_every`` and a judge
   file it also samples prompts from the EMA weights and logs the judged class and colour
   fidelity (``judge.fidelity``), the yardstick itself, as a curve.

Then the EMA weights are exported as a diffusers-format folder (``export``).

Warm start (``config.init_from``, a diffusers folder such as the shipped model): its VAE is used
frozen (the ``vae`` stage is skipped; ``vae_decoder`` starts from its decoder), its tokenizer is
copied, and its UNet and text encoder weights start the ``diffusion`` stage with a fresh optimiser
and schedule. Checkpoints live in ``workdir`` (lost with an ephemeral machine); the shipped
folder is not, so this is how training continues on a new machine.

Every stage can be stopped at any time and rerun with the same command: the step, params, EMA,
optimiser state and the grain iterator position are checkpointed every ``checkpoint_every_s``
seconds, at the end and on SIGTERM / Ctrl-C, and randomness is a pure function of
``(config.seed, step)``, so an interrupted-and-resumed run equals an uninterrupted one.
Train steps are pure jitted functions of ``(params, opt state, batch)`` over a data-parallel
``('data',)`` mesh of the local devices (batch sharded, params replicated).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import queue
import shutil
import signal
import threading
import time
from typing import Any, Callable, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from datasetdm_jax import curves, devices, pretrained, schedulers
from datasetdm_jax import tokenizer as tk
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.data import pipeline, shapes
from datasetdm_jax.models import deepen
from datasetdm_jax.models.clip_text import CLIPTextModel
from datasetdm_jax.models.unet import UNet2DConditionModel
from datasetdm_jax.models.vae import AutoencoderKL

__all__ = ["run", "export", "main_pretrain", "STAGES", "TrainingDiverged"]

# Appended, never reordered: a stage's random stream is keyed by its index here.
STAGES = ("vae", "diffusion", "vae_decoder")
# The VAE parameters behind z -> image; the rest (encoder, quant_conv) define the latent space.
DECODER_KEYS = ("decoder", "post_quant_conv")
METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(FloatingPointError):
    """A non-finite loss; the last good checkpoint is kept and nothing newer is written."""


# ----------------------------------------------------------------------------------------------
# Data


def _shapes_config(config: ml_collections.ConfigDict):
    d = config.data
    kw = dict(image_size=int(d.image_size), min_objects=int(d.min_objects), max_objects=int(d.max_objects))
    if d.classes:
        kw["classes"] = tuple(d.classes)
    return shapes.ShapesConfig(**kw)


class _Prefetcher:
    """Renders batches ahead in a thread; each batch carries the grain iterator state *after* it,
    so a checkpoint records exactly the consumed position, not the prefetched one."""

    def __init__(self, iterator, depth: int):
        self._it, self._q = iterator, queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self):
        try:
            while not self._stop.is_set():
                batch = next(self._it)
                item = ({"image": batch["image"], "caption": [str(c) for c in batch["caption"]]},
                        self._it.get_state())
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced to the consumer
            self._q.put(e)

    def next(self) -> tuple[dict, Any]:
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()


def _train_iterator(config: ml_collections.ConfigDict, batch_size: int, data_state: Any | None):
    ds = pipeline.procedural_dataset(config.data.split, batch_size, int(config.data.seed),
                                     config=_shapes_config(config), shuffle_seed=None)
    it = iter(ds)
    if data_state is not None:
        it.set_state(data_state)
    return it


def _heldout_batch(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fixed held-out batch (first ``heldout_size`` scenes of the held-out split)."""
    n = int(config.data.heldout_size)
    ds = pipeline.procedural_dataset(config.data.heldout_split, n, int(config.data.seed),
                                     config=_shapes_config(config), shuffle_seed=None)
    b = next(iter(ds))
    return {"image": b["image"], "caption": [str(c) for c in b["caption"]]}


class _Tokens:
    """Closed-vocabulary tokenizer with a caption cache (captions repeat a lot)."""

    def __init__(self, folder: str, max_length: int):
        self.folder = folder
        self.max_length = int(max_length)
        self.tokenizer = tk.load_tokenizer(folder)
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            ids = tk.tokenize(self.tokenizer, missing, max_length=self.max_length)
            self._cache.update(zip(missing, ids))
        return np.stack([self._cache[c] for c in captions]).astype(np.int32)


def _ensure_tokenizer(workdir: str, config: ml_collections.ConfigDict) -> str:
    folder = os.path.join(workdir, "tokenizer")
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        if config.init_from:  # keep the warm-start model's token ids
            shutil.copytree(os.path.join(config.init_from, "tokenizer"), folder, dirs_exist_ok=True)
        else:
            tk.write_clip_tokenizer(folder, shapes.caption_vocabulary(), int(config.tokenizer.max_length))
    return folder


def _text_encoder_dict(config: ml_collections.ConfigDict, tok) -> dict[str, Any]:
    """The text encoder config.json with vocabulary size and special ids from the tokenizer."""
    d = _plain(config.text_encoder.to_dict())
    d.update(vocab_size=len(tok.get_vocab()), bos_token_id=int(tok.bos_token_id),
             eos_token_id=int(tok.eos_token_id), pad_token_id=int(tok.pad_token_id))
    if d["max_position_embeddings"] < int(config.tokenizer.max_length):
        raise ValueError("text_encoder.max_position_embeddings is smaller than tokenizer.max_length")
    return d


def _plain(x: Any) -> Any:
    """ConfigDict contents -> JSON-ready Python (tuples become lists)."""
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ----------------------------------------------------------------------------------------------
# Models


def _build(kind: str, cfg: Mapping[str, Any], seed: int, dtype=jnp.float32) -> nnx.Module:
    rngs = nnx.Rngs(seed)
    if kind == "vae":
        return AutoencoderKL(dict(cfg), dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    if kind == "unet":
        return UNet2DConditionModel(dict(cfg), dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    if kind == "text_encoder":
        return CLIPTextModel(dict(cfg), dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    raise ValueError(kind)


def _split(model: nnx.Module):
    """(graphdef, trainable params as a pure dict, the rest)."""
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    return graph, nnx.to_pure_dict(params), rest


@functools.lru_cache(maxsize=1)
def _init_pipeline(folder: str) -> pretrained.Pipeline:
    return pretrained.load_pipeline(folder, jnp.float32)


def config_conflicts(cfg: Mapping[str, Any], theirs: Mapping[str, Any], ignore: Collection[str] = ()) -> list[str]:
    """Keys that ``cfg`` sets and a folder's config.json ``theirs`` holds with another value (private
    ``_`` keys and the VAE's export-time ``scaling_factor`` aside): what stops a warm start."""
    return sorted(k for k, v in cfg.items()
                  if not k.startswith("_") and k != "scaling_factor" and k not in ignore
                  and k in theirs and _plain(theirs[k]) != _plain(v))


def _init_weights(config: ml_collections.ConfigDict, name: str, cfg: Mapping[str, Any],
                  params: dict) -> dict:
    """``name``'s fp32 weights from the ``config.init_from`` folder, in the tree of ``params``.

    The folder's config.json must agree with ``cfg`` on every key ``cfg`` sets, so the exported
    folder describes the weights it holds. One exception: a UNet may be configured deeper (larger
    ``layers_per_block``) than the folder's; it is then grown without changing its function
    (``models.deepen``), so a plateaued model continues with more capacity."""
    pipe = _init_pipeline(os.path.abspath(config.init_from))
    theirs = pipe.configs[name]
    growable = {"layers_per_block"} if name == "unet" and cfg.get("layers_per_block", 0) > theirs.get("layers_per_block", 0) else set()
    diff = config_conflicts(cfg, theirs, growable)
    if diff:
        raise ValueError(f"init_from: {config.init_from}/{name}/config.json differs from the config on "
                         + ", ".join(f"{k} ({theirs[k]!r} there, {cfg[k]!r} here)" for k in diff))
    loaded = nnx.to_pure_dict(nnx.state(pipe.module(name), nnx.Param))
    if growable:
        loaded = deepen.deepen_unet_params(jax.tree.map(np.asarray, loaded), jax.tree.map(np.asarray, params),
                                           int(theirs["layers_per_block"]), int(cfg["layers_per_block"]))
    if jax.tree.structure(loaded) != jax.tree.structure(params):
        raise ValueError(f"init_from: {config.init_from}/{name} does not have the configured parameter tree")
    return jax.tree.map(lambda x: np.asarray(x, np.float32), loaded)


def _vae_encode(vae, x):
    """Posterior (mean, logvar) of the VAE, whatever the exact return type of ``encode``."""
    out = vae.encode(x)
    if hasattr(out, "mean") and hasattr(out, "logvar"):
        return out.mean, out.logvar
    if hasattr(out, "latent_dist"):
        return out.latent_dist.mean, out.latent_dist.logvar
    mean, logvar = out
    return mean, logvar


def _vae_decode(vae, z):
    out = vae.decode(z)
    return out.sample if hasattr(out, "sample") else out


# ----------------------------------------------------------------------------------------------
# Generic resumable training loop


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
class _Stage:
    """What differs between stages; the loop in ``_train_stage`` is shared."""

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


def _append_metrics(workdir: str, record: dict) -> None:
    with open(os.path.join(workdir, METRICS_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(workdir: str, stage: str, step: int) -> None:
    """On resume, drop records of this stage newer than the checkpoint (those steps are redone)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not (r.get("stage") == stage and r.get("step", 0) > step):
                keep.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


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


def _manager(workdir: str, stage: str, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, stage)),
        options=ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True,
                                             enable_async_checkpointing=False))


class _StopFlag:
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


def _train_stage(st: _Stage, config: ml_collections.ConfigDict, workdir: str,
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

    mngr = _manager(workdir, st.name, config.keep_checkpoints)
    data_state, meta = None, dict(st.meta)
    latest = mngr.latest_step()
    if latest is not None:
        r = mngr.restore(latest, args=ocp.args.Composite(
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore(),
            **{k: ocp.args.StandardRestore(v) for k, v in _ckpt_items(state).items()}))
        state = _from_items({k: r[k] for k in _ckpt_items(state)})
        data_state, meta = r["data"], {**meta, **r["meta"]}
        st.meta.update(meta)
        _truncate_metrics(workdir, st.name, latest)
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

    it = _train_iterator(config, int(cfg.batch_size), data_state)
    pre = _Prefetcher(it, int(config.data.prefetch))
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
        _append_metrics(workdir, rec)
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
            if not np.isfinite(m["loss"]):
                raise TrainingDiverged(
                    f"{st.name}: loss is {m['loss']} at step {s}; stopped without saving (last good "
                    f"checkpoint: step {mngr.latest_step()} in {os.path.join(workdir, st.name)})")
        dt = time.time() - t_log
        rec = {"stage": st.name, "step": step,
               **{k: float(np.mean([m[k] for m in host])) for k in host[0]},
               "lr": float(schedule(step - 1)), "img_per_s": n_log * bs / max(dt, 1e-9),
               "time": time.time()}
        _append_metrics(workdir, rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.1f}")
        pending, t_log, n_log = [], time.time(), 0

    finished = False
    try:
        with _StopFlag() as stop:
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
        if int(state["step"]) > start and mngr.latest_step() != int(state["step"]):
            save(int(state["step"]))
        raise
    finally:
        pre.close()
        bar.close()
        mngr.close()
    return finished


# ----------------------------------------------------------------------------------------------
# Stage 1: VAE


def _kl(mean, logvar):
    """KL(q || N(0, I)) summed over latent elements, per image."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def _psnr(vae, x, mean):
    """Mean PSNR (on the [0, 1] scale) of decode(``mean``, the posterior mean of images ``x`` in [-1, 1])."""
    xr = jnp.clip(_vae_decode(vae, mean).astype(jnp.float32), -1, 1)
    mse = jnp.mean(jnp.square((xr - x) / 2.0), axis=(1, 2, 3))
    return jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))


def _vae_stage(config: ml_collections.ConfigDict, workdir: str) -> _Stage:
    vcfg = config.vae
    model_cfg = _plain(vcfg.model.to_dict())
    graph, params, rest = _split(_build("vae", model_cfg, int(config.seed)))
    l1w, l2w, klw = float(vcfg.l1_weight), float(vcfg.mse_weight), float(vcfg.kl_weight)

    def loss_fn(p, frozen, batch, rng):
        vae = nnx.merge(graph, p, rest)
        x = batch["image"]
        mean, logvar = _vae_encode(vae, x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        xr = _vae_decode(vae, z).astype(jnp.float32)
        l1 = jnp.mean(jnp.abs(xr - x))
        l2 = jnp.mean(jnp.square(xr - x))
        kl = jnp.mean(_kl(mean.astype(jnp.float32), logvar.astype(jnp.float32)))
        loss = l1w * l1 + l2w * l2 + klw * kl
        return loss, {"l1": l1, "mse": l2, "kl": kl}

    held = _heldout_batch(config)
    held_x = jnp.asarray(held["image"])

    def eval_fn(p, frozen):
        vae = nnx.merge(graph, p, rest)
        mean = _vae_encode(vae, held_x)[0]
        return {"psnr": _psnr(vae, held_x, mean), "latent_std": jnp.std(mean)}

    return _Stage("vae", vcfg, params, {}, loss_fn, eval_fn,
                  lambda b: {"image": np.asarray(b["image"], np.float32)}, {"model": model_cfg})


def _restore_item(workdir: str, stage: str, item: str, target: Any, keep: int = 2) -> tuple[Any, dict]:
    """One item ('params' / 'ema' tree inside the state) of a stage's latest checkpoint, and its meta."""
    mngr = _manager(workdir, stage, keep)
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


def _frozen_vae(config: ml_collections.ConfigDict, workdir: str):
    """The trained VAE: the vae stage's finished checkpoint, or ``config.init_from``'s. The last item
    is its config.json plus ``_source`` (the VAE's identity, checked when the diffusion stage resumes)."""
    model_cfg = _plain(config.vae.model.to_dict())
    graph, params, rest = _split(_build("vae", model_cfg, int(config.seed)))
    if config.init_from:
        params = _init_weights(config, "vae", model_cfg, params)
        return graph, params, rest, {**model_cfg, "_source": f"init_from {os.path.abspath(config.init_from)}"}
    params, meta = _restore_item(workdir, "vae", "params", params, config.keep_checkpoints)
    if meta["step"] < int(config.vae.steps):
        raise ValueError(f"the VAE checkpoint is at step {meta['step']} of {config.vae.steps}; "
                         "finish the vae stage first")
    return graph, params, rest, {**model_cfg, "_source": meta["step"]}


def _vae_decoder_stage(config: ml_collections.ConfigDict, workdir: str) -> _Stage:
    """Decoder + post_quant_conv trained on posterior samples of the frozen encoder."""
    dcfg = config.vae_decoder
    graph, base, rest, info = _frozen_vae(config, workdir)
    params = {k: base[k] for k in DECODER_KEYS}
    frozen = {k: v for k, v in base.items() if k not in DECODER_KEYS}
    l1w, l2w = float(dcfg.l1_weight), float(dcfg.mse_weight)

    def loss_fn(p, frozen, batch, rng):
        vae = nnx.merge(graph, {**frozen, **p}, rest)
        x = batch["image"]
        mean, logvar = jax.lax.stop_gradient(_vae_encode(vae, x))
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        xr = _vae_decode(vae, z).astype(jnp.float32)
        l1, l2 = jnp.mean(jnp.abs(xr - x)), jnp.mean(jnp.square(xr - x))
        return l1w * l1 + l2w * l2, {"l1": l1, "mse": l2}

    held_x = jnp.asarray(_heldout_batch(config)["image"])

    def eval_fn(p, frozen):
        vae = nnx.merge(graph, {**frozen, **p}, rest)
        return {"psnr": _psnr(vae, held_x, _vae_encode(vae, held_x)[0])}

    return _Stage("vae_decoder", dcfg, params, frozen, loss_fn, eval_fn,
                  lambda b: {"image": np.asarray(b["image"], np.float32)},
                  {"vae_step": info["_source"]})


def _export_vae(config: ml_collections.ConfigDict, workdir: str):
    """The VAE to ship: the frozen one, with the ``vae_decoder`` stage's decoder when that stage is
    configured (it must have finished, and on this VAE's encoder)."""
    graph, params, rest, info = _frozen_vae(config, workdir)
    if "vae_decoder" not in config.stages:
        return graph, params, rest, info
    dec, meta = _restore_item(workdir, "vae_decoder", "params", {k: params[k] for k in DECODER_KEYS},
                              config.keep_checkpoints)
    if meta["step"] < int(config.vae_decoder.steps) or meta.get("vae_step") != info["_source"]:
        raise ValueError(f"the vae_decoder checkpoint (step {meta['step']}, VAE {meta.get('vae_step')!r}) "
                         f"is not a finished fine-tune of the VAE {info['_source']!r}")
    return graph, {**params, **dec}, rest, info


# ----------------------------------------------------------------------------------------------
# Stage 2: latent diffusion


def _schedule(config: ml_collections.ConfigDict):
    return schedulers.ScheduleConfig.from_dict(_plain(config.scheduler.to_dict()))


def _diffusion_stage(config: ml_collections.ConfigDict, workdir: str) -> _Stage:
    dcfg = config.diffusion
    seed = int(config.seed)
    tokens = _Tokens(_ensure_tokenizer(workdir, config), config.tokenizer.max_length)
    text_cfg = _text_encoder_dict(config, tokens.tokenizer)
    unet_cfg = _plain(config.unet.to_dict())
    if unet_cfg["cross_attention_dim"] != text_cfg["hidden_size"]:
        raise ValueError("unet.cross_attention_dim must equal text_encoder.hidden_size")
    ug, up, ur = _split(_build("unet", unet_cfg, seed + 1))
    tg, tp, tr = _split(_build("text_encoder", text_cfg, seed + 2))
    vg, vp, vr, vae_info = _frozen_vae(config, workdir)
    sched = _schedule(config)
    if sched.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError("diffusion training supports epsilon or v_prediction")
    ac = jnp.asarray(schedulers.alphas_cumprod(sched))
    n_t = sched.num_train_timesteps
    gamma = float(dcfg.min_snr_gamma)
    p_drop = float(dcfg.caption_dropout)
    sample_post = bool(dcfg.sample_posterior)
    uncond = jnp.asarray(tokens([""])[0])

    def encode_latents(vae_p, images, rng, sample: bool):
        vae = nnx.merge(vg, vae_p, vr)
        mean, logvar = _vae_encode(vae, images)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype) if sample else mean
        return jax.lax.stop_gradient(z.astype(jnp.float32))

    # Latent scale: 1 / std of the encoder's latents on a few training batches (SD's 0.18215 was
    # chosen the same way). Computed once; kept in the checkpoint meta so resumes reuse it.
    meta = {"unet": unet_cfg, "text_encoder": text_cfg}
    mngr = _manager(workdir, "diffusion", config.keep_checkpoints)
    latest = mngr.latest_step()
    if latest is not None:
        meta.update(mngr.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    mngr.close()
    vae_source = vae_info["_source"]
    if meta.setdefault("vae_step", vae_source) != vae_source:
        raise ValueError(f"the diffusion checkpoint was trained on the VAE {meta['vae_step']!r}, "
                         f"but the VAE is now {vae_source!r}; use a fresh workdir")
    if config.init_from and latest is None:  # warm start; a resumed run has its own weights
        up = _init_weights(config, "unet", unet_cfg, up)
        tp = _init_weights(config, "text_encoder", text_cfg, tp)
        meta["scaling_factor"] = float(_init_pipeline(os.path.abspath(config.init_from)).configs["vae"]["scaling_factor"])
        meta["init_step"] = _init_step(config.init_from) or 0  # the folder's steps count in the total
    if "scaling_factor" not in meta:
        it = _train_iterator(config, int(dcfg.batch_size), None)
        zs = [np.asarray(jax.jit(encode_latents, static_argnums=3)(
            vp, jnp.asarray(next(it)["image"]), jax.random.key(seed), False)) for _ in range(4)]
        meta["scaling_factor"] = float(1.0 / max(np.std(np.concatenate(zs)), 1e-6))
    scale = float(meta["scaling_factor"])

    def loss_fn(p, vae_p, batch, rng):
        k_lat, k_t, k_n, k_d = jax.random.split(rng, 4)
        z0 = encode_latents(vae_p, batch["image"], k_lat, sample_post) * scale
        b = z0.shape[0]
        t = jax.random.randint(k_t, (b,), 0, n_t)
        noise = jax.random.normal(k_n, z0.shape, jnp.float32)
        zt = schedulers.add_noise(sched, z0, noise, t)
        drop = jax.random.uniform(k_d, (b,)) < p_drop
        ids = jnp.where(drop[:, None], uncond[None], batch["input_ids"])
        ctx = nnx.merge(tg, p["text_encoder"], tr).encode(ids)
        pred = nnx.merge(ug, p["unet"], ur)(zt, t, ctx).astype(jnp.float32)
        if sched.prediction_type == "epsilon":
            target = noise
        else:
            target = schedulers.get_velocity(sched, z0, noise, t)
        mse = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))
        snr = ac[t] / (1.0 - ac[t])
        if gamma > 0:  # Min-SNR-gamma (Hang et al. 2023), in the form for the chosen target
            w = jnp.minimum(snr, gamma) / (snr if sched.prediction_type == "epsilon" else snr + 1.0)
        else:
            w = jnp.ones_like(snr)
        return jnp.mean(w * mse), {"mse": jnp.mean(mse)}

    held = _heldout_batch(config)
    held_x = jnp.asarray(held["image"])
    held_ids = jnp.asarray(tokens(held["caption"]))
    eval_ts = tuple(int(t) for t in dcfg.eval_timesteps)
    held_noise = jax.random.normal(jax.random.key(seed + 7), (len(eval_ts),) + tuple(
        jax.eval_shape(lambda: encode_latents(vp, held_x, jax.random.key(0), False)).shape))

    def eval_fn(p, vae_p):
        z0 = encode_latents(vae_p, held_x, jax.random.key(0), False) * scale
        unet = nnx.merge(ug, p["unet"], ur)
        text = nnx.merge(tg, p["text_encoder"], tr)
        ctx = text.encode(held_ids)
        ctx0 = jnp.broadcast_to(text.encode(uncond[None]), ctx.shape)
        out = {}
        cond_all, unc_all = [], []
        for i, t in enumerate(eval_ts):
            noise = held_noise[i]
            zt = schedulers.add_noise(sched, z0, noise, t)
            target = noise if sched.prediction_type == "epsilon" else schedulers.get_velocity(sched, z0, noise, t)
            c = jnp.mean(jnp.square(unet(zt, t, ctx).astype(jnp.float32) - target))
            u = jnp.mean(jnp.square(unet(zt, t, ctx0).astype(jnp.float32) - target))
            out[f"mse_t{t}"], out[f"mse_uncond_t{t}"] = c, u
            cond_all.append(c)
            unc_all.append(u)
        out["mse"] = jnp.mean(jnp.stack(cond_all))
        out["mse_uncond"] = jnp.mean(jnp.stack(unc_all))
        out["caption_gain"] = out["mse_uncond"] - out["mse"]  # > 0: the caption helps denoising
        return out

    def host_batch(b):
        return {"image": np.asarray(b["image"], np.float32), "input_ids": tokens(b["caption"])}

    sample_eval = None
    if int(dcfg.fidelity_every) > 0:
        parts = {"vae": (vg, vp, vr, _vae_config(vae_info, scale)), "unet": (ug, up, ur, unet_cfg),
                 "text_encoder": (tg, tp, tr, text_cfg)}
        sample_eval = _fidelity_eval(config, tokens, parts)
    return _Stage("diffusion", dcfg, {"unet": up, "text_encoder": tp}, vp, loss_fn, eval_fn,
                  host_batch, meta, sample_eval)


def _fidelity_eval(config: ml_collections.ConfigDict, tokens: "_Tokens", parts: dict) -> Callable[[Any], dict]:
    """(EMA params) -> judged fidelity of samples from them: the real yardstick (does the
    model draw the prompted class and colour, `judge.fidelity`) as a training curve, next to the
    eps-MSE proxy. One pipeline whose jitted sampler is reused; each call swaps in the weights."""
    from datasetdm_jax import judge as judge_lib

    dcfg = config.diffusion
    judge = judge_lib.load_judge(str(dcfg.fidelity_judge))
    pipe = _assemble_pipeline(config, tokens, parts, jnp.float32)

    def run(weights) -> dict:
        for name in ("unet", "text_encoder"):
            graph, _, rest, _ = parts[name]
            pipe.params[name] = nnx.split(nnx.merge(graph, weights[name], rest))[1]
        r = judge_lib.fidelity(pipe, judge, num_prompts=int(dcfg.fidelity_prompts), steps=int(dcfg.fidelity_steps),
                               guidance=float(dcfg.fidelity_guidance), scheduler="pndm", seed=0)
        return {"class_fidelity": r["single"]["class"], "colour_fidelity": r["single"]["colour"],
                "multi_object_presence": r["multi"]["classes"]}

    return run


# ----------------------------------------------------------------------------------------------
# Export


def _init_step(folder: str) -> int | None:
    """The diffusion step recorded in a folder written by ``export`` (None for other folders)."""
    path = os.path.join(folder, "training.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("diffusion_step")


def _vae_config(info: dict, scaling_factor: float) -> dict:
    """The VAE's config.json as shipped: ``_frozen_vae``'s info without its ``_source`` tag, with
    the latent scale measured for (or carried into) the diffusion stage."""
    return {**{k: v for k, v in info.items() if k != "_source"}, "scaling_factor": float(scaling_factor)}


def _assemble_pipeline(config: ml_collections.ConfigDict, tokens: "_Tokens", parts: dict, dtype) -> pretrained.Pipeline:
    """A `pretrained.Pipeline` of trained parts, name -> (graph, params, rest, config dict), with
    floating weights in ``dtype``: what ``export`` writes and what the fidelity curve samples from."""
    graphdefs, params, model_configs = {}, {}, {}
    for name, (graph, p, rest, cfg) in parts.items():
        p = jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, p)
        model = nnx.merge(graph, p, rest)
        graphdefs[name], params[name] = nnx.split(model)
        mc = getattr(model, "config", None)  # re-parsed: the VAE's scaling_factor is new
        model_configs[name] = type(mc).from_dict(cfg) if hasattr(mc, "from_dict") else cfg
    return pretrained.Pipeline(
        tokenizer=tokens.tokenizer, graphdefs=graphdefs, params=params, model_configs=model_configs,
        configs={name: cfg for name, (_, _, _, cfg) in parts.items()},
        scheduler_config=_plain(config.scheduler.to_dict()), dtype=dtype, tokenizer_path=tokens.folder,
        model_index={"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"})


def export(config: ml_collections.ConfigDict, workdir: str, out_dir: str | None = None) -> str:
    """Write the diffusers-format folder via ``pretrained.save_pipeline``: EMA weights of the latest
    diffusion checkpoint, the VAE with its measured ``scaling_factor``, the closed-vocabulary
    tokenizer and SD 1.x's PNDM scheduler config; weights in ``config.export_dtype``. Returns the
    folder (default ``<workdir>/model``)."""
    out_dir = out_dir or config.export_dir or os.path.join(workdir, "model")
    seed = int(config.seed)
    tokens = _Tokens(_ensure_tokenizer(workdir, config), config.tokenizer.max_length)
    vg, vp, vr, vae_info = _export_vae(config, workdir)
    text_cfg = _text_encoder_dict(config, tokens.tokenizer)
    unet_cfg = _plain(config.unet.to_dict())
    ug, up, ur = _split(_build("unet", unet_cfg, seed + 1))
    tg, tp, tr = _split(_build("text_encoder", text_cfg, seed + 2))
    if "diffusion" in config.stages:
        weights, meta = _restore_item(workdir, "diffusion", "ema", {"unet": up, "text_encoder": tp},
                                      config.keep_checkpoints)
    else:  # a decoder-only fine-tune of ``init_from``: its UNet and text encoder as they are
        weights = {"unet": _init_weights(config, "unet", unet_cfg, up),
                   "text_encoder": _init_weights(config, "text_encoder", text_cfg, tp)}
        source = _init_pipeline(os.path.abspath(config.init_from))
        meta = {"step": _init_step(config.init_from),
                "scaling_factor": float(source.configs["vae"]["scaling_factor"])}
    dtype = jnp.dtype(config.export_dtype)
    parts = {"vae": (vg, vp, vr, _vae_config(vae_info, meta["scaling_factor"])),
             "unet": (ug, weights["unet"], ur, unet_cfg),
             "text_encoder": (tg, weights["text_encoder"], tr, text_cfg)}
    pipe = _assemble_pipeline(config, tokens, parts, dtype)
    path = pretrained.save_pipeline(pipe, out_dir, overwrite=True)
    with open(os.path.join(path, "training.json"), "w") as f:
        json.dump({"diffusion_step": meta.get("init_step", 0) + meta["step"], "weights": "EMA", "dtype": str(dtype),
                   "config": json.loads(config.to_json())}, f, indent=2)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Entry points


def run(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Run (or resume) every stage in ``config.stages``, then export. Returns True when all stages
    are complete, False when stopped early by ``config.max_seconds``, ``config.max_steps`` or
    SIGTERM (rerun the same command to go on)."""
    if int(config.diffusion.fidelity_every) > 0 and not os.path.isfile(str(config.diffusion.fidelity_judge)):
        raise ValueError(f"diffusion.fidelity_every > 0 needs diffusion.fidelity_judge, a judge file (got "
                         f"{str(config.diffusion.fidelity_judge)!r}; `datasetdm fidelity --model DIR --judge train "
                         "--out OUT` writes OUT/judge.msgpack)")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    deadline = time.time() + float(config.max_seconds) if float(config.max_seconds) > 0 else None
    budget = [int(config.max_steps)] if int(config.max_steps) > 0 else None
    for name in config.stages:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r} (expected one of {STAGES})")
        if name == "vae" and config.init_from:
            continue  # the warm-start folder's VAE is used
        stage = {"vae": _vae_stage, "vae_decoder": _vae_decoder_stage,
                 "diffusion": _diffusion_stage}[name](config, workdir)
        if not _train_stage(stage, config, workdir, deadline, budget):
            return False
    if config.export and ("diffusion" in config.stages or (config.init_from and "vae_decoder" in config.stages)):
        export(config, workdir)
    return True


def main_pretrain(config_path: str, workdir: str, overrides: Sequence[str] | None = None) -> bool:
    """CLI body of ``datasetdm pretrain --config FILE.py[:arg] --workdir DIR [key=value ...]``."""
    config = load_config(config_path, overrides)
    done = run(config, workdir)
    png = curves.plot_curves(curves.read_metrics(os.path.join(workdir, METRICS_FILE)),
                             os.path.join(workdir, "curves.png"))
    print(f"pretrain: {'finished' if done else 'stopped early; rerun the same command to resume'} "
          f"(workdir {workdir}, curves {png})")
    return done
