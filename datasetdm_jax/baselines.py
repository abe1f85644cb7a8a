"""Scratch baselines: the P-Decoder's question, "do diffusion features carry the perception?".

A plain convolutional backbone, trained from scratch together with the same task head on the
same labelled images, with the same loss, steps, optimiser and augmentation as the P-Decoder
(``datasetdm train``), scored by the same evaluator on the same test split. Only the features
differ: the backbone's own conv pyramid instead of the frozen UNet's captured maps. A config is a
train config (``configs/shapes_<task>.py``); ``config.baseline`` (optional) sets the width.

Run: ``datasetdm baseline --config configs/shapes_semantic.py`` (prints and writes
``<workdir>/baseline.json``, next to the P-Decoder's ``results.json``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from datasetdm_jax.decoders import feature_spec, tasks
from datasetdm_jax.features import Features

__all__ = ["ConvBackbone", "ScratchModel", "train_and_evaluate", "main_baseline"]
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
        self.norms = nnx.List([nnx.List([nnx.GroupNorm(width * 2 ** i, num_groups=min(8, width * 2 ** i), rngs=rngs)
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
    from datasetdm_jax.train import _DTYPES, TASK_KEYS

    out = {"image": np.asarray(b["image"], np.float32)}
    out.update({k: np.asarray(b[k], _DTYPES[k]) for k in TASK_KEYS[task]})
    if flip:  # the same flips as the P-Decoder run sees at each step
        out = tasks.flip_batch(out, np.random.default_rng([seed, step]).random(len(out["image"])) < 0.5)
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, *, steps: int | None = None, width: int | None = None,
                       workdir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Trains a ScratchModel on ``config``'s labelled images and scores it on ``config.eval``.

    Returns the metrics plus ``params`` (count) and ``steps``; writes ``<workdir>/baseline.json``
    when ``workdir`` is given.
    """
    from tqdm.auto import tqdm

    from datasetdm_jax import train
    from datasetdm_jax.data import pipeline

    spec = tasks.spec_from_config(config)
    bcfg = config.get("baseline") or {}
    width = int(width or bcfg.get("width", 32))
    steps = int(steps or config.steps)
    seed = int(config.seed)
    model = ScratchModel(spec, config.decoder.to_dict(), width, rngs=nnx.Rngs(seed))
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tx = optax.adam(float(config.lr))
    base_key = jax.random.key(seed)

    def loss_fn(p, batch, key):
        return tasks.task_loss(spec, nnx.merge(graph, p, rest)(batch["image"]), batch, key)

    @jax.jit
    def step_fn(p, opt, batch, step):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, jax.random.fold_in(base_key, step))
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    @jax.jit
    def predict_fn(p, image):
        return tasks.task_predict(spec, nnx.merge(graph, p, rest)(image))

    opt = tx.init(params)
    it = train._train_iterator(config, None)
    flip = bool(config.data.flip)
    for step in tqdm(range(steps), desc=f"baseline {spec.task}", disable=not progress, dynamic_ncols=True):
        batch = _host_batch(spec.task, next(it), seed, step, flip)
        params, opt, loss = step_fn(params, opt, batch, step)
        if not np.isfinite(float(loss)):
            raise train.TrainingDiverged(f"baseline: loss is {float(loss)} at step {step + 1}")
    ecfg = config.eval
    src = train.data_source(config, str(ecfg.split), int(ecfg.num_images), int(ecfg.get("seed", config.data.seed)))
    ev = tasks.Evaluator(spec)
    for b in pipeline.grain_dataset(src, int(ecfg.batch_size), None, drop_remainder=False):
        ev.update(jax.device_get(predict_fn(params, np.asarray(b["image"], np.float32))), b)
    res = {"task": spec.task, "model": f"scratch conv backbone (width {width}) + the same head", "steps": steps,
           "params": int(sum(np.size(x) for x in jax.tree.leaves(params))), **ev.compute()}
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
            json.dump(res, f, indent=2)
    return res


def main_baseline(config_path: str, workdir: str | None = None, overrides: Sequence[str] | None = None) -> dict:
    """CLI body of ``datasetdm baseline --config configs/shapes_<task>.py [--workdir DIR] [key=value ...]``."""
    from datasetdm_jax.config_utils import load_config

    config = load_config(config_path, overrides)
    res = train_and_evaluate(config, workdir=workdir or str(config.workdir))
    print("baseline: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    return res
