"""Train a P-Decoder on a frozen Stable Diffusion (reference §2.1 and §4): ``datasetdm train``.

One train step: real image -> VAE latent (posterior mean; the VAE is frozen) -> noised to the
timestep ``config.timestep`` (default 0: the official code's ``timesteps[-1]`` of a 50-step DDPM
schedule) with fresh noise -> one UNet pass on the CFG batch [uncond "" ; the image's caption] with feature capture ->
decoder (segmentation: Mask2Former set loss; depth: SILog) -> Adam. The step is one jitted pure
function of the decoder's (params, opt state), the batch, and the frozen pipeline params, over a
data-parallel ``('data',)`` mesh of the local devices.

Resumable like ``pretrain``: step, decoder params, optimiser state and the grain iterator position
go into an orbax checkpoint; randomness (noise, flips, loss point sampling) is a pure function of
``(config.seed, step)``, so a stopped-and-rerun training equals an uninterrupted one.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from datasetdm_jax import metrics as mt
from datasetdm_jax import pretrained, schedulers
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.data import pipeline, shapes
from datasetdm_jax.decoders import feature_spec, get_decoder, segmentation_loss, semantic_inference, silog_loss
from datasetdm_jax.pretrain import (METRICS_FILE, TrainingDiverged, _append_metrics, _manager, _StopFlag,
                                    _truncate_metrics)

__all__ = ["Trainer", "run", "evaluate", "main_train", "PRETRAIN_HINT", "METRICS_FILE", "TrainingDiverged"]

PRETRAIN_HINT = "datasetdm pretrain --config configs/shapes_sd.py"
STAGE = "decoder"


def load_frozen_pipeline(path: str) -> pretrained.Pipeline:
    """The frozen SD; a missing folder is a one-line error naming the command that makes it."""
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"no Stable Diffusion model at {path}; make the shapes-world one with "
                                f"`{PRETRAIN_HINT}` (or set pipeline=PATH)")
    return pretrained.load_pipeline(path, dtype=jnp.float32)


def _shapes_config(config: ml_collections.ConfigDict) -> shapes.ShapesConfig:
    return shapes.ShapesConfig(image_size=int(config.data.image_size))


def _timestep(sched: schedulers.ScheduleConfig, t: int) -> int:
    """t >= 0 as given; t < 0: the last timestep of this pipeline's 50-step DDIM schedule (1 for SD 1.x)."""
    return int(t) if int(t) >= 0 else int(schedulers._ddim_timesteps(sched, 50)[-1])


