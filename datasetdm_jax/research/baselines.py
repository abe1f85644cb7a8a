"""Scratch baselines: the P-Decoder's question, "do diffusion features carry the perception?".

A plain convolutional backbone, trained from scratch together with the same task head on the
same labelled images, with the same loss, steps, optimiser and augmentation as the P-Decoder
(``datasetdm train``), scored by the same evaluator on the same test split. Only the features
differ: the backbone's own conv pyramid instead of the frozen UNet's captured maps. A config is a
train config (``configs/shapes_<task>.py``); ``config.baseline`` (optional) sets the width.

Run: ``datasetdm exp baseline --config configs/shapes_semantic.py`` (prints and writes
``<workdir>/baseline.json``, next to the P-Decoder's ``results.json``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from datasetdm_jax.decoders import feature_spec, tasks
from datasetdm_jax.features import Features
from datasetdm_jax.models.group_norm import GroupNorm

__all__ = ["ConvBackbone", "ScratchModel", "Scratch", "scratch_params", "match_width", "train_scratch", "load_params",
           "predict_split", "evaluate",
           "train_and_evaluate", "main_baseline"]
RESULTS_FILE = "baseline.json"


class ConvBackbone(nnx.Module):
    """Image (B,H,W,3) -> Features with maps at H/2, H/4, H/8, H/16 (widths w, 2w, 4w, 8w).

    Each stage: stride-2 3x3 conv, then a residual pair of 3x3 convs, GroupNorm + ReLU.
    """

    def __init__(self, width: int = 32, levels: int = 4, *, rngs: nnx.Rngs):
        convs, cin = [], 3
        for i in range(levels):
            c = width * 2 ** i
            convs.append(nnx.List([nnx.Conv(cin, c, (3, 3), strides=2, padding=1, rngs=rngs),
                                   nnx.Conv(c, c, (3, 3), padding=1, rngs=rngs),
                                   nnx.Conv(c, c, (3, 3), padding=1, rngs=rngs)]))
            cin = c
        self.stages = nnx.List(convs)
        self.norms = nnx.List([nnx.List([GroupNorm(width * 2 ** i, min(8, width * 2 ** i), rngs=rngs)
                                         for _ in range(3)]) for i in range(levels)])

    def __call__(self, image: jax.Array) -> Features:
        x, maps = image, {}
        for convs, norms in zip(self.stages, self.norms):
            x = jax.nn.relu(norms[0](convs[0](x)))
            h = jax.nn.relu(norms[1](convs[1](x)))
            x = jax.nn.relu(x + norms[2](convs[2](h)))
            maps[int(x.shape[1])] = x
        return Features(maps=maps, cross_attention={})


class ScratchModel(nnx.Module):
    """Backbone + the task's P-Decoder head (same head, same config as the P-Decoder run)."""

    def __init__(self, spec: tasks.TaskSpec, decoder_config: dict, width: int = 32, *, rngs: nnx.Rngs):
        self.backbone = ConvBackbone(width, rngs=rngs)
        shapes = jax.eval_shape(lambda: ConvBackbone(width, rngs=nnx.Rngs(0))(
            jnp.zeros((1, spec.image_size, spec.image_size, 3))))
        self.head = tasks.build_decoder(spec, feature_spec(shapes), decoder_config, rngs=rngs)

    def __call__(self, image: jax.Array):
        return self.head(self.backbone(image))


def _host_batch(task: str, b: dict, seed: int, step: int, flip: bool) -> dict:
    from datasetdm_jax.p_decoder import BATCH_DTYPES, TASK_KEYS

    out = {"image": np.asarray(b["image"], np.float32)}
    out.update({k: np.asarray(b[k], BATCH_DTYPES[k]) for k in TASK_KEYS[task]})
    if flip:  # the same flips as the P-Decoder run sees at each step
        out = tasks.flip_batch(out, np.random.default_rng([seed, step]).random(len(out["image"])) < 0.5)
    return out


