"""Train a P-Decoder on a frozen Stable Diffusion (the official recipe): ``datasetdm
train``.

One train step: real image -> VAE latent (posterior mean; the VAE is frozen) -> noised to the
timestep ``config.timestep`` (default 0: the official code's ``timesteps[-1]`` of a 50-step DDPM
schedule) with fresh noise -> one UNet pass on the CFG batch [uncond "" ; the image's caption] with
feature capture -> decoder -> task loss (``decoders/tasks.py``: Mask2Former set loss for semantic
and class-aware instance segmentation, SILog for depth, JointsMSE on Gaussian heatmaps for pose)
-> Adam. The step is one jitted pure function of the decoder's (params, opt state), the batch, and
the frozen pipeline params, over a data-parallel ``('data',)`` mesh of the local devices. With
``config.cache_features`` the frozen half runs once per (training image, mirror) before training
(``Trainer.feature_bank``, noise fixed per row) and each step gathers its rows from that bank.

Resumable like ``pretrain``: step, decoder params, optimiser state and the grain iterator position
go into an orbax checkpoint; randomness (noise, flips, loss point sampling) is a pure function of
``(config.seed, step)``, so a stopped-and-rerun training equals an uninterrupted one. Metrics go to
``metrics.jsonl`` and to TensorBoard event files (tensorboardX) in ``<workdir>/tb``; the validation
split is scored every ``eval_every`` steps, the test split once at the end (``results.json``).
With ``config.select_metric`` (a validation metric, e.g. 'AP') the decoder of the best validation
score so far is kept (in the checkpoint too), tested at the end and loaded by
``load_trained_decoder``: early stopping for decoders that overfit 100 images.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from datasetdm_jax import devices, hub, pretrained, schedulers
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.data import pipeline, shapes
from datasetdm_jax.decoders import feature_spec
from datasetdm_jax.decoders import tasks
from datasetdm_jax.pretrain import (METRICS_FILE, TrainingDiverged, _append_metrics, _manager, _StopFlag,
                                    _truncate_metrics)

__all__ = ["Trainer", "run", "evaluate", "main_train", "load_trained_decoder", "data_source", "PRETRAIN_HINT",
           "METRICS_FILE", "RESULTS_FILE", "TrainingDiverged"]

PRETRAIN_HINT = "datasetdm pretrain --config configs/shapes_sd.py"
STAGE = "decoder"
RESULTS_FILE = "results.json"
COMMAND_FILE = "command.txt"
# Batch keys each task's loss reads (besides image and caption ids); only these go to the devices.
TASK_KEYS: dict[str, tuple[str, ...]] = {
    "semantic": ("segmentation",),
    "instance": ("instances", "instance_classes", "num_instances"),
    "depth": ("depth",),
    "pose": ("keypoints", "num_persons"),
}
# Validation metrics where lower is better; every other metric is maximised by ``select_metric``.
LOWER_IS_BETTER = ("rel", "rmse")
_DTYPES = {"segmentation": np.int32, "depth": np.float32, "instances": bool, "instance_classes": np.int32,
           "num_instances": np.int32, "keypoints": np.float32, "num_persons": np.int32}


def load_frozen_pipeline(path: str) -> pretrained.Pipeline:
    """The frozen SD: a local folder or a Hugging Face repo id (empty path: the shipped shapes-world
    model); a missing one names both options and the command that makes the shapes-world one."""
    if not path:
        from datasetdm_jax.assets import shapes_sd_path
        path = shapes_sd_path()
    if not os.path.isfile(os.path.join(path, "model_index.json")) and not hub.is_repo_id(path):
        raise FileNotFoundError(f"no Stable Diffusion model at {path}; {hub.MODEL_HINT}")
    return pretrained.load_pipeline(path, dtype=jnp.float32)


def _timestep(sched: schedulers.ScheduleConfig, t: int) -> int:
    """t >= 0 as given; t < 0: the last timestep of this pipeline's 50-step DDIM schedule (1 for SD 1.x)."""
    return int(t) if int(t) >= 0 else int(schedulers._ddim_timesteps(sched, 50)[-1])


