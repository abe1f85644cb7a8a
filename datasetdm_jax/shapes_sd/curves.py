"""Training curves of ``datasetdm pretrain`` as one PNG, read back from its ``metrics.jsonl``.

Why a picture: the held-out eps-MSE and the caption gain (unconditional minus conditional eps-MSE,
the share of denoising the caption explains) are the cheap fidelity proxies tracked during training;
their trend says whether more steps are worth it before any sampling is done. With
``diffusion.fidelity_every`` the judged class and colour fidelity of samples are plotted too.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

PANELS: tuple[tuple[str, str, str], ...] = (
    # (stage, metric key, title)
    ("vae", "loss", "VAE loss"),
    ("vae", "eval/psnr", "VAE held-out PSNR (dB)"),
    ("vae_decoder", "loss", "decoder fine-tune loss"),
    ("vae_decoder", "eval/psnr", "decoder fine-tune held-out PSNR (dB)"),
    ("diffusion", "loss", "diffusion loss (Min-SNR weighted)"),
    ("diffusion", "eval/mse", "held-out eps-MSE (EMA)"),
    ("diffusion", "eval/caption_gain", "caption gain (uncond - cond eps-MSE)"),
    ("diffusion", "eval/class_fidelity", "class fidelity (judge, one-object prompts)"),
    ("diffusion", "eval/colour_fidelity", "colour fidelity (judge, one-object prompts)"),
    ("diffusion", "lr", "learning rate"),
)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file, in file order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: Sequence[dict], out_png: str | os.PathLike) -> str:
    """One panel per (stage, metric) in ``PANELS`` that has data; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s, k, t) for s, k, t in PANELS if any(r.get("stage") == s and k in r for r in records)]
    if not panels:
        raise ValueError("no training metrics to plot")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (stage, key, title) in zip(axes.flat, panels):
        pts = sorted((r["step"], r[key]) for r in records if r.get("stage") == stage and key in r)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"{stage} step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if key == "loss":
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return str(out_png)
