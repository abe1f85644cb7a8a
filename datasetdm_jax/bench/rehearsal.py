"""The real-size path rehearsed on any machine: SD 1.5-architecture random weights, a VOC-layout folder.

Nothing on a user's real path (a 512 px SD 1.x checkpoint, PASCAL VOC, `train` -> `generate` ->
`export`) may be assumed to work because the tiny models do. This runs that path at the real
architecture and image size with no download: random SD 1.5 weights saved in diffusers format, a
small folder in PASCAL VOC 2012's on-disk layout (500 x 375 JPEGs, one object class per label map,
big enough for the paper's few-shot selection rule), then the three CLI commands a user runs, each in
its own process, timed, with its peak resident memory (`os.wait4`). The labels are meaningless
(random weights); what is checked is that every stage runs and writes what the next one reads.

    python -m datasetdm_jax.bench.rehearsal --workdir /tmp/rehearsal            # 512 px, 2 images
    python -m datasetdm_jax.bench.rehearsal --workdir /tmp/r --size 256 --dtype bfloat16
    DATASETDM_HOST_DEVICES=1 python -m datasetdm_jax.bench.rehearsal --workdir /tmp/x --model sdxl --size 256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# One label class per image (VOC label values), each object > the selection's 18,000 pixels.
CLASSES = (1, 3, 8, 12, 15)


def write_voc_layout(root: str | os.PathLike, classes: Sequence[int] = CLASSES, size: tuple[int, int] = (375, 500)) -> Path:
    """A PASCAL VOC 2012-layout folder: one random JPEG per class with an ellipse of that class in
    its SegmentationClassAug map (no 255 border, which the few-shot selection refuses),
    ``train_aug.txt`` listing all, ``val.txt`` the first two."""
    root = Path(root)
    h, w = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    ids = [f"2012_{k:06d}" for k in range(len(classes))]
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/SegmentationAug", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, cls in zip(ids, classes):
        r = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.35 * w)) ** 2
        label = np.where(r < 1.0, cls, 0).astype(np.uint8)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        Image.fromarray(label).save(root / "SegmentationClassAug" / f"{i}.png")
    (root / "ImageSets/SegmentationAug/train_aug.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids))
    (root / "ImageSets/Segmentation/val.txt").write_text("".join(f"{i}\n" for i in ids[:2]))
    return root


def _random_sdxl(workdir: Path, dtype) -> "pretrained.Pipeline":
    """SDXL base 1.0's architecture (`bench.sdxl.SDXL_BASE`) with random weights, its scheduler, and a
    small CLIP tokenizer (both towers read it) with the special token ids it assigns."""
    from datasetdm_jax import pretrained, smoke
    from datasetdm_jax.bench.sdxl import SDXL_BASE
    from datasetdm_jax.data import shapes
    from datasetdm_jax.tokenizer import write_clip_tokenizer

    vocab = write_clip_tokenizer(workdir / "tokenizer", shapes.caption_vocabulary(), 77)
    special = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                   pad_token_id=vocab["<|endoftext|>"])
    configs = {k: {**v, **special} if k.startswith("text_encoder") else dict(v) for k, v in SDXL_BASE.items()}
    return pretrained.random_pipeline(configs, dict(smoke.EULER_SDXL), workdir / "tokenizer", dtype=dtype)


def write_random_model(folder: str | os.PathLike, model: str = "sd15", dtype: str = "float32") -> Path:
    """Random weights of SD 1.5's or SDXL base's architecture ("tiny": a quick check of this script),
    saved in diffusers format (safetensors)."""
    import jax.numpy as jnp

    from datasetdm_jax import pretrained
    from datasetdm_jax.bench import models

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    src = folder.parent / f"{model}_src"
    if model == "sdxl":
        src.mkdir(parents=True, exist_ok=True)
        pipe = _random_sdxl(src, jnp.dtype(dtype))
    else:
        pipe, _, _ = models.load_model(model, src, jnp.dtype(dtype))
    return Path(pretrained.save_pipeline(pipe, folder))


def run_stage(name: str, argv: list[str], log: Path) -> dict:
    """Runs one CLI command in its own process; its wall time, peak RSS and exit status."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "datasetdm_jax.cli", *argv], stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    row = {"stage": name, "seconds": round(time.time() - t0, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
           "exit": proc.returncode, "command": "datasetdm " + " ".join(argv), "log": str(log)}
    print(json.dumps(row), flush=True)
    if proc.returncode:
        raise SystemExit(f"rehearsal: {name} failed (exit {proc.returncode}); see {log}")
    return row