# ------------------------------------------------------------------------------------------ data

class FilteredSource:
    """The first ``num`` examples of ``base`` for which ``keep(example)`` holds (found once, in order).

    Deterministic (a pure function of ``base``), random-access, so grain reads it like any source.
    """

    def __init__(self, base: Any, num: int, keep: Callable[[dict], bool], name: str = "filter"):
        self.base, self.name, self.indices, self._kept = base, name, [], []
        i = 0
        while len(self.indices) < num:
            if i >= len(base):
                raise ValueError(f"{name}: only {len(self.indices)} of {len(base)} examples qualify, {num} asked")
            example = base[i]
            if keep(example):
                self.indices.append(i)
                self._kept.append(example)  # small sets (labelled / eval images): keep, don't re-render
            i += 1
        self.config = getattr(base, "config", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self._kept[int(i)]


# name -> predicate on a rendered scene; config.data.filter picks one ('' keeps all).
SCENE_FILTERS: dict[str, Callable[[dict], bool]] = {
    "one_person": lambda s: len(s["keypoints"]) == 1,
    "has_person": lambda s: len(s["keypoints"]) >= 1,
}


def _shapes_source(config: ml_collections.ConfigDict, split: str, num: int, seed: int):
    cfg = shapes.ShapesConfig(image_size=int(config.data.image_size))
    name = str(config.data.get("filter", "") or "")
    if not name:
        return shapes.make_split(split, num, seed, cfg)
    if name not in SCENE_FILTERS:
        raise ValueError(f"data.filter={name!r} is not one of {sorted(SCENE_FILTERS)}")
    return FilteredSource(shapes.make_split(split, 2**31 - 1, seed, cfg), num, SCENE_FILTERS[name], name)


# config.data.source -> (config, split, num, seed) -> random-access source of standard examples.
SOURCES: dict[str, Callable[..., Any]] = {"shapes": _shapes_source}


def _real_source(config: ml_collections.ConfigDict, split: str, num: int, seed: int):
    """A real dataset (``data/sources.py``); its few-shot selection applies to the training split only."""
    from datasetdm_jax.data import sources
    return sources.build(config.data, split, train=split == str(config.data.split), num=num)


SOURCES.update({name: _real_source for name in ("voc", "cityscapes", "coco_instance", "coco_pose", "nyu")})


def data_source(config: ml_collections.ConfigDict, split: str, num: int, seed: int):
    """The random-access source ``config.data.source`` (default 'shapes') names, for one split."""
    kind = str(config.data.get("source", "shapes"))
    if kind not in SOURCES:
        raise ValueError(f"data.source={kind!r} is not one of {sorted(SOURCES)}")
    return SOURCES[kind](config, split, int(num), int(seed))


def _train_source(config: ml_collections.ConfigDict):
    return data_source(config, str(config.data.split), int(config.data.num_images), int(config.data.seed))


def _train_iterator(config: ml_collections.ConfigDict, data_state: Any | None):
    it = iter(pipeline.grain_dataset(_train_source(config), int(config.batch_size), int(config.data.seed),
                                     num_epochs=None, with_index=True))
    if data_state is not None:
        it.set_state(data_state)
    return it


# ------------------------------------------------------------------------------------------ trainer

class Trainer:
    """Holds the frozen pipeline, the decoder's graphdef and the jitted train / predict functions.

    ``step_fn(state, batch, frozen)``: one train step; ``predict_fn(params, frozen, batch, key)``:
    images + captions -> labels (``tasks.task_predict``);
    ``decode_fn(params, features)``: captured Features (e.g. from ``generate.sample_with_features``
    with the same capture preset) -> labels, for generation.
    """

    def __init__(self, config: ml_collections.ConfigDict, pipe: pretrained.Pipeline | None = None):
        self.config = config
        self.task = str(config.task)
        self.spec = tasks.spec_from_config(config)
        self.pipe = pipe or load_frozen_pipeline(str(config.pipeline))
        self.sched = self.pipe.schedule
        self.t = _timestep(self.sched, config.timestep)
        self.capture = str(config.capture)
        self.num_classes = self.spec.num_classes
        # VAE-decoder maps above the latent resolution (features.vae_maps); () = the UNet's alone.
        self.vae_features = tuple(int(r) for r in config.get("vae_features", ()))
        self.uncond_ids = np.asarray(self.pipe.tokenize([""])[0], np.int32)
        size = int(config.data.image_size)
        # The decoder's input shapes: `features` on one image, traced, not run.
        feats = jax.eval_shape(self.features, {k: self.pipe.params[k] for k in ("vae", "unet", "text_encoder")},
                               jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
                               jax.ShapeDtypeStruct((1, self.pipe.max_length), jnp.int32), jax.random.key(0))
        decoder = tasks.build_decoder(self.spec, feature_spec(feats), config.decoder.to_dict(),
                                      rngs=nnx.Rngs(int(config.seed)))
        self.graph, params, self.rest = nnx.split(decoder, nnx.Param, ...)
        self.init_params = nnx.to_pure_dict(params)
        self.num_params = int(sum(np.size(x) for x in jax.tree.leaves(self.init_params)))
        self.tx = optax.adam(float(config.lr))
        self.base_key = jax.random.key(int(config.seed))
        self.mesh = devices.data_mesh(int(config.batch_size))  # local devices: one mesh per process
        self.repl, self.data_sharding = devices.data_shardings(self.mesh)
        self.frozen = jax.device_put({k: self.pipe.params[k] for k in ("vae", "unet", "text_encoder")}, self.repl)
        # Two jits per step: the frozen SD's features, then the decoder's update. Split so the big
        # SD half is one compilation whatever the task (the persistent cache shares it between
        # trainers of equal shapes); jitted once per Trainer, so resumed runs in one process reuse it.
        self.features_fn = jax.jit(self.features, in_shardings=(self.repl, self.data_sharding,
                                                                 self.data_sharding, self.repl))
        self._noise_key = jax.jit(lambda step: jax.random.split(jax.random.fold_in(self.base_key, step))[0])
        self._decoder_step = jax.jit(self.decoder_step, in_shardings=(self.repl, self.data_sharding,
                                                                      self.data_sharding),
                                     out_shardings=(self.repl, self.repl))
        self.decode_fn = jax.jit(self.decode)

    # -- pure pieces -----------------------------------------------------------------------------
    def _unet(self, unet_params, x, emb):
        from datasetdm_jax import features
        eps, taps = nnx.merge(self.pipe.graphdefs["unet"], unet_params)(x, jnp.full((x.shape[0],), float(self.t)),
                                                                           emb, capture=True)
        return eps, features.extract(taps, self.capture, x.shape[0] // 2)

    def _vae_maps(self, vae_params, mean):
        from datasetdm_jax import features
        _, taps = nnx.merge(self.pipe.graphdefs["vae"], vae_params).decode(mean, capture=True)
        return features.vae_maps(taps, self.vae_features)

    def features(self, frozen, image, input_ids, key):
        """(B,H,W,3) in [-1,1], (B,L) caption ids -> captured Features (frozen: no gradient)."""
        p = self.pipe
        mean, _ = nnx.merge(p.graphdefs["vae"], frozen["vae"]).encode(image.astype(p.dtype))
        z0 = (mean - p.shift_factor) * p.scaling_factor
        zt = schedulers.add_noise(self.sched, z0, jax.random.normal(key, z0.shape, z0.dtype), self.t)
        ids = jnp.concatenate([jnp.broadcast_to(jnp.asarray(self.uncond_ids), input_ids.shape), input_ids])
        emb = nnx.merge(p.graphdefs["text_encoder"], frozen["text_encoder"]).encode(ids, clip_skip=p.clip_skip)
        _, feats = self._unet(frozen["unet"], jnp.concatenate([zt, zt]), emb)
        if self.vae_features:  # decoded from the clean latent, as generation decodes its result
            from datasetdm_jax import features
            feats = features.add_maps(feats, self._vae_maps(frozen["vae"], mean))
        return jax.lax.stop_gradient(feats)

    def apply(self, params, feats):
        """Raw decoder output on Features (segmentation: all layers' logits and masks)."""
        return nnx.merge(self.graph, params, self.rest)(feats)

    def loss(self, params, feats, batch, key):
        return tasks.task_loss(self.spec, self.apply(params, feats), batch, key)

    def decode(self, params, feats) -> dict[str, jax.Array]:
        """Features -> labels at image resolution (see ``tasks.task_predict``)."""
        return tasks.task_predict(self.spec, self.apply(params, feats))

    def predict(self, params, frozen, batch, key) -> dict[str, jax.Array]:
        """Labels for one batch of real images with captions."""
        return self.decode(params, self.features(frozen, batch["image"], batch["input_ids"], key))

    def decoder_step(self, state, feats, batch):
        """One Adam step of the decoder on captured features (pure; keys from (seed, step))."""
        key = jax.random.split(jax.random.fold_in(self.base_key, state["step"]))[1]
        (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(state["params"], feats, batch, key)
        updates, opt = self.tx.update(grads, state["opt"], state["params"])
        new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates), "opt": opt}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

    def step_fn(self, state, batch, frozen):
        """One train step on a device batch: (state, batch, frozen) -> (new state, metrics)."""
        feats = self.features_fn(frozen, batch["image"], batch["input_ids"], self._noise_key(state["step"]))
        return self._decoder_step(state, feats, batch)

    def predict_fn(self, params, frozen, batch, key) -> dict[str, jax.Array]:
        """Jitted ``predict``: labels for one batch of real images with captions."""
        return self.decode_fn(params, self.features_fn(frozen, batch["image"], batch["input_ids"], key))

    # -- host side -------------------------------------------------------------------------------
    def host_batch(self, b: dict, step: int, augment: bool = True) -> dict:
        """Numpy batch -> the arrays this task's step needs; optional horizontal flip from (seed, step).
        A batch with source positions (``index``) also gets ``entry``: its feature-bank row."""
        out = {"image": np.asarray(b["image"], np.float32),
               "input_ids": np.asarray(self.pipe.tokenize([str(c) for c in b["caption"]]), np.int32)}
        for k in TASK_KEYS[self.task]:
            if k not in b:
                raise KeyError(f"task {self.task!r} needs batch key {k!r}; the data source gave {sorted(b)}")
            out[k] = np.asarray(b[k], _DTYPES[k])
        flip = np.zeros(len(out["image"]), bool)
        if augment and bool(self.config.data.flip):
            flip = np.random.default_rng([int(self.config.seed), int(step)]).random(len(flip)) < 0.5
            out = tasks.flip_batch(out, flip)
        if "index" in b:
            out["entry"] = (2 * np.asarray(b["index"], np.int32) + flip).astype(np.int32)
        return out

    def feature_bank(self, source: Any) -> Any:
        """Captured features of every (training image, mirror) pair, computed once on the host:
        row ``2 * i + f`` is ``source[i]``, mirrored when f = 1 (the only augmentation), noised with
        a draw fixed per row. With it a train step is the decoder's update alone: the frozen SD's
        pass, half or more of a step, is paid once per image instead of once per step. The cost is
        memory (rows x the Features size) and that fixed draw: at timestep 0 (noise std 0.03) it
        changed nothing measurable (semantic test mIoU 0.335 against 0.316 with fresh noise per
        step); at 400 the two were not compared."""
        from tqdm.auto import tqdm

        bs = int(self.config.batch_size)
        bank = None
        ds = pipeline.grain_dataset(source, bs, None, drop_remainder=False, with_index=True)
        for b in tqdm(ds, total=-(-len(source) // bs), desc="feature bank", leave=False):
            hb = self.host_batch(b, 0, augment=False)
            n = len(hb["image"])
            pad = {k: np.concatenate([v, np.repeat(v[-1:], bs - n, 0)]) for k, v in hb.items()}
            for f in (0, 1):
                x = tasks.flip_batch(pad, np.full(bs, bool(f)))
                key = jax.random.fold_in(jax.random.split(self.base_key)[1], int(b["index"][0]) * 2 + f)
                feats = jax.device_get(self.features_fn(self.frozen, *jax.device_put(
                    (x["image"], x["input_ids"]), self.data_sharding), key))
                if bank is None:
                    bank = jax.tree.map(lambda a: np.zeros((2 * len(source),) + a.shape[1:], a.dtype), feats)
                rows = 2 * np.asarray(b["index"]) + f
                for dst, a in zip(jax.tree.leaves(bank), jax.tree.leaves(feats)):
                    dst[rows] = a[:n]
        return bank

    def bank_step(self, state, bank, batch):
        """``decoder_step`` on the batch's rows (``entry``) of a ``feature_bank``."""
        return self.decoder_step(state, jax.tree.map(lambda a: a[batch["entry"]], bank), batch)


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
        self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start if start > 0 else None)

    def write(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        _append_metrics(self.workdir, {"stage": STAGE, "step": step, **{prefix + k: v for k, v in values.items()},
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

    workdir = workdir or str(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    trainer = trainer or Trainer(config, pipe)
    total = int(config.steps)
    budget = int(max_steps if max_steps is not None else config.max_steps)
    repl, data_sh = trainer.repl, trainer.data_sharding
    params = trainer.init_params
    # Checkpoints hold host (numpy) copies: the state is replicated, and saving device arrays
    # would compile a slice per array and device.
    state = jax.device_get({"step": np.zeros((), np.int32), "params": params, "opt": trainer.tx.init(params)})
    frozen = trainer.frozen
    mngr = _manager(workdir, STAGE, int(config.keep_checkpoints))
    data_state = None
    best = _Best(str(config.get("select_metric", "")))
    latest = mngr.latest_step()
    if latest is not None:
        r = mngr.restore(latest, args=ocp.args.Composite(
            data=ocp.args.JsonRestore(),
            params=ocp.args.StandardRestore(state["params"]),
            train=ocp.args.StandardRestore({"step": state["step"], "opt": state["opt"]}),
            **best.restore_args(os.path.join(workdir, STAGE, str(latest)), state["params"])))
        state = {"step": r["train"]["step"], "params": r["params"], "opt": r["train"]["opt"]}
        data_state = r["data"]
        best.restored(r)
        _truncate_metrics(workdir, STAGE, latest)
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

    if bool(config.get("cache_features", False)):
        bank = jax.device_put(trainer.feature_bank(_train_source(config)), repl)
        bank_step = jax.jit(trainer.bank_step, in_shardings=(repl, repl, data_sh), out_shardings=(repl, repl))
        step_fn = lambda st, b, _frozen: bank_step(st, bank, b)  # noqa: E731
    it = _train_iterator(config, data_state)
    log_every, eval_every = max(1, int(config.log_every)), int(config.eval_every)
    summaries = _Summaries(workdir, start)
    bar = tqdm(total=total, initial=start, desc=f"train {config.task}", dynamic_ncols=True)
    t_ckpt, done_here = time.time(), 0
    try:
        with _StopFlag() as stop:
            for step in range(start, total):
                batch = jax.device_put(trainer.host_batch(next(it), step), data_sh)
                new_state, m = step_fn(state, batch, frozen)
                m = jax.device_get(m)
                if not np.isfinite(m["loss"]):
                    raise TrainingDiverged(
                        f"train: loss is {m['loss']} at step {step + 1}; stopped without saving (last good "
                        f"checkpoint: step {mngr.latest_step()} in {os.path.join(workdir, STAGE)})")
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
        if not os.path.isfile(os.path.join(workdir, RESULTS_FILE)) or start < total:
            res = evaluate(trainer, final)
            summaries.write(total, res, prefix="test/")
            tmp = os.path.join(workdir, RESULTS_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"task": trainer.task, "step": total, "split": str(config.eval.split),
                           "num_images": int(config.eval.num_images), "decoder_params": trainer.num_params,
                           **best.summary(total), **res}, f, indent=2)
            os.replace(tmp, os.path.join(workdir, RESULTS_FILE))
    finally:
        bar.close()
        summaries.close()
        mngr.close()
    return True, trainer, final


class _Best:
    """The decoder of the best validation ``metric`` so far (host copy), saved with every checkpoint
    so that a resumed run selects exactly what an uninterrupted one would. ``metric=''``: off."""

    def __init__(self, metric: str):
        self.metric = metric
        self.sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        self.step, self.value, self.params = 0, -np.inf, None

    def update(self, step: int, ev: dict[str, Any], params: Any) -> bool:
        if not self.metric:
            return False
        if self.metric not in ev:
            raise KeyError(f"train: select_metric={self.metric!r} is not a validation metric of this task "
                           f"(it has {sorted(ev)})")
        score = self.sign * float(ev[self.metric])
        if not score > self.value:  # ties and NaN keep the earlier decoder
            return False
        self.step, self.value, self.params = step, score, jax.device_get(params)
        return True

    def params_or(self, params: Any) -> Any:
        """The selected decoder (replicated like ``params``), or ``params`` when nothing was selected."""
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
        if not self.metric or not os.path.isdir(os.path.join(checkpoint_dir, "best")):
            return {}
        return {"best": ocp.args.StandardRestore(target), "best_meta": ocp.args.JsonRestore()}

    def restored(self, r: Any) -> None:
        meta = r.get("best_meta") if self.metric else None
        if meta:
            self.step, self.value, self.params = int(meta["step"]), float(meta["value"]), r["best"]


def main_train(config_path: str, workdir: str | None = None, overrides: Sequence[str] | None = None) -> bool:
    """CLI body of ``datasetdm train --config configs/<task>.py[:arg] [--workdir DIR] [key=value ...]``."""
    config = load_config(config_path, overrides)
    wd = workdir or str(config.workdir)
    os.makedirs(wd, exist_ok=True)
    cmd = " ".join(["datasetdm train --config", config_path] + (["--workdir", workdir] if workdir else [])
                   + list(overrides or ()))
    with open(os.path.join(wd, COMMAND_FILE), "w") as f:
        f.write(cmd + "\n")
    done, trainer, params = run(config, workdir)
    if done:
        with open(os.path.join(wd, RESULTS_FILE)) as f:
            res = json.load(f)
        print(f"train: finished; test ({res['split']}, {res['num_images']} images): "
              + ", ".join(f"{k}={v:.4g}" for k, v in res.items() if isinstance(v, float)))
    else:
        print("train: stopped early; rerun the same command to resume")
    print(f"train: workdir {wd}")
    return done


def _config_and_workdir(config: ml_collections.ConfigDict | str, workdir: str | None):
    """A ConfigDict, a config file (``path.py[:arg]``) or a train workdir (holds config.json)."""
    if isinstance(config, ml_collections.ConfigDict):
        return config, workdir or str(config.workdir)
    path = str(config)
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{path} is not a `datasetdm train` workdir (no config.json)")
        with open(cfg_file) as f:
            return ml_collections.ConfigDict(json.load(f)), workdir or path
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
    if isinstance(config, str) and config_path is None and not os.path.isdir(config):
        config_path = config
    config, workdir = _config_and_workdir(config, workdir)
    folder = os.path.abspath(os.path.join(workdir, STAGE))
    steps = sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []
    if not steps:
        cmd_file = os.path.join(workdir, COMMAND_FILE)
        if config_path is None and os.path.isfile(cmd_file):
            with open(cmd_file) as f:
                cmd = f.read().strip()
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
        selected = os.path.isdir(os.path.join(folder, str(step), "best"))
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
