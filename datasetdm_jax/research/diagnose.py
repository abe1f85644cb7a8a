"""`datasetdm exp diagnose`: where the value of the synthetic data goes (run after `datasetdm demo`).

The demo's downstream segmenter (same settings and steps) is trained on the 100 labelled real
images plus N more, N the generated set's size, from three pools:

- ``real_ground_truth``: N real images of the full distribution (the shapes world's ``pretrain``
  split, the generator's unlabelled corpus) with exact labels: what N more labelled images are
  worth to this model at all (the ceiling of the method);
- ``real_p_decoder``: the same images labelled by the demo's trained P-Decoder: what its label
  errors cost;
- ``generated``: the demo's generated images with their P-Decoder labels: the remaining gap to the
  row above is the generated images' own (fidelity, diversity).

Each pool is scored alone and mixed with the real images (the demo's rows (b) and (c)) on the real
test and domain-shifted splits, beside the real-only row (a); also the P-Decoder's mIoU on the real
pool against its truth.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

POOL_SPLIT = "pretrain"
POOLS = ("real_ground_truth", "real_p_decoder", "generated")
RESULT_FILE = "diagnosis.json"


def label_real_pool(decoder_config: ml_collections.ConfigDict, num: int, *, pipe=None, seed: int = 0,
                    batch_size: int = 16, progress: bool = True) -> tuple[dict, dict, dict[str, Any]]:
    """``num`` real images of the pool split: (ground-truth arrays, the same images with the trained
    semantic P-Decoder's labels, the decoder's metrics on them)."""
    from tqdm.auto import tqdm

    from datasetdm_jax import train
    from datasetdm_jax.decoders import tasks

    trainer, params, _ = train.load_trained_decoder(decoder_config, pipe=pipe)
    if trainer.task != "semantic":
        raise ValueError(f"diagnose labels the pool with a semantic P-Decoder, got task {trainer.task!r}")
    images, truth, labels, confidence = [], [], [], []
    ev = tasks.Evaluator(trainer.spec)
    batches = train.predict_split(trainer, params, POOL_SPLIT, num, seed, batch_size)
    for pred, b in tqdm(batches, desc="P-Decoder labels on real images", total=-(-num // batch_size),
                        disable=not progress):
        images.append(np.round((np.asarray(b["image"]) + 1) * 127.5).astype(np.uint8))  # grain gives [-1, 1]
        truth.append(np.asarray(b["segmentation"], np.uint8))
        labels.append(np.asarray(pred["segmentation"], np.uint8))
        confidence.append(np.asarray(pred["confidence"], np.float32))
        ev.update(pred, b)
    images, truth, labels = np.concatenate(images), np.concatenate(truth), np.concatenate(labels)
    errors = {**ev.compute(per_class=True), **label_errors(labels, truth, np.concatenate(confidence))}
    mask_size = images.shape[1] // trainer.pipe.vae_scale_factor  # the finest UNet feature map's
    errors["mask_size"] = mask_size
    errors["mask_size_ceiling_miou"] = resolution_ceiling(truth, mask_size, trainer.spec.num_classes)
    return {"image": images, "segmentation": truth}, {"image": images, "segmentation": labels}, errors


def label_errors(labels: np.ndarray, truth: np.ndarray, confidence: np.ndarray,
                 low_fraction: float = 0.1) -> dict[str, float]:
    """Where the labels go wrong: accuracy on foreground pixels, and whether confidence separates right
    from wrong ones (the ``low_fraction`` least confident pixels: their share of the foreground and
    their foreground accuracy, against the rest's)."""
    fg = truth > 0
    right = labels == truth
    low = confidence < np.quantile(confidence, low_fraction)
    return {"foreground_accuracy": float(right[fg].mean()), "low_confidence_fraction": low_fraction,
            "foreground_share_low_confidence": float((low & fg).sum() / max(fg.sum(), 1)),
            "foreground_accuracy_low_confidence": float(right[low & fg].mean()) if (low & fg).any() else float("nan"),
            "foreground_accuracy_other": float(right[~low & fg].mean()) if (~low & fg).any() else float("nan")}


def resolution_ceiling(truth: np.ndarray, size: int, num_classes: int) -> float:
    """mIoU of perfect labels at ``size`` x ``size`` (per-class area fractions), upsampled bilinearly
    and arg-maxed: the best a decoder whose masks live at that resolution can score."""
    import jax
    import jax.numpy as jnp

    from datasetdm_jax import metrics

    n, h, w = truth.shape
    if h % size or w % size:
        raise ValueError(f"label size {h}x{w} is not a multiple of the mask size {size}")
    onehot = np.eye(num_classes, dtype=np.float32)[np.minimum(truth, num_classes - 1)]
    low = onehot.reshape(n, size, h // size, size, w // size, num_classes).mean((2, 4))
    up = jax.image.resize(jnp.asarray(low), (n, h, w, num_classes), "bilinear")
    m = metrics.MeanIoU(num_classes)
    m.update(np.asarray(up.argmax(-1)), truth)
    return float(m.compute()[0])


def compare_pools(real: Mapping[str, np.ndarray], pools: Mapping[str, Mapping[str, np.ndarray]],
                  tests: Mapping[str, Mapping[str, np.ndarray]], downstream: ml_collections.ConfigDict,
                  *, progress: bool = True) -> dict[str, Any]:
    """Semantic rows per pool: ``{"real": {split: miou}, pool: {"pool": {split: miou},
    "real+pool": {split: miou}}}`` (the real-only row is trained once)."""
    from datasetdm_jax.downstream import compare

    cfg = ml_collections.ConfigDict(downstream.to_dict())
    cfg.tasks = ("semantic",)
    out: dict[str, Any] = {}
    for i, (name, pool) in enumerate(pools.items()):
        cfg.rows = (("real",) if i == 0 else ()) + ("synthetic", "real+synthetic")
        res = compare.run_comparison(real, pool, tests, cfg, progress=progress)["semantic"]
        score = lambda row: {s: float(res[row][s]["miou"]) for s in tests}  # noqa: E731
        if i == 0:
            out["real"] = score("real")
        out[name] = {"pool": score("synthetic"), "real+pool": score("real+synthetic")}
    return out


def format_table(result: Mapping[str, Any]) -> str:
    splits = list(result["real"])
    n = result["num_pool"]
    head = "  ".join(f"{s:>12}" for s in splits)
    lines = [f"{'training data (mIoU %)':<44}{head}",
             f"{'(a) 100 real':<44}" + "  ".join(f"{100 * result['real'][s]:>12.1f}" for s in splits)]
    names = {"real_ground_truth": f"{n} real, ground truth", "real_p_decoder": f"{n} real, P-Decoder labels",
             "generated": f"{n} generated, P-Decoder labels"}
    for key in ("pool", "real+pool"):
        for pool in POOLS:
            label = names[pool] if key == "pool" else f"100 real + {names[pool]}"
            lines.append(f"{label:<44}" + "  ".join(f"{100 * result[pool][key][s]:>12.1f}" for s in splits))
    e = result["p_decoder_on_pool"]
    lines.append(f"P-Decoder labels on the {n} real images: mIoU {100 * e['miou']:.1f} against their ground truth")
    if "foreground_accuracy" in e:
        low = 100 * e["low_confidence_fraction"]
        lines += [f"  foreground pixels right: {100 * e['foreground_accuracy']:.1f}%; the {low:.0f}% least confident "
                  f"pixels hold {100 * e['foreground_share_low_confidence']:.0f}% of the foreground, right "
                  f"{100 * e['foreground_accuracy_low_confidence']:.1f}% (the others "
                  f"{100 * e['foreground_accuracy_other']:.1f}%)",
                  f"  perfect masks at the decoder's {e['mask_size']}x{e['mask_size']} resolution would score "
                  f"mIoU {100 * e['mask_size_ceiling_miou']:.1f}"]
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, *, progress: bool = True) -> dict[str, Any]:
    """The diagnosis for a finished demo (``config``: the demo's config); writes ``diagnosis.json``."""
    import jax.numpy as jnp

    from datasetdm_jax import assets, demo, pretrained
    from datasetdm_jax.downstream import data

    workdir = str(config.workdir)
    synthetic_dir = os.path.join(workdir, "synthetic")
    if not os.path.isfile(os.path.join(synthetic_dir, "manifest.json")):
        raise FileNotFoundError(f"no generated dataset in {synthetic_dir}; run `datasetdm demo` with this config first")
    model = str(config.model) or assets.shapes_sd_path()
    pipe = pretrained.load_pipeline(model, dtype=jnp.float32)
    decoder_cfg = demo.decoder_configs(config, workdir, model)["semantic"]
    d = config.downstream
    ds = demo.downstream_config(config)
    generated = data.records_arrays(synthetic_dir, progress=progress)
    generated = {k: generated[k] for k in ("image", "segmentation")}
    n = len(generated["image"])
    truth, labelled, decoder_metrics = label_real_pool(decoder_cfg, n, pipe=pipe, progress=progress,
                                                       batch_size=int(config.generate.batch_size))
    real = data.shapes_arrays(ds.real.split, int(ds.real.num_images), int(ds.real.seed), int(ds.real.image_size))
    tests = {s: data.shapes_arrays(s, int(d.test_images), int(ds.test.seed), int(ds.test.image_size))
             for s in ds.test.splits}
    pools = {"real_ground_truth": truth, "real_p_decoder": labelled, "generated": generated}
    result = {"num_real": len(real["image"]), "num_pool": n, "pool_split": POOL_SPLIT,
              "p_decoder_on_pool": decoder_metrics, **compare_pools(real, pools, tests, ds, progress=progress)}
    Path(workdir, RESULT_FILE).write_text(json.dumps(result, indent=1, default=float))
    return result


def main_diagnose(config_path: str | None = None, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI body of ``datasetdm exp diagnose [--config configs/shapes_demo.py[:small]] [key=value ...]``."""
    from datasetdm_jax import demo
    from datasetdm_jax.config_utils import load_config

    config = load_config(config_path or os.path.join(demo.CONFIGS_DIR, "shapes_demo.py"), overrides)
    result = run(config)
    print(format_table(result))
    print(f"report: {os.path.join(str(config.workdir), RESULT_FILE)}")
    return result
