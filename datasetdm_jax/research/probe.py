"""The premise check: do the frozen UNet's features carry the perception?

A 1x1-conv (per-pixel linear) head is trained on the captured UNet features of 100 labelled real
shapes-world images and compared with a small U-Net trained from scratch on the same 100 images,
both evaluated on the full test split by mIoU and per-class IoU (background IoU alone flatters).

A 1x1 conv on bilinearly upsampled, per-channel-normalised features equals the sum over
resolutions of the upsampled per-resolution 1x1 convs, so the head runs at each feature map's own
resolution and only the logits are upsampled: cheap enough to train on every pixel.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from datasetdm_jax import metrics, pretrained, schedulers
from datasetdm_jax.data import shapes

__all__ = ["extract_features", "train_linear_probe", "predict_linear_probe", "run_probe", "main_probe"]


def _scenes(split: str, num: int, seed: int, image_size: int) -> dict[str, np.ndarray]:
    src = shapes.make_split(split, num, seed=seed, config=shapes.ShapesConfig(image_size=image_size))
    items = [src[i] for i in range(num)]
    return {"image": np.stack([s["image"] for s in items]), "semantic": np.stack([s["segmentation"] for s in items]),
            "caption": [s["caption"] for s in items]}


def extract_features(pipe: pretrained.Pipeline, images: np.ndarray, captions: Sequence[str], *,
                     timestep: int = 1, capture: str = "datasetdm", batch: int = 16, seed: int = 0
                     ) -> dict[int, np.ndarray]:
    """uint8 NHWC images + captions -> {res: (N, res, res, C)} float32 features (maps and
    head-averaged cross-attention), from one UNet pass at ``timestep`` with the true caption."""
    out: dict[int, list[np.ndarray]] = {}
    uncond = pipe.encode_prompt([""])
    for a in range(0, len(images), batch):
        x = images[a:a + batch].astype(np.float32) / 127.5 - 1.0
        n = len(x)
        z0 = pipe.vae_encode(x)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), a)
        zt = schedulers.add_noise(pipe.schedule, z0, jax.random.normal(key, z0.shape, z0.dtype), timestep)
        emb = jnp.concatenate([jnp.broadcast_to(uncond, (n,) + uncond.shape[1:]),
                               pipe.encode_prompt(list(captions[a:a + n]))])
        _, feats = pipe.unet_apply(jnp.concatenate([zt, zt]), timestep, emb, capture=capture)
        for res, m in feats.maps.items():
            parts = [np.asarray(m, np.float32)]
            if res in feats.cross_attention:
                att = np.asarray(feats.cross_attention[res], np.float32)  # (n, r, r, L*H, tokens)
                parts.append(att.mean(axis=3))
            out.setdefault(int(res), []).append(np.concatenate(parts, axis=-1))
    return {r: np.concatenate(v) for r, v in out.items()}


def _normalise(train: dict[int, np.ndarray], *others: dict[int, np.ndarray]):
    """Per-channel standardisation with the training set's statistics."""
    stats = {r: (f.mean(axis=(0, 1, 2)), f.std(axis=(0, 1, 2)) + 1e-5) for r, f in train.items()}
    return [{r: (f[r] - stats[r][0]) / stats[r][1] for r in f} for f in (train, *others)]


def _probe_logits(params: dict, feats: dict[int, jax.Array], size: int) -> jax.Array:
    logits = params["b"]
    for r, f in feats.items():
        y = jnp.einsum("nhwc,ck->nhwk", f, params[f"w{r}"])
        logits = logits + jax.image.resize(y, (y.shape[0], size, size, y.shape[-1]), "bilinear")
    return logits


def train_linear_probe(feats: dict[int, np.ndarray], labels: np.ndarray, num_classes: int, *,
                       steps: int = 600, lr: float = 1e-2, weight_decay: float = 1e-4, batch: int = 20,
                       seed: int = 0) -> dict:
    """Per-pixel softmax regression (a 1x1 conv) on multi-resolution features, AdamW, full pixels."""
    size = labels.shape[1]
    key = jax.random.PRNGKey(seed)
    params = {"b": jnp.zeros((num_classes,))}
    for r, f in feats.items():
        key, k = jax.random.split(key)
        params[f"w{r}"] = 0.01 * jax.random.normal(k, (f.shape[-1], num_classes))
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, fb, yb):
        def loss_fn(p):
            logits = _probe_logits(p, fb, size)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    n = len(labels)
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(steps), desc="linear probe", leave=False):
        idx = rng.choice(n, size=min(batch, n), replace=False)
        params, opt, _ = step(params, opt, {r: jnp.asarray(f[idx]) for r, f in feats.items()},
                              jnp.asarray(labels[idx].astype(np.int32)))
    return params


