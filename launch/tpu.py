#!/usr/bin/env python3
"""Generate a dataset on a Cloud TPU VM or pod slice: create, setup, weights, generate, gather, delete.

Every step is a `gcloud` command; `--dry-run` prints them (one per line, shell-quoted) instead of
running them. `all` runs the steps in order and deletes the VM at the end (also after a failure,
unless `--keep`). Standard library only, so it runs on any machine with the gcloud CLI.

    python launch/tpu.py all --name dsdm --zone us-west4-a --accelerator-type v5litepod-16 \\
        --bucket gs://my-bucket --config configs/shapes_semantic.py --num_images 100000 --dry-run

Generation runs on every worker at once (`--worker=all`) with `datasetdm generate --distributed`:
`jax.distributed` finds the other workers by itself on Cloud TPU, each worker writes its own shards
to a local folder, worker 0 writes the manifest, and `gather` copies every worker's folder into one
bucket prefix. Rerunning `generate` after a preemption resumes where the shards stop.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Sequence

STEPS = ("create", "setup", "weights", "generate", "gather", "delete")


def _tpu(args: argparse.Namespace, *cmd: str) -> list[str]:
    out = ["gcloud", "compute", "tpus", "tpu-vm", *cmd, args.name, f"--zone={args.zone}"]
    return out + ([f"--project={args.project}"] if args.project else [])


def _ssh(args: argparse.Namespace, script: str) -> list[str]:
    return _tpu(args, "ssh") + ["--worker=all", f"--command={script}"]


def _remote_dir(args: argparse.Namespace) -> str:
    return f"~/datasetdm-out/{args.run}"


def commands(step: str, args: argparse.Namespace) -> list[list[str]]:
    """The gcloud commands of one step."""
    if step == "create":
        cmd = _tpu(args, "create") + [f"--accelerator-type={args.accelerator_type}", f"--version={args.version}"]
        return [cmd + (["--spot"] if args.spot else [])]
    if step == "setup":
        install = ("cd datasetdm-jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip && "
                   f".venv/bin/pip install -q -e . {shlex.quote('jax[tpu]==' + args.jax_version)}")
        if args.repo:  # clone a published repository at a revision
            fetch = (f"[ -d datasetdm-jax ] || git clone -q {shlex.quote(args.repo)} datasetdm-jax; "
                     f"(cd datasetdm-jax && git fetch -q && git checkout -q {shlex.quote(args.revision)}); ")
            return [_ssh(args, "set -e; " + fetch + install)]
        # default: ship this checkout's committed tree (git archive) to every worker
        tarball = "/tmp/datasetdm-jax.tar.gz"
        return [["git", "archive", "--format=tar.gz", "--prefix=datasetdm-jax/", f"--output={tarball}",
                 args.revision],
                _tpu(args, "scp") + [tarball, f"{args.name}:datasetdm-jax.tar.gz", "--worker=all"],
                _ssh(args, "set -e; tar -xzf datasetdm-jax.tar.gz && " + install)]
    if step == "weights":
        out = []
        for src, dst in ((args.model_src, args.model_dst), (args.decoder_src, args.decoder_dst)):
            if not src:
                continue
            remote = f"{args.bucket.rstrip('/')}/weights/{dst.strip('/').replace('/', '_')}"
            if not src.startswith("gs://"):  # a local folder: upload it once, then every worker pulls it
                out.append(["gcloud", "storage", "rsync", "--recursive", src, remote])
            else:
                remote = src
            out.append(_ssh(args, f"set -e; mkdir -p datasetdm-jax/{shlex.quote(dst)} && "
                                  f"gcloud storage rsync --recursive {shlex.quote(remote)} "
                                  f"datasetdm-jax/{shlex.quote(dst)}"))
        return out
    if step == "generate":
        gen = ["datasetdm", "generate", "--distributed", "--config", args.config, "--num_images",
               str(args.num_images), "--out", _remote_dir(args), *args.overrides]
        script = "set -e; cd datasetdm-jax && .venv/bin/" + " ".join(shlex.quote(a) if not a.startswith("~/") else a
                                                                    for a in gen)
        return [_ssh(args, script)]
    if step == "gather":
        dst = f"{args.bucket.rstrip('/')}/datasets/{args.run}"
        return [_ssh(args, f"gcloud storage rsync --recursive {_remote_dir(args)} {shlex.quote(dst)}")]
    if step == "delete":
        return [_tpu(args, "delete") + ["--quiet"]]
    raise ValueError(f"unknown step {step!r}; known: {', '.join(STEPS)} or all")


def run(step: str, args: argparse.Namespace) -> None:
    for cmd in commands(step, args):
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=(*STEPS, "all"))
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--accelerator-type", default="v5litepod-8", help="e.g. v5litepod-8 (1 host), v4-32 (4 hosts)")
    p.add_argument("--version", default="v2-alpha-tpuv5-lite", help="TPU VM software version (runtime image)")
    p.add_argument("--spot", action="store_true", help="a preemptible (spot) VM; rerun `generate` to resume")
    p.add_argument("--repo", default="", help="git URL to clone on the workers (default: ship this checkout)")
    p.add_argument("--revision", default="HEAD", help="commit / branch to install")
    p.add_argument("--jax-version", default="0.10.2")
    p.add_argument("--bucket", required=True, help="gs://BUCKET for weights and the gathered dataset")
    p.add_argument("--model-src", default="", help="diffusers-format model: local folder or gs:// path")
    p.add_argument("--model-dst", default="models/shapes_sd", help="where the config expects it (repo-relative)")
    p.add_argument("--decoder-src", default="", help="the trained decoder workdir: local folder or gs:// path")
    p.add_argument("--decoder-dst", default="runs/shapes_semantic", help="the config's workdir (repo-relative)")
    p.add_argument("--config", default="configs/shapes_semantic.py")
    p.add_argument("--num_images", type=int, default=1000)
    p.add_argument("--run", default="run1", help="dataset name: ~/datasetdm-out/RUN and BUCKET/datasets/RUN")
    p.add_argument("--keep", action="store_true", help="`all`: keep the VM after a failure")
    p.add_argument("--dry-run", action="store_true", help="print every command instead of running it")
    p.add_argument("overrides", nargs="*", help="config overrides for generate, key=value")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    if not args.bucket.startswith("gs://"):
        sys.exit(f"tpu.py: error: --bucket must be a gs:// path, got {args.bucket!r}")
    if args.step != "all":
        run(args.step, args)
        return
    try:
        for step in STEPS[:-1]:
            run(step, args)
    except subprocess.CalledProcessError as e:
        print(f"tpu.py: step failed: {shlex.join(e.cmd)}", file=sys.stderr)
        if args.keep:
            sys.exit(1)
        run("delete", args)
        sys.exit(1)
    run("delete", args)


if __name__ == "__main__":
    main()