def rehearse(workdir: str, size: int = 512, images: int = 2, train_steps: int = 2, steps: int = 2,
             dtype: str = "float32", model: str = "sd15", overrides: Sequence[str] = ()) -> dict:
    """model -> fake VOC -> train -> generate -> export under ``workdir``; returns the report."""
    from datasetdm_jax.config_utils import configs_dir

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    name = model
    # In a process of its own: a forked stage's peak RSS (``ru_maxrss``) would include this process's
    # pages from before its exec, here the weights just built.
    maker = multiprocessing.get_context("spawn").Process(target=write_random_model, args=(work / name, name, dtype))
    maker.start()
    maker.join()
    if maker.exitcode:
        raise SystemExit(f"rehearsal: building the random {name} weights failed (exit {maker.exitcode})")
    model = work / name
    rows = [{"stage": f"random {name} weights, saved", "seconds": round(time.time() - t0, 1)}]
    voc = write_voc_layout(work / "VOCdevkit" / "VOC2012")
    config = os.path.join(configs_dir(), "voc_semantic_sdxl.py" if name == "sdxl" else "voc_semantic.py")
    common = [f"pipeline={model}", f"workdir={work / 'train'}", f"dtype={dtype}", f"data.root={voc}",
              f"data.image_size={size}", "data.per_class=1", *overrides]
    train = ["train", "--config", config, *common, f"steps={train_steps}", "log_every=1", "eval_every=1000",
             "val.num_images=1", "eval.num_images=1"]
    rows.append(run_stage("train", train, work / "train.log"))
    gen = ["generate", "--config", config, "--num_images", str(images), "--out", str(work / "generated"), *common,
           f"generate.steps={steps}", "generate.batch_size=1", f"generate.shard_size={images}"]
    rows.append(run_stage("generate", gen, work / "generate.log"))
    rows.append(run_stage("export", ["export", "--data", str(work / "generated"), "--out", str(work / "export")],
                          work / "export.log"))
    manifest = json.loads((work / "generated" / "manifest.json").read_text())
    exported = sorted(os.listdir(work / "export"))
    report = {"model": name, "size": size, "images": images, "train_steps": train_steps, "sampler_steps": steps, "dtype": dtype,
              "rows": rows, "generated": manifest["counts"], "pipeline": manifest["model"], "export": exported,
              "total_seconds": round(time.time() - t0, 1)}
    (work / "rehearsal.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m datasetdm_jax.bench.rehearsal", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True,
                   help="scratch folder (the model alone: SD 1.5 4.3 GB in float32, SDXL 7 GB in bfloat16)")
    p.add_argument("--size", type=int, default=512, help="image size in pixels (SD 1.5's own: 512)")
    p.add_argument("--images", type=int, default=2, help="images to generate")
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="sampler steps per image")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the frozen SD's dtype")
    p.add_argument("--model", default="sd15", choices=["sd15", "sdxl", "tiny"],
                   help="sdxl: SDXL base's architecture on configs/voc_semantic_sdxl.py; tiny: a quick check")
    p.add_argument("overrides", nargs="*", help="more config overrides (key=value) for train and generate")
    a = p.parse_args(argv)
    report = rehearse(a.workdir, a.size, a.images, a.train_steps, a.steps, a.dtype, a.model, a.overrides)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
