"""``datasetdm pretrain``: every stage in ``config.stages`` in order, then the export."""

from __future__ import annotations

import os
import time
from typing import Sequence

import ml_collections

from datasetdm_jax.config_utils import load_config
from datasetdm_jax.shapes_sd import loop as sd_loop
from datasetdm_jax.shapes_sd import vae_stages as sd_vae
from datasetdm_jax.shapes_sd import diffusion as sd_diffusion
from datasetdm_jax.shapes_sd import export as sd_export
from datasetdm_jax.shapes_sd import curves
from datasetdm_jax.training_state import METRICS_FILE

__all__ = ["run", "main_pretrain"]


def run(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Run (or resume) every stage in ``config.stages``, then export. Returns True when all stages
    are complete, False when stopped early by ``config.max_seconds``, ``config.max_steps`` or
    SIGTERM (rerun the same command to go on)."""
    if int(config.diffusion.fidelity_every) > 0 and not os.path.isfile(str(config.diffusion.fidelity_judge)):
        raise ValueError(f"diffusion.fidelity_every > 0 needs diffusion.fidelity_judge, a judge file (got "
                         f"{str(config.diffusion.fidelity_judge)!r}; `datasetdm exp fidelity --model DIR --judge train "
                         "--out OUT` writes OUT/judge.msgpack)")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    deadline = time.time() + float(config.max_seconds) if float(config.max_seconds) > 0 else None
    budget = [int(config.max_steps)] if int(config.max_steps) > 0 else None
    for name in config.stages:
        if name not in sd_loop.STAGES:
            raise ValueError(f"unknown stage {name!r} (expected one of {sd_loop.STAGES})")
        if name == "vae" and config.init_from:
            continue  # the warm-start folder's VAE is used
        stage = {"vae": sd_vae.vae_stage, "vae_decoder": sd_vae.vae_decoder_stage,
                 "diffusion": sd_diffusion.diffusion_stage}[name](config, workdir)
        if not sd_loop.train_stage(stage, config, workdir, deadline, budget):
            return False
    if config.export and ("diffusion" in config.stages or (config.init_from and "vae_decoder" in config.stages)):
        sd_export.export(config, workdir)
    return True


def main_pretrain(config_path: str, workdir: str, overrides: Sequence[str] | None = None) -> bool:
    """CLI body of ``datasetdm pretrain --config FILE.py[:arg] --workdir DIR [key=value ...]``."""
    config = load_config(config_path, overrides)
    done = run(config, workdir)
    png = curves.plot_curves(curves.read_metrics(os.path.join(workdir, METRICS_FILE)),
                             os.path.join(workdir, "curves.png"))
    print(f"pretrain: {'finished' if done else 'stopped early; rerun the same command to resume'} "
          f"(workdir {workdir}, curves {png})")
    return done
