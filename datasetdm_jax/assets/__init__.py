"""Files shipped inside the package: the shapes-world Stable Diffusion (a diffusers-format folder)."""

from __future__ import annotations

import os

SHAPES_SD = os.path.join(os.path.dirname(__file__), "shapes_sd")


def shapes_sd_path() -> str:
    """The shipped shapes-world model folder; a one-line error names the command that makes it."""
    if not os.path.isfile(os.path.join(SHAPES_SD, "model_index.json")):
        raise FileNotFoundError(
            f"the shapes-world model is missing at {SHAPES_SD}; make it with "
            "`datasetdm pretrain --config configs/shapes_sd.py --workdir runs/shapes_sd` "
            f"(it exports to runs/shapes_sd/model; copy that folder to {SHAPES_SD})")
    return SHAPES_SD