class Trainer:
    """Holds the frozen pipeline, the decoder's graphdef and the jitted train / predict functions."""

    def __init__(self, config: ml_collections.ConfigDict, pipe: pretrained.Pipeline | None = None):
        self.config = config
        self.task = str(config.task)
        if self.task not in ("semantic", "depth"):
            raise ValueError(f"task must be 'semantic' or 'depth', got {self.task!r}")
        self.pipe = pipe or load_frozen_pipeline(str(config.pipeline))
        self.sched = self.pipe.schedule
        self.t = _timestep(self.sched, config.timestep)
        self.capture = str(config.capture)
        self.num_classes = len(shapes.CLASSES)
        size = int(config.data.image_size)
        z = jax.ShapeDtypeStruct((2, size // self.pipe.vae_scale_factor, size // self.pipe.vae_scale_factor,
                                  int(self.pipe.configs["unet"].get("in_channels", 4))), jnp.float32)
        emb = jax.ShapeDtypeStruct((2, self.pipe.max_length, int(self.pipe.configs["unet"]["cross_attention_dim"])),
                                   jnp.float32)
        _, feats = jax.eval_shape(lambda x, e: self._unet(self.pipe.params["unet"], x, e), z, emb)
        spec = feature_spec(feats)
        dcfg = dict(config.decoder.to_dict())
        if self.task == "semantic":
            dcfg["num_classes"] = self.num_classes
            name = "segmentation"
        else:
            dcfg.setdefault("out_size", size)
            name = "depth"
        decoder = get_decoder(name, spec, dcfg, rngs=nnx.Rngs(int(config.seed)))
        self.graph, params, self.rest = nnx.split(decoder, nnx.Param, ...)
        self.init_params = nnx.to_pure_dict(params)
        self.tx = optax.adam(float(config.lr))
        self.uncond_ids = np.asarray(self.pipe.tokenize([""])[0], np.int32)
        self.base_key = jax.random.key(int(config.seed))
        self.mesh = jax.make_mesh((jax.local_device_count(),), ("data",),
                                  axis_types=(jax.sharding.AxisType.Auto,))
        self.repl, self.data_sharding = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P("data"))
        if int(config.batch_size) % self.mesh.size:
            raise ValueError(f"batch_size={config.batch_size} is not divisible by {self.mesh.size} devices")
        self.frozen = jax.device_put({k: self.pipe.params[k] for k in ("vae", "unet", "text_encoder")}, self.repl)
        # Jitted once per Trainer, so resumed runs in one process (tests) reuse the compilation.
        self.step_fn = jax.jit(self.train_step, in_shardings=(self.repl, self.data_sharding, self.repl),
                               out_shardings=(self.repl, self.repl))
        self.predict_fn = jax.jit(self.predict)

    # -- pure pieces -----------------------------------------------------------------------------
    def _unet(self, unet_params, x, emb):
        from datasetdm_jax import features
        eps, taps = nnx.merge(self.pipe.graphdefs["unet"], unet_params)(x, jnp.full((x.shape[0],), float(self.t)),
                                                                           emb, capture=True)
        return eps, features.extract(taps, self.capture, x.shape[0] // 2)

    def features(self, frozen, image, input_ids, key):
        """(B,H,W,3) in [-1,1], (B,L) caption ids -> captured Features (frozen: no gradient)."""
        p = self.pipe
        mean, _ = nnx.merge(p.graphdefs["vae"], frozen["vae"]).encode(image.astype(p.dtype))
        z0 = (mean - p.shift_factor) * p.scaling_factor
        zt = schedulers.add_noise(self.sched, z0, jax.random.normal(key, z0.shape, z0.dtype), self.t)
        ids = jnp.concatenate([jnp.broadcast_to(jnp.asarray(self.uncond_ids), input_ids.shape), input_ids])
        emb = nnx.merge(p.graphdefs["text_encoder"], frozen["text_encoder"]).encode(ids, clip_skip=p.clip_skip)
        _, feats = self._unet(frozen["unet"], jnp.concatenate([zt, zt]), emb)
        return jax.lax.stop_gradient(feats)

    def loss(self, params, frozen, batch, key):
        k_noise, k_loss = jax.random.split(key)
        feats = self.features(frozen, batch["image"], batch["input_ids"], k_noise)
        out = nnx.merge(self.graph, params, self.rest)(feats)
        if self.task == "semantic":
            k = self.num_classes
            gt_masks = (batch["segmentation"][:, None].astype(jnp.int32)
                        == jnp.arange(k)[None, :, None, None]).astype(jnp.float32)
            gt_valid = gt_masks.sum((2, 3)) > 0
            gt_classes = jnp.broadcast_to(jnp.arange(k), gt_valid.shape)
            total, parts = segmentation_loss(out, gt_classes, gt_masks, gt_valid, k_loss, num_classes=k,
                                             num_points=int(self.config.num_points))
            return total, {n: parts[n] for n in ("ce", "bce", "dice")}
        return silog_loss(out, batch["depth"]), {}

    def predict(self, params, frozen, batch, key):
        """Semantic map (B,H,W) int32 or depth (B,H,W) for one batch."""
        feats = self.features(frozen, batch["image"], batch["input_ids"], key)
        out = nnx.merge(self.graph, params, self.rest)(feats)
        if self.task == "semantic":
            return semantic_inference(out["logits"][-1], out["masks"][-1], out_size=batch["image"].shape[1])
        return out

    def train_step(self, state, batch, frozen):
        key = jax.random.fold_in(self.base_key, state["step"])
        (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(state["params"], frozen, batch, key)
        updates, opt = self.tx.update(grads, state["opt"], state["params"])
        new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates), "opt": opt}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

    # -- host side -------------------------------------------------------------------------------
    def host_batch(self, b: dict, step: int, augment: bool = True) -> dict:
        """Numpy batch -> the arrays the step needs; optional horizontal flip from (seed, step)."""
        out = {"image": np.asarray(b["image"], np.float32),
               "input_ids": np.asarray(self.pipe.tokenize([str(c) for c in b["caption"]]), np.int32),
               "segmentation": np.asarray(b["segmentation"], np.int32),
               "depth": np.asarray(b["depth"], np.float32)}
        if augment and bool(self.config.data.flip):
            rng = np.random.default_rng([int(self.config.seed), int(step)])
            flip = rng.random(len(out["image"])) < 0.5
            for k in ("image", "segmentation", "depth"):
                out[k] = np.where(flip.reshape((-1,) + (1,) * (out[k].ndim - 1)), out[k][:, :, ::-1], out[k])
        return out


