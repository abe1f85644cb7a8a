"""The P-Decoder on a frozen Stable Diffusion: its model, loss and jitted step (``Trainer``).

One train step: real image -> VAE latent (posterior mean; the VAE is frozen) -> noised to the
timestep ``config.timestep`` (default 0: the official code's ``timesteps[-1]`` of a 50-step DDPM
schedule) with fresh noise -> one UNet pass on the CFG batch [uncond "" ; the image's caption] with
feature capture -> decoder -> task loss (``decoders/tasks.py``: Mask2Former set loss for semantic
(or per-pixel cross-entropy, ``semantic_head='per_pixel'``) and class-aware instance segmentation,
SILog for depth, JointsMSE on Gaussian heatmaps for pose) -> Adam. The step is one jitted pure
function of the decoder's (params, opt state), the batch, and the frozen pipeline params, over a
data-parallel ``('data',)`` mesh of the local devices. With
``config.cache_features`` the frozen half runs once per (training image, mirror) before training
(``Trainer.feature_bank``, noise fixed per row) and each step gathers its rows from that bank.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from datasetdm_jax import devices, generate, hub, pretrained, schedulers
from datasetdm_jax.data import pipeline
from datasetdm_jax.decoders import feature_spec
from datasetdm_jax.decoders import tasks

__all__ = ["Trainer", "load_frozen_pipeline", "frozen_pipeline_for", "TASK_KEYS", "BATCH_DTYPES", "PRETRAIN_HINT"]

PRETRAIN_HINT = "datasetdm pretrain --config configs/shapes_sd.py"
# Batch keys each task's loss reads (besides image and caption ids); only these go to the devices.
TASK_KEYS: dict[str, tuple[str, ...]] = {
    "semantic": ("segmentation",),
    "instance": ("instances", "instance_classes", "num_instances"),
    "depth": ("depth",),
    "pose": ("keypoints", "num_persons"),
}
# The dtype of each batch key on the devices.
BATCH_DTYPES = {"segmentation": np.int32, "depth": np.float32, "instances": bool, "instance_classes": np.int32,
                "num_instances": np.int32, "keypoints": np.float32, "num_persons": np.int32}


def load_frozen_pipeline(path: str, dtype: str = "auto") -> pretrained.Pipeline:
    """The frozen SD: a local folder or a Hugging Face repo id (empty path: the shipped shapes-world
    model), in ``dtype`` (``pretrained.DTYPES``; "auto": bfloat16 on TPU/GPU, float32 on CPU); a
    missing one names both options and the command that makes the shapes-world one."""
    dtype = pretrained.resolve_dtype(dtype)  # a bad value fails before any file is read
    if not path:
        from datasetdm_jax.assets import shapes_sd_path
        path = shapes_sd_path()
    if not os.path.isfile(os.path.join(path, "model_index.json")) and not hub.is_repo_id(path):
        raise FileNotFoundError(f"no Stable Diffusion model at {path}; {hub.model_hint(path)}")
    return pretrained.load_pipeline(path, dtype=dtype)


def frozen_pipeline_for(config: ml_collections.ConfigDict) -> pretrained.Pipeline:
    """The frozen SD a config names (``pipeline``) in its ``dtype`` (default "auto")."""
    return load_frozen_pipeline(str(config.pipeline), str(config.get("dtype", "auto")))


def _timestep(sched: schedulers.ScheduleConfig, t: int) -> int:
    """t >= 0 as given; t < 0: the last timestep of this pipeline's 50-step DDIM schedule (1 for SD 1.x)."""
    return int(t) if int(t) >= 0 else int(schedulers.ddim_timesteps(sched, 50)[-1])