def predict_linear_probe(params: dict, feats: dict[int, np.ndarray], size: int, batch: int = 50,
                         allowed: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel argmax; ``allowed`` (bool per class) rules out classes the labels never showed."""
    mask = jnp.zeros(params["b"].shape) if allowed is None else jnp.where(jnp.asarray(allowed), 0.0, -jnp.inf)
    fn = jax.jit(lambda p, f: jnp.argmax(_probe_logits(p, f, size) + mask, -1))
    n = len(next(iter(feats.values())))
    return np.concatenate([np.asarray(fn(params, {r: jnp.asarray(f[a:a + batch]) for r, f in feats.items()}))
                           for a in range(0, n, batch)])


def _iou_report(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> dict[str, Any]:
    miou, per = metrics.iou_from_confusion(metrics.confusion_matrix(pred, gt, num_classes))
    return {"miou": float(miou), "per_class": {shapes.CLASSES[k]: float(v) for k, v in enumerate(per)}}


def _scratch_config(steps: int, image_size: int, seed: int):
    """The downstream DeepLab-style segmenter (configs/downstream_shapes.py), real rows only."""
    from datasetdm_jax.config_utils import load_config
    from datasetdm_jax.demo import CONFIGS_DIR

    cfg = load_config(os.path.join(CONFIGS_DIR, "downstream_shapes.py"))
    cfg.tasks, cfg.rows = ("semantic",), ("real",)
    cfg.semantic.steps, cfg.semantic.seed = int(steps), int(seed)
    cfg.augment.crop = (image_size, image_size)
    return cfg


def run_probe(model: str | pretrained.Pipeline, *, num_train: int = 100, num_test: int = 500,
              image_size: int = 64, probe_steps: int = 600, scratch_steps: int = 600, seed: int = 0,
              capture: str = "datasetdm", timestep: int = 1) -> dict[str, Any]:
    """Linear probe on frozen UNet features vs a scratch segmenter, same 100 labelled images."""
    from datasetdm_jax.downstream import compare

    pipe = model if isinstance(model, pretrained.Pipeline) else pretrained.load_pipeline(model)
    k = len(shapes.CLASSES)
    train = _scenes("train_labelled", num_train, seed, image_size)
    test = _scenes("test", num_test, seed, image_size)
    t0 = time.time()
    f_train = extract_features(pipe, train["image"], train["caption"], timestep=timestep, capture=capture)
    f_test = extract_features(pipe, test["image"], test["caption"], timestep=timestep, capture=capture)
    f_train, f_test = _normalise(f_train, f_test)
    t1 = time.time()
    params = train_linear_probe(f_train, train["semantic"], k, steps=probe_steps, seed=seed)
    seen = np.bincount(train["semantic"].ravel(), minlength=k)[:k] > 0
    probe = _iou_report(predict_linear_probe(params, f_test, image_size, allowed=seen), test["semantic"], k)
    t2 = time.time()
    scratch_cfg = _scratch_config(scratch_steps, image_size, seed)
    res = compare.run_comparison({"image": train["image"], "segmentation": train["semantic"]}, None,
                                 {"test": {"image": test["image"], "segmentation": test["semantic"]}}, scratch_cfg)
    sem = res["semantic"]["real"]["test"]
    scratch = {"miou": float(sem["miou"]),
               "per_class": {shapes.CLASSES[c]: float(v) for c, v in enumerate(sem["per_class_iou"])}}
    t3 = time.time()
    return {
        "probe": {**probe, "feature_channels": {int(r): int(f.shape[-1]) for r, f in f_train.items()},
                  "extract_s": t1 - t0, "train_s": t2 - t1},
        "scratch": {**scratch, "train_s": t3 - t2},
        "settings": {"num_train": num_train, "num_test": num_test, "probe_steps": probe_steps,
                     "scratch_steps": scratch_steps, "capture": capture, "timestep": timestep, "seed": seed},
    }


def main_probe(model: str | None, out: str, **kwargs: Any) -> dict[str, Any]:
    """`datasetdm exp probe`: run, print a per-class table, write probe.json."""
    from datasetdm_jax import assets

    model = model or assets.shapes_sd_path()
    report = run_probe(model, **kwargs)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "probe.json").write_text(json.dumps(report, indent=2))
    # Classes absent from the test split (NaN IoU in both) are left out of the table.
    names = [n for n in report["probe"]["per_class"]
             if any(np.isfinite(report[k]["per_class"][n]) for k in ("probe", "scratch"))]
    print("| method | mIoU | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for key, label in (("probe", "1x1 conv on frozen UNet features"), ("scratch", "small U-Net from scratch")):
        r = report[key]
        print(f"| {label} | {r['miou']:.3f} | " + " | ".join(f"{r['per_class'][n]:.3f}" for n in names) + " |")
    return report
