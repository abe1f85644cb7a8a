"""Train and evaluate one downstream model (segmenter or depth net) on mixed batches.

The train step is one jitted pure function of ``(params, opt state, batch)`` over a data-parallel
``('data',)`` mesh of the local devices (batch sharded, params replicated), as in ``shapes_sd/loop.py``:
AdamW with warmup + cosine decay, gradient clipping, no weight decay on biases and norm scales.
Batch preparation (sampling, augmentation) runs on the host while the previous step computes.
Evaluation uses ``datasetdm_jax.metrics``: mIoU (ignore 255) and per-class IoU; depth REL, RMSE,
delta1.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from datasetdm_jax import devices
from datasetdm_jax import metrics as mt
from datasetdm_jax.decoders.losses import silog_loss
from datasetdm_jax.downstream.data import IGNORE
from datasetdm_jax.downstream.models import build_model

__all__ = ["Trained", "train", "evaluate", "predict", "cross_entropy_ignore", "l1_log_loss", "task_loss",
           "LABEL_KEY", "lr_schedule"]

LABEL_KEY = {"semantic": "segmentation", "depth": "depth"}


def cross_entropy_ignore(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE) -> jax.Array:
    """Mean pixel cross-entropy over pixels whose label != ``ignore_index`` (0 if there are none)."""
    valid = labels != ignore_index
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                          jnp.where(valid, labels, 0))
    return jnp.sum(nll * valid) / jnp.maximum(valid.sum(), 1)


def l1_log_loss(pred: jax.Array, gt: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Mean |log pred - log gt| over valid (gt > 0) pixels."""
    valid = gt > 0
    d = jnp.log(jnp.maximum(pred, eps)) - jnp.log(jnp.where(valid, gt, 1.0))
    return jnp.sum(jnp.abs(d) * valid) / jnp.maximum(valid.sum(), 1)


def task_loss(task: str, out: jax.Array, label: jax.Array, depth_loss: str = "silog") -> jax.Array:
    if task == "semantic":
        return cross_entropy_ignore(out, label)
    if depth_loss == "silog":
        return silog_loss(out, label)
    if depth_loss == "l1log":
        return l1_log_loss(out, label)
    raise ValueError(f"depth_loss must be 'silog' or 'l1log', got {depth_loss!r}")


def lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup then cosine decay to 1% of ``cfg.lr`` over ``cfg.steps``."""
    steps = int(cfg.steps)
    warmup = min(int(cfg.warmup_steps), max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, float(cfg.lr), warmup, max(steps, warmup + 1),
                                              end_value=float(cfg.lr) * 0.01)


def _optimizer(lr, grad_clip: float, weight_decay: float, params) -> optax.GradientTransformation:
    """AdamW at learning rate ``lr`` (a traced scalar inside the step), no decay on biases / norms."""
    mask = jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.chain(optax.clip_by_global_norm(grad_clip),
                       optax.adamw(lr, weight_decay=weight_decay, mask=mask))


# Jitted steps / forwards keyed by what they close over, so rows of a comparison (same model, other
# data) and repeated calls share one compile. The learning rate is an argument, not a constant.
_STEPS: dict[tuple, Any] = {}
_FORWARDS: dict[tuple, Any] = {}


def _step_fn(graphdef, task: str, depth_loss: str, grad_clip: float, weight_decay: float,
             mesh: jax.sharding.Mesh):
    cache_key = (graphdef, task, depth_loss, grad_clip, weight_decay, tuple(mesh.devices.flat))
    if cache_key in _STEPS:
        return _STEPS[cache_key]
    key = LABEL_KEY[task]
    repl, data_sh = devices.data_shardings(mesh)

    def loss_fn(params, rest, batch):
        out = nnx.merge(graphdef, params, rest)(batch["image"])
        return task_loss(task, out, batch[key], depth_loss)

    def step(state, rest, batch, lr):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], rest, batch)
        tx = _optimizer(lr, grad_clip, weight_decay, state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

    _STEPS[cache_key] = jax.jit(step, in_shardings=(repl, repl, data_sh, repl), out_shardings=(repl, repl),
                                donate_argnums=(0,))
    return _STEPS[cache_key]


@dataclasses.dataclass
class Trained:
    """A trained downstream model: its NNX graph and params, plus what training measured."""

    task: str
    config: ml_collections.ConfigDict
    graphdef: Any
    params: Any
    rest: Any
    history: list[tuple[int, float]]
    seconds: float
    examples: int

    @property
    def img_per_s(self) -> float:
        return self.examples / max(self.seconds, 1e-9)

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, self.rest)


def _check_batch(task: str, batch: Mapping[str, np.ndarray], num_classes: int, step: int) -> None:
    key = LABEL_KEY[task]
    if key not in batch:
        raise ValueError(f"task {task!r}: training batches have no '{key}' (keys: {sorted(batch)})")
    if task == "semantic":
        lab = batch[key]
        bad = (lab != IGNORE) & ((lab < 0) | (lab >= num_classes))
        if bad.any():
            raise ValueError(f"step {step}: segmentation labels {np.unique(lab[bad])[:5].tolist()} are outside "
                             f"[0, {num_classes}) and not {IGNORE}")


def train(cfg: ml_collections.ConfigDict, batches: Iterator[Mapping[str, np.ndarray]], *,
          progress: bool = True, desc: str | None = None) -> Trained:
    """Train ``cfg.task`` for ``cfg.steps`` steps on ``batches`` (e.g. a ``MixedBatches``).

    ``cfg``: task, num_classes, model (kwargs of the model class), steps, lr, weight_decay,
    warmup_steps, grad_clip, seed, log_every, depth_loss.
    """
    from tqdm.auto import tqdm

    task = str(cfg.task)
    if task not in LABEL_KEY:
        raise ValueError(f"task must be 'semantic' or 'depth', got {task!r}")
    model = build_model(task, cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else cfg.model,
                        int(cfg.num_classes), int(cfg.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = devices.data_mesh(int(cfg.batch_size))
    repl, data_sh = devices.data_shardings(mesh)
    grad_clip, weight_decay = float(cfg.grad_clip), float(cfg.weight_decay)
    opt = _optimizer(0.0, grad_clip, weight_decay, params).init(params)
    state = jax.device_put({"params": params, "opt": opt}, repl)
    rest = jax.device_put(rest, repl)
    key = LABEL_KEY[task]
    step_jit = _step_fn(graphdef, task, str(cfg.get("depth_loss", "silog")), grad_clip, weight_decay, mesh)
    schedule = lr_schedule(cfg)
    steps, log_every = int(cfg.steps), max(1, int(cfg.log_every))
    history: list[tuple[int, float]] = []
    pending: list[tuple[int, jax.Array]] = []
    examples, t0, t_first = 0, time.time(), None
    bar = tqdm(total=steps, desc=desc or f"downstream {task}", disable=not progress, dynamic_ncols=True,
               leave=False)
    for step in range(steps):
        b = next(batches)
        _check_batch(task, b, int(cfg.num_classes), step)
        if len(b["image"]) % mesh.size:
            raise ValueError(f"batch size {len(b['image'])} is not divisible by {mesh.size} devices")
        batch = jax.device_put({"image": b["image"], key: b[key]}, data_sh)
        state, loss = step_jit(state, rest, batch, np.float32(schedule(step)))
        pending.append((step, loss))
        if step == 0:  # the first step compiles: time from the second on
            jax.block_until_ready(loss)
            t_first = time.time()
        else:
            examples += len(b["image"])
        if (step + 1) % log_every == 0 or step + 1 == steps:
            vals = jax.device_get([v for _, v in pending])
            for (s, _), v in zip(pending, vals):
                if not np.isfinite(v):
                    raise FloatingPointError(f"downstream {task}: loss is {v} at step {s}")
                history.append((s, float(v)))
            pending = []
            bar.set_postfix(loss=f"{history[-1][1]:.4f}")
        bar.update(1)
    jax.block_until_ready(state)
    bar.close()
    seconds = time.time() - (t_first if t_first is not None else t0)
    return Trained(task, cfg, graphdef, state["params"], rest, history, seconds if steps > 1 else 0.0, examples)


def predict(trained: Trained, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Predictions for uint8 (N, H, W, 3) images: class ids (N, H, W) int32 or depth (N, H, W) float32.

    Fixed batch shape (the last batch padded), so there is one compile per image size.
    """
    n = jax.local_device_count()
    bs = max(n, -(-int(batch_size) // n) * n)
    mesh = devices.data_mesh(bs)
    _, data_sh = devices.data_shardings(mesh)
    task, graphdef = trained.task, trained.graphdef
    if (graphdef, task) not in _FORWARDS:
        def forward(params, rest, x):
            out = nnx.merge(graphdef, params, rest)(x)
            return jnp.argmax(out, axis=-1).astype(jnp.int32) if task == "semantic" else out

        _FORWARDS[(graphdef, task)] = jax.jit(forward)
    fwd = _FORWARDS[(graphdef, task)]

    outs = []
    for i in range(0, len(images), bs):
        x = images[i:i + bs].astype(np.float32) / 127.5 - 1.0
        n = len(x)
        if n < bs:
            x = np.concatenate([x, np.zeros((bs - n,) + x.shape[1:], x.dtype)])
        outs.append(np.asarray(fwd(trained.params, trained.rest, jax.device_put(x, data_sh)))[:n])
    return np.concatenate(outs)


def evaluate(trained: Trained, test: Mapping[str, np.ndarray], batch_size: int = 32,
             min_depth: float = 1e-3, max_depth: float | None = None) -> dict[str, Any]:
    """Metrics on a labelled test set: semantic -> miou, per_class_iou (NaN for absent classes),
    pixel_acc; depth -> rel, rmse, delta1 (``metrics.depth_metrics``)."""
    key = LABEL_KEY[trained.task]
    if key not in test:
        raise ValueError(f"test set has no '{key}' for task {trained.task!r}")
    pred = predict(trained, np.asarray(test["image"]), batch_size)
    if trained.task == "semantic":
        num_classes = int(trained.config.num_classes)
        cm = mt.confusion_matrix(pred, test[key], num_classes, IGNORE)
        miou, per_class = mt.iou_from_confusion(cm)
        return {"miou": miou, "per_class_iou": per_class.tolist(),
                "pixel_acc": float(np.trace(cm) / max(cm.sum(), 1))}
    return mt.depth_metrics(pred, test[key], min_depth=min_depth, max_depth=max_depth)