class Trainer:
    """Holds the frozen pipeline, the decoder's graphdef and the jitted train / predict functions.

    ``step_fn(state, batch, frozen)``: one train step; ``predict_fn(params, frozen, batch, key)``:
    images + captions -> labels (``tasks.task_predict``);
    ``decode_fn(params, features[, truth])``: captured Features (e.g. from ``generate.sample_with_features``
    with the same capture preset) -> labels, for generation (``truth``: see ``decode``).
    """

    def __init__(self, config: ml_collections.ConfigDict, pipe: pretrained.Pipeline | None = None):
        self.config = config
        self.task = str(config.task)
        self.spec = tasks.spec_from_config(config)
        self.pipe = pipe or frozen_pipeline_for(config)
        self.sched = self.pipe.schedule
        self.t = _timestep(self.sched, config.timestep)
        self.capture = str(config.capture)
        self.num_classes = self.spec.num_classes
        # VAE-decoder maps above the latent resolution (features.vae_maps); () = the UNet's alone.
        self.vae_features = tuple(int(r) for r in config.get("vae_features", ()))
        self.uncond_ids = np.asarray(self.pipe.tokenize([""])[0], np.int32)  # (L,); SDXL (2, L)
        size = int(config.data.image_size)
        frozen = {k: self.pipe.params[k] for k in ("vae", "unet", *self.pipe.text_encoders)}
        # The decoder's input shapes: `features` on one image, traced, not run.
        feats = jax.eval_shape(self.features, frozen, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
                               jax.ShapeDtypeStruct((1, *self.uncond_ids.shape), jnp.int32), jax.random.key(0))
        decoder = tasks.build_decoder(self.spec, feature_spec(feats), config.decoder.to_dict(),
                                      rngs=nnx.Rngs(int(config.seed)))
        self.graph, params, self.rest = nnx.split(decoder, nnx.Param, ...)
        self.init_params = nnx.to_pure_dict(params)
        self.num_params = int(sum(np.size(x) for x in jax.tree.leaves(self.init_params)))
        self.tx = optax.adam(float(config.lr))
        self.base_key = jax.random.key(int(config.seed))
        self.mesh = devices.data_mesh(int(config.batch_size))  # local devices: one mesh per process
        self.repl, self.data_sharding = devices.data_shardings(self.mesh)
        self.frozen = jax.device_put(frozen, self.repl)
        # Two jits per step: the frozen SD's features, then the decoder's update. Split so the big
        # SD half is one compilation whatever the task (the persistent cache shares it between
        # trainers of equal shapes); jitted once per Trainer, so resumed runs in one process reuse it.
        self.features_fn = devices.MeshJit(self.features, self.mesh, in_shardings=(
            self.repl, self.data_sharding, self.data_sharding, self.repl))
        self._noise_key = jax.jit(lambda step: jax.random.split(jax.random.fold_in(self.base_key, step))[0])
        self._decoder_step = devices.MeshJit(self.decoder_step, self.mesh, in_shardings=(
            self.repl, self.data_sharding, self.data_sharding), out_shardings=(self.repl, self.repl))
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
        """(B,H,W,3) in [-1,1], caption ids (B,L; SDXL (B,2,L)) -> captured Features (frozen: no
        gradient). The prompt is encoded as generation encodes it (`generate.prompt_embeddings`)."""
        p = self.pipe
        mean, _ = nnx.merge(p.graphdefs["vae"], frozen["vae"]).encode(image.astype(p.dtype))
        z0 = (mean - p.shift_factor) * p.scaling_factor
        zt = schedulers.add_noise(self.sched, z0, jax.random.normal(key, z0.shape, z0.dtype), self.t)
        uncond = jnp.broadcast_to(jnp.asarray(self.uncond_ids), input_ids.shape)
        emb = generate.prompt_embeddings(p, p.prompt_encoder(frozen), input_ids, uncond, zt.shape[1:3])
        _, feats = self._unet(frozen["unet"], jnp.concatenate([zt, zt]), emb)
        if self.vae_features:  # decoded from the clean latent, as generation decodes its result
            from datasetdm_jax import features
            feats = features.add_maps(feats, self._vae_maps(frozen["vae"], mean))
        return jax.lax.stop_gradient(feats)

    def apply(self, params, feats):
        """Raw decoder output on Features (segmentation: all layers' logits and masks). The decoder
        runs in float32 whatever the frozen SD's dtype: bfloat16 features are upcast here, so the
        feature bank keeps them at half the memory."""
        feats = jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, feats)
        return nnx.merge(self.graph, params, self.rest)(feats)

    def loss(self, params, feats, batch, key):
        return tasks.task_loss(self.spec, self.apply(params, feats), batch, key)

    def decode(self, params, feats, truth=None) -> dict[str, jax.Array]:
        """Features -> labels at image resolution (see ``tasks.task_predict``; ``truth``: the true
        semantic label maps, for the grounded labels)."""
        return tasks.task_predict(self.spec, self.apply(params, feats), truth)

    def predict(self, params, frozen, batch, key) -> dict[str, jax.Array]:
        """Labels for one batch of real images with captions (semantic: grounded in their true labels too)."""
        feats = self.features(frozen, batch["image"], batch["input_ids"], key)
        return self.decode(params, feats, batch.get("segmentation"))

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
        feats = self.features_fn(frozen, batch["image"], batch["input_ids"], key)
        return self.decode_fn(params, feats, batch.get("segmentation"))

    # -- host side -------------------------------------------------------------------------------
    def host_batch(self, b: dict, step: int, augment: bool = True) -> dict:
        """Numpy batch -> the arrays this task's step needs; optional horizontal flip from (seed, step).
        A batch with source positions (``index``) also gets ``entry``: its feature-bank row."""
        out = {"image": np.asarray(b["image"], np.float32),
               "input_ids": np.asarray(self.pipe.tokenize([str(c) for c in b["caption"]]), np.int32)}
        for k in TASK_KEYS[self.task]:
            if k not in b:
                raise KeyError(f"task {self.task!r} needs batch key {k!r}; the data source gave {sorted(b)}")
            out[k] = np.asarray(b[k], BATCH_DTYPES[k])
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
