"""How well can depth be predicted at all in the shapes world? An oracle's REL / RMSE / delta1.

The oracle knows each object's true size (apparent size follows 1/depth, so the object's depth up
to the +-10 % jitter the world draws) and guesses the background plane from the row alone (its
near and far ends are drawn per scene and are not visible in the image). Capping its output at a
depth head's ``max_depth`` shows what that range costs. ``--proof DIR`` (a `datasetdm exp proof` depth
row folder, e.g. runs/proof/depth) also splits the REL of its trained P-Decoder and scratch model by
region: the band around object outlines, object interiors, background interiors; and the scratch
model once more on the test images after a round trip through the SD's VAE (posterior mean,
decoded): the detail the P-Decoder's latent-derived features can carry at most. Run:

    python -m datasetdm_jax.research.shapes_depth_floor [NUM_IMAGES] [CAP ...] [--proof DIR]
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np

from datasetdm_jax.data import shapes
from datasetdm_jax.metrics import depth_metrics


def oracle_depth(scene: dict) -> np.ndarray:
    """The best per-pixel depth guess from what the image shows (object sizes, pixel rows)."""
    size = scene["depth"].shape[0]
    rows = (np.arange(size, dtype=np.float32) + 0.5) / size
    near, far = np.mean(shapes.BACKGROUND_NEAR), np.mean(shapes.BACKGROUND_FAR)
    background = np.broadcast_to((far - (far - near) * rows)[:, None], (size, size))
    # 0.9 / size-fraction is the depth the world draws before its jitter (shapes._sample_layout).
    lut = np.array([0.0] + [np.clip(0.9 * size / o["radius"], shapes.MIN_DEPTH, shapes.MAX_DEPTH)
                            for o in scene["objects"]], np.float32)
    return np.where(scene["instance_map"] > 0, lut[scene["instance_map"]], background)


def depth_floor(num_images: int = 256, caps: Sequence[float] = (), split: str = "test") -> dict[str, dict[str, float]]:
    """Oracle depth metrics on ``split``, uncapped and with predictions capped at each of ``caps``."""
    source = shapes.make_split(split, num_images)
    scenes = [source[i] for i in range(num_images)]
    pred = np.stack([oracle_depth(s) for s in scenes])
    gt = np.stack([s["depth"] for s in scenes])
    out = {"uncapped": depth_metrics(pred, gt)}
    for cap in caps:
        out[f"capped at {cap:g}"] = depth_metrics(np.minimum(pred, cap), gt)
    return out


def regions(instance_map: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks (N,H,W): 'edge' = the 2 px on either side of a change of instance id
    (outlines, where a coarse prediction blurs), 'object' and 'background' = the rest of each."""
    from scipy import ndimage

    edge = np.stack([ndimage.binary_dilation(ndimage.morphological_gradient(m, size=3) > 0) for m in instance_map])
    return {"edge": edge, "object": (instance_map > 0) & ~edge, "background": (instance_map == 0) & ~edge}


def rel_by_region(pred: np.ndarray, gt: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per region of ``masks`` (`regions`): its pixel share, its REL, and its share of the whole
    image's REL (the parts sum to it)."""
    err = np.abs(pred - gt) / gt
    return {name: {"share": float(m.mean()), "rel": float(err[m].mean()), "of_total": float(err[m].sum() / err.size)}
            for name, m in masks.items()}


def _proof_predictions(row_dir: str, num_images: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The test-split depth predictions of a proof row's P-Decoder and scratch model, with gt and ids."""
    import json
    from pathlib import Path

    from datasetdm_jax import train
    from datasetdm_jax.research import baselines

    trainer, params, _ = train.load_trained_decoder(str(Path(row_dir, "p_decoder")))
    cfg = trainer.config
    seed = int(cfg.eval.get("seed", cfg.data.seed))
    preds, gts, ids = [], [], []
    for pred, b in train.predict_split(trainer, params, "test", num_images, seed, int(cfg.eval.batch_size)):
        preds.append(pred["depth"]), gts.append(np.asarray(b["depth"])), ids.append(np.asarray(b["instance_map"]))
    width = int(json.loads(Path(row_dir, "scratch", "trained.json").read_text())["key"]["width"])
    scratch = baselines.Scratch(cfg, width)
    sp = baselines.load_params(scratch, Path(row_dir, "scratch", "params.msgpack"))
    sc = [pred["depth"] for pred, _ in baselines.predict_split(scratch, sp, "test", num_images, seed)]
    rt = [pred["depth"] for pred, _ in baselines.predict_split(
        scratch, sp, "test", num_images, seed, transform=trainer.pipe.vae_round_trip)]
    return ({"P-Decoder": np.concatenate(preds), "scratch": np.concatenate(sc),
             "scratch, VAE round trip": np.concatenate(rt)}, np.concatenate(gts), np.concatenate(ids))


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    proof = None
    if "--proof" in args:
        i = args.index("--proof")
        proof, args = args[i + 1], args[:i] + args[i + 2:]
    num = int(args[0]) if args else 256
    caps = [float(a) for a in args[1:]] or [10.0]
    for name, m in depth_floor(num, caps).items():
        print(f"oracle, {name:>14}: REL {m['rel']:.3f}  RMSE {m['rmse']:.3f}  delta1 {100 * m['delta1']:.1f}%")
    if proof:
        models, gt, ids = _proof_predictions(proof, num)
        source = shapes.make_split("test", num)
        models = {"oracle": np.stack([oracle_depth(source[i]) for i in range(num)]), **models}
        masks = regions(ids)
        print("| model | region | pixel share | REL there | part of the total REL |\n|---|---|---|---|---|")
        for model, pred in models.items():
            for region, r in rel_by_region(pred, gt, masks).items():
                print(f"| {model} | {region} | {r['share']:.3f} | {r['rel']:.3f} | {r['of_total']:.4f} |")


if __name__ == "__main__":
    main()