def scratch_params(config: ml_collections.ConfigDict, width: int) -> int:
    """Parameter count of the ScratchModel at ``width`` (shapes only, nothing computed)."""
    spec = tasks.spec_from_config(config)
    state = jax.eval_shape(lambda: nnx.state(ScratchModel(spec, config.decoder.to_dict(), width, rngs=nnx.Rngs(0)),
                                             nnx.Param))
    return int(sum(np.size(x) for x in jax.tree.leaves(state)))


def match_width(config: ml_collections.ConfigDict, target: int, widths: Sequence[int] = (8, 16, 24, 32, 48, 64)) -> int:
    """The width in ``widths`` whose ScratchModel size is closest (in ratio) to ``target`` parameters."""
    return min(widths, key=lambda w: abs(np.log(scratch_params(config, int(w)) / max(int(target), 1))))


def input_transform(config: ml_collections.ConfigDict) -> Callable[[np.ndarray], np.ndarray] | None:
    """``baseline.vae_round_trip``: every image (in [-1, 1]) goes through the frozen SD's VAE
    (posterior mean, decoded) before the scratch model sees it, in training and in evaluation.
    A control: a scratch model that sees only what the latent keeps, as the P-Decoder does."""
    if not (config.get("baseline") or {}).get("vae_round_trip", False):
        return None
    from datasetdm_jax.train import frozen_pipeline_for

    return frozen_pipeline_for(config).vae_round_trip


class Scratch:
    """A ScratchModel for a train config, with its jitted train step, prediction and input transform."""

    def __init__(self, config: ml_collections.ConfigDict, width: int):
        self.config, self.width = config, int(width)
        self.transform = input_transform(config)
        self.spec = spec = tasks.spec_from_config(config)
        model = ScratchModel(spec, config.decoder.to_dict(), self.width, rngs=nnx.Rngs(int(config.seed)))
        graph, params, rest = nnx.split(model, nnx.Param, ...)
        self.init_params = nnx.to_pure_dict(params)
        self.num_params = int(sum(np.size(x) for x in jax.tree.leaves(self.init_params)))
        self.tx = tx = optax.adam(float(config.lr))
        base_key = jax.random.key(int(config.seed))

        def loss_fn(p, batch, key):
            return tasks.task_loss(spec, nnx.merge(graph, p, rest)(batch["image"]), batch, key)

        def step_fn(p, opt, batch, step):
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, jax.random.fold_in(base_key, step))
            updates, opt = tx.update(grads, opt, p)
            return optax.apply_updates(p, updates), opt, loss

        self.step_fn = jax.jit(step_fn)
        self.predict_fn = jax.jit(
            lambda p, image, truth=None: tasks.task_predict(spec, nnx.merge(graph, p, rest)(image), truth))


def train_scratch(config: ml_collections.ConfigDict, *, steps: int | None = None, width: int | None = None,
                  progress: bool = True) -> tuple[Scratch, Any, dict[str, float]]:
    """Trains a ScratchModel on ``config``'s labelled images with the P-Decoder's recipe.

    Returns (scratch, params, timing): ``train_s`` (wall time, compile included), ``sec_per_step``
    (steps after the first, i.e. without the compile) and ``train_cpu_s`` (this process's CPU time).
    """
    import time

    from tqdm.auto import tqdm

    from datasetdm_jax import train

    bcfg = config.get("baseline") or {}
    scratch = Scratch(config, int(width or bcfg.get("width", 32)))
    steps = int(steps or config.steps)
    seed, flip = int(config.seed), bool(config.data.flip)
    params = scratch.init_params
    opt = scratch.tx.init(params)
    it = train.train_iterator(config, None)
    t0 = t1 = time.perf_counter()
    c0 = time.process_time()
    for step in tqdm(range(steps), desc=f"baseline {scratch.spec.task}", disable=not progress, dynamic_ncols=True):
        batch = _host_batch(scratch.spec.task, next(it), seed, step, flip)
        if scratch.transform is not None:
            batch["image"] = scratch.transform(batch["image"])
        params, opt, loss = scratch.step_fn(params, opt, batch, step)
        if not np.isfinite(float(loss)):
            raise train.TrainingDiverged(f"baseline: loss is {float(loss)} at step {step + 1}")
        if step == 0:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    return scratch, params, {"train_s": t2 - t0, "sec_per_step": (t2 - t1) / max(steps - 1, 1),
                             "train_cpu_s": time.process_time() - c0}