def _train_iterator(config: ml_collections.ConfigDict, data_state: Any | None):
    src = shapes.make_split(str(config.data.split), int(config.data.num_images), int(config.data.seed),
                            _shapes_config(config))
    it = iter(pipeline.grain_dataset(src, int(config.batch_size), int(config.data.seed), num_epochs=None))
    if data_state is not None:
        it.set_state(data_state)
    return it


def evaluate(trainer: Trainer, params: Any, split: str | None = None, num: int | None = None) -> dict[str, float]:
    """mIoU (semantic) or REL / RMSE / delta1 (depth) on ``num`` images of ``split`` (fixed noise)."""
    config = trainer.config
    split = split or str(config.eval.split)
    num = int(num or config.eval.num_images)
    bs = int(config.eval.batch_size)
    src = shapes.make_split(split, num, int(config.data.seed), _shapes_config(config))
    ds = pipeline.grain_dataset(src, bs, None, drop_remainder=False)
    fn = trainer.predict_fn
    miou = mt.MeanIoU(trainer.num_classes)
    preds, gts = [], []
    for i, b in enumerate(ds):
        hb = trainer.host_batch(b, 0, augment=False)
        out = np.asarray(fn(params, trainer.frozen, hb, jax.random.key(int(config.seed) + 7 + i)))
        if trainer.task == "semantic":
            miou.update(out, hb["segmentation"])
        else:
            preds.append(out)
            gts.append(hb["depth"])
    if trainer.task == "semantic":
        return {"miou": float(miou.compute()[0])}
    return {k: float(v) for k, v in mt.depth_metrics(np.concatenate(preds), np.concatenate(gts)).items()}


def run(config: ml_collections.ConfigDict, workdir: str | None = None, *, pipe: pretrained.Pipeline | None = None,
        trainer: Trainer | None = None, max_steps: int | None = None) -> tuple[bool, Trainer, Any]:
    """Train (or resume) to ``config.steps``; returns (finished, trainer, decoder params).

    ``max_steps`` (or ``config.max_steps`` > 0) stops this invocation after that many steps, with
    a checkpoint, as a kill would; rerun to go on. ``trainer`` reuses a built Trainer (same config).
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
    latest = mngr.latest_step()
    if latest is not None:
        r = mngr.restore(latest, args=ocp.args.Composite(
            data=ocp.args.JsonRestore(),
            params=ocp.args.StandardRestore(state["params"]),
            train=ocp.args.StandardRestore({"step": state["step"], "opt": state["opt"]})))
        state = {"step": r["train"]["step"], "params": r["params"], "opt": r["train"]["opt"]}
        data_state = r["data"]
        _truncate_metrics(workdir, STAGE, latest)
    start = int(state["step"])
    state = jax.device_put(state, repl)
    step_fn = trainer.step_fn

    def save(step: int):
        host = jax.device_get(state)
        mngr.save(step, args=ocp.args.Composite(
            data=ocp.args.JsonSave(data_state), params=ocp.args.StandardSave(host["params"]),
            train=ocp.args.StandardSave({"step": host["step"], "opt": host["opt"]})), force=True)
        mngr.wait_until_finished()

    it = _train_iterator(config, data_state)
    log_every, eval_every = max(1, int(config.log_every)), int(config.eval_every)
    bar = tqdm(total=total, initial=start, desc=f"train {config.task}", dynamic_ncols=True)
    finished, t_ckpt, done_here = start >= total, time.time(), 0
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
                    rec = {"stage": STAGE, "step": done, **{k: float(v) for k, v in m.items()}, "time": time.time()}
                    _append_metrics(workdir, rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if eval_every > 0 and (done % eval_every == 0 or done == total):
                    ev = evaluate(trainer, state["params"])
                    _append_metrics(workdir, {"stage": STAGE, "step": done, **{f"eval/{k}": v for k, v in ev.items()}})
                    bar.write(f"step {done}: " + ", ".join(f"{k}={v:.4g}" for k, v in ev.items()))
                stop_now = stop.set or (budget > 0 and done_here >= budget)
                if (time.time() - t_ckpt >= float(config.checkpoint_every_s) or done == total or stop_now):
                    save(done)
                    t_ckpt = time.time()
                if stop_now:
                    return False, trainer, state["params"]
            finished = True
    finally:
        bar.close()
        mngr.close()
    return finished, trainer, state["params"]


def main_train(config_path: str, workdir: str | None = None, overrides: Sequence[str] | None = None) -> bool:
    """CLI body of ``datasetdm train --config configs/<task>.py[:arg] [--workdir DIR] [key=value ...]``."""
    config = load_config(config_path, overrides)
    done, trainer, params = run(config, workdir)
    print(f"train: {'finished' if done else 'stopped early; rerun the same command to resume'} "
          f"(workdir {workdir or config.workdir})")
    return done
