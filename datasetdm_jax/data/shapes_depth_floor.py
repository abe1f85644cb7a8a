"""How well can depth be predicted at all in the shapes world? An oracle's REL / RMSE / delta1.

The oracle knows each object's true size (apparent size follows 1/depth, so the object's depth up
to the +-10 % jitter the world draws) and guesses the background plane from the row alone (its
near and far ends are drawn per scene and are not visible in the image). Capping its output at a
depth head's ``max_depth`` shows what that range costs. Run:

    python -m datasetdm_jax.data.shapes_depth_floor [NUM_IMAGES] [CAP ...]
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


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    num = int(args[0]) if args else 256
    caps = [float(a) for a in args[1:]] or [10.0]
    for name, m in depth_floor(num, caps).items():
        print(f"oracle, {name:>14}: REL {m['rel']:.3f}  RMSE {m['rmse']:.3f}  delta1 {100 * m['delta1']:.1f}%")


if __name__ == "__main__":
    main()