def load_params(scratch: Scratch, path: str | os.PathLike) -> Any:
    """Parameters saved by ``flax.serialization.msgpack_serialize`` (as `datasetdm exp proof` saves them)."""
    from flax import serialization

    with open(path, "rb") as f:
        return serialization.from_state_dict(scratch.init_params, serialization.msgpack_restore(f.read()))


def predict_split(scratch: Scratch, params: Any, split: str | None = None, num: int | None = None,
                  seed: int | None = None, transform: Callable[[np.ndarray], np.ndarray] | None = None):
    """Yields (the model's labels, the source batch) over ``num`` images of ``split`` (defaults:
    ``config.eval``), in order, as ``train.predict_split``. ``transform`` maps each batch of
    images (in [-1, 1]) before the model sees them (default: the model's own, `input_transform`)."""
    from datasetdm_jax import train
    from datasetdm_jax.data import pipeline

    config, ecfg = scratch.config, scratch.config.eval
    src = train.data_source(config, str(split or ecfg.split), int(num or ecfg.num_images),
                            int(ecfg.get("seed", config.data.seed) if seed is None else seed))
    transform = transform or scratch.transform
    for b in pipeline.grain_dataset(src, int(ecfg.batch_size), None, drop_remainder=False):
        images = np.asarray(b["image"], np.float32)
        truth = b.get("segmentation") if scratch.spec.task == "semantic" else None
        yield jax.device_get(scratch.predict_fn(params, transform(images) if transform else images, truth)), b


def evaluate(scratch: Scratch, params: Any, split: str | None = None, num: int | None = None,
             seed: int | None = None, per_class: bool = False) -> dict[str, Any]:
    """The task's metrics on ``num`` images of ``split`` (defaults: ``config.eval``), as ``train.evaluate``."""
    ev = tasks.Evaluator(scratch.spec)
    for pred, b in predict_split(scratch, params, split, num, seed):
        ev.update(pred, b)
    return ev.compute(per_class=per_class)


def train_and_evaluate(config: ml_collections.ConfigDict, *, steps: int | None = None, width: int | None = None,
                       workdir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Trains a ScratchModel on ``config``'s labelled images and scores it on ``config.eval``.

    Returns the metrics plus ``params`` (count) and ``steps``; writes ``<workdir>/baseline.json``
    when ``workdir`` is given.
    """
    scratch, params, _ = train_scratch(config, steps=steps, width=width, progress=progress)
    seen = ", images through the SD's VAE first" if scratch.transform is not None else ""
    res = {"task": scratch.spec.task, "model": f"scratch conv backbone (width {scratch.width}) + the same head{seen}",
           "steps": int(steps or config.steps), "params": scratch.num_params, **evaluate(scratch, params)}
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
            json.dump(res, f, indent=2)
    return res


def main_baseline(config_path: str, workdir: str | None = None, overrides: Sequence[str] | None = None) -> dict:
    """CLI body of ``datasetdm exp baseline --config configs/shapes_<task>.py [--workdir DIR] [key=value ...]``."""
    from datasetdm_jax.config_utils import load_config

    config = load_config(config_path, overrides)
    res = train_and_evaluate(config, workdir=workdir or str(config.workdir))
    print("baseline: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    return res
