#!/usr/bin/env python3
"""Generate a dataset on a Cloud TPU VM or pod slice, straight into a bucket.

Steps: create, setup, weights, generate, status, logs, delete; `all` runs create -> setup ->
weights -> generate, waits for every worker, and deletes the VM only once the dataset is complete
in the bucket. Every step is a `gcloud` (or `git`) command; `--dry-run` prints them, one per line,
shell-quoted, and runs none. Standard library only: runs on any machine with the gcloud CLI.

    python launch/tpu.py all --name dsdm --zone us-west4-a --accelerator-type v5litepod-16 \\
        --out gs://my-bucket/datasets/shapes1 --config configs/shapes_semantic.py --num_images 100000

* The runtime image follows the accelerator family (v4, v5e = v5litepod-*, v5p, v6e); see
  RUNTIMES. `setup` installs Python 3.11 with uv (the images' system Python is 3.10) and the
  package with its `tpu` extra (`jax[tpu]` at the tested version), every other dependency pinned
  at the version requirements-ci.txt tests (another `--jax-version` replaces the extra's jax pin).
* `--spot` asks for a Spot slice through a queued resource and waits until it is ACTIVE.
* `generate` starts `datasetdm generate --distributed --out gs://...` detached on every worker
  (launch/worker.sh); each worker's log is copied to LOG_DIR/worker-W.log every minute and its exit
  status to LOG_DIR/worker-W.done or .failed. Nothing of the dataset is kept on the VM, so after a
  preemption `create -> setup -> weights -> generate` on a new VM resumes into the same prefix;
  `all` does that by itself (up to --max-recreates times).
* `all` never deletes a VM unless every worker finished and OUT/manifest.json is in the bucket;
  otherwise it keeps the VM and prints the commands to run instead.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Sequence

STEPS = ("create", "setup", "weights", "generate", "status", "logs", "delete")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Accelerator-type prefix -> TPU software (runtime) version for JAX, per
# https://cloud.google.com/tpu/docs/runtimes ("PyTorch and JAX" table).
RUNTIMES = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",   # v5e
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",             # Trillium
}
# Pins of the CPU test environment that have no place on a TPU VM (jax comes as jax[tpu]).
_NOT_ON_TPU = {"jax", "torch", "diffusers", "nbclient", "nbformat", "ipykernel", "pytest", "pytest-xdist",
               "gcp-storage-emulator"}
UV = "~/.local/bin/uv"
LOST_STATES = {"PREEMPTED", "TERMINATED", "SUSPENDED", "SUSPENDING", "FAILED", "DELETING", "STOPPED", "STOPPING"}


class Failed(Exception):
    """A step that did not succeed; the message says what is left on the VM and what to run."""


# ----------------------------------------------------------------------------------------------
# Configuration derived from the arguments
# ----------------------------------------------------------------------------------------------

def family(accelerator_type: str) -> str:
    """'v5litepod-16' -> 'v5litepod'."""
    return accelerator_type.rsplit("-", 1)[0]


def runtime_version(args: argparse.Namespace) -> str:
    if args.version:
        return args.version
    fam = family(args.accelerator_type)
    if fam not in RUNTIMES:
        sys.exit(f"tpu.py: error: no default runtime version for accelerator type {args.accelerator_type!r} "
                 f"(known families: {', '.join(RUNTIMES)}); pass --version")
    return RUNTIMES[fam]


def num_hosts(accelerator_type: str) -> int:
    """TPU VM workers in a slice. The suffix counts TensorCores on v4/v5p (8 per host: 4 chips of 2)
    and chips on v5e/v6e (at most 8 per host), so a host holds 8 of either."""
    m = re.fullmatch(r"[a-z0-9]+-(\d+)", accelerator_type)
    if not m:
        sys.exit(f"tpu.py: error: accelerator type {accelerator_type!r} is not FAMILY-SIZE (e.g. v5litepod-16)")
    return max(1, math.ceil(int(m.group(1)) / 8))


def pinned_packages(jax_version: str | None = None) -> tuple[str, list[str]]:
    """(jax version, the pinned requirement lines for a TPU VM) from requirements-ci.txt."""
    pins, jax = [], None
    with open(os.path.join(ROOT, "requirements-ci.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", line)
            if not m:
                continue  # options (--find-links) and unpinned tools
            name, version = m.group(1).lower(), m.group(3)
            if name == "jax":
                jax = version
            elif name not in _NOT_ON_TPU:
                pins.append(f"{name}=={version}")
    jax = jax_version or jax
    if not jax:
        sys.exit("tpu.py: error: no jax pin in requirements-ci.txt; pass --jax-version")
    pins = [f"jaxlib=={jax}" if p.startswith("jaxlib==") else p for p in pins]
    return jax, [f"jax[tpu]=={jax}"] + pins


def log_dir(args: argparse.Namespace) -> str:
    return (args.log_dir or args.out.rstrip("/") + "-logs").rstrip("/")


def staging(args: argparse.Namespace, dst: str) -> str:
    """Where a local weights folder is uploaded once: gs://BUCKET/datasetdm-weights/DST."""
    bucket = "/".join(args.out.split("/")[:3])
    return f"{bucket}/datasetdm-weights/{dst.strip('/').replace('/', '_')}"


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

def _loc(args: argparse.Namespace) -> list[str]:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _tpu(args: argparse.Namespace, *cmd: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", *cmd, args.name, *_loc(args)]


def _qr(args: argparse.Namespace, *cmd: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", *cmd, args.name, *_loc(args)]


def _ssh(args: argparse.Namespace, script: str) -> list[str]:
    return _tpu(args, "ssh") + ["--worker=all", f"--command={script}"]


def describe_node(args):
    return _tpu(args, "describe") + ["--format=value(state)"]


def describe_qr(args):
    return _qr(args, "describe") + ["--format=value(state.state)"]


def create_commands(args) -> list[list[str]]:
    if args.spot:
        return [_qr(args, "create") + [f"--node-id={args.name}", f"--accelerator-type={args.accelerator_type}",
                                       f"--runtime-version={runtime_version(args)}", "--spot"]]
    return [_tpu(args, "create") + [f"--accelerator-type={args.accelerator_type}",
                                    f"--version={runtime_version(args)}"]]


def delete_commands(args) -> list[list[str]]:
    if args.spot:  # --force deletes the queued resource's node too
        return [_qr(args, "delete") + ["--force", "--quiet"]]
    return [_tpu(args, "delete") + ["--quiet"]]


def setup_commands(args) -> list[list[str]]:
    jax, pins = pinned_packages(args.jax_version)
    # The package's own `tpu` extra, with every other dependency at its tested version; another
    # --jax-version replaces the extra's pin by that one.
    package = ".[tpu]" if jax == pinned_packages()[0] else "."
    install = (f"cd datasetdm-jax && ([ -x {UV} ] || curl -LsSf https://astral.sh/uv/install.sh | sh) && "
               f"([ -x .venv/bin/python ] || {UV} venv --python {shlex.quote(args.python)} .venv) && "
               f"{UV} pip install --python .venv/bin/python -e {shlex.quote(package)} "
               + " ".join(shlex.quote(p) for p in pins))
    if args.repo:  # clone a published repository at a revision
        fetch = (f"[ -d datasetdm-jax ] || git clone -q {shlex.quote(args.repo)} datasetdm-jax; "
                 f"(cd datasetdm-jax && git fetch -q && git checkout -q {shlex.quote(args.revision)}); ")
        return [_ssh(args, "set -e; " + fetch + install)]
    # default: ship this checkout's committed tree (git archive) to every worker
    tarball = f"/tmp/datasetdm-jax-{args.name}.tar.gz"
    return [["git", "-C", ROOT, "archive", "--format=tar.gz", "--prefix=datasetdm-jax/", f"--output={tarball}",
             args.revision],
            _tpu(args, "scp") + [tarball, f"{args.name}:datasetdm-jax.tar.gz", "--worker=all"],
            _ssh(args, "set -e; tar -xzf datasetdm-jax.tar.gz && " + install)]


def weights_commands(args) -> list[list[str]]:
    out = []
    for src, dst in ((args.model_src, args.model_dst), (args.decoder_src, args.decoder_dst)):
        if not src:
            continue
        remote = src
        if not src.startswith("gs://"):  # a local folder: upload it once, then every worker pulls it
            remote = staging(args, dst)
            out.append(["gcloud", "storage", "rsync", "--recursive", src, remote])
        out.append(_ssh(args, f"set -e; mkdir -p datasetdm-jax/{shlex.quote(dst)} && "
                              f"gcloud storage rsync --recursive {shlex.quote(remote)} "
                              f"datasetdm-jax/{shlex.quote(dst)}"))
    return out


def generate_commands(args) -> list[list[str]]:
    gen = [".venv/bin/datasetdm", "generate", "--distributed", "--config", args.config,
           "--num_images", str(args.num_images), "--out", args.out, *args.overrides]
    script = "cd datasetdm-jax && " + shlex.join(["bash", "launch/worker.sh", "start", log_dir(args), *gen])
    return [_ssh(args, script)]


def list_logs(args):
    return ["gcloud", "storage", "ls", log_dir(args) + "/"]


def list_manifest(args):
    return ["gcloud", "storage", "ls", args.out.rstrip("/") + "/manifest.json"]


def logs_commands(args) -> list[list[str]]:
    workers = range(num_hosts(args.accelerator_type)) if args.worker is None else [args.worker]
    return [["gcloud", "storage", "cat", f"{log_dir(args)}/worker-{w}.log"] for w in workers]


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

def run(cmd: list[str], args, *, capture: bool = False, check: bool = True, echo: bool = True):
    """Prints `cmd` and runs it (not under --dry-run). With `capture`: (returncode, stdout)."""
    if echo:
        print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return (0, "") if capture else None
    if capture:
        r = subprocess.run(cmd, capture_output=True, text=True)
        return r.returncode, r.stdout
    subprocess.run(cmd, check=check)
    return None


def say(msg: str) -> None:
    print(f"tpu.py: {msg}", file=sys.stderr, flush=True)


def node_state(args, echo=True) -> str:
    """The TPU VM's state (READY, PREEMPTED, ...), or 'MISSING' when there is none."""
    rc, out = run(describe_node(args), args, capture=True, echo=echo)
    return (out.strip().splitlines() or ["MISSING"])[-1] if rc == 0 else "MISSING"


def create(args) -> None:
    """Creates the VM unless a usable one exists; a preempted one is deleted and created again."""
    state = node_state(args)
    if state == "READY":
        say(f"{args.name} exists and is READY: not creating it")
        return
    queued = "MISSING"
    if args.spot:  # a queued resource may exist without its node (still waiting, or preempted)
        rc, out = run(describe_qr(args), args, capture=True)
        queued = (out.strip() or "MISSING") if rc == 0 else "MISSING"
    if state != "MISSING" or queued in LOST_STATES:
        say(f"{args.name} is {state if state != 'MISSING' else queued}: deleting it to create it again")
        for cmd in delete_commands(args):
            run(cmd, args)
        queued = "MISSING"
    if queued == "MISSING":
        for cmd in create_commands(args):
            run(cmd, args)
    else:
        say(f"queued resource {args.name} is {queued}: waiting for it")
    if args.spot:  # wait for the queued resource to be provisioned
        first = True
        while True:
            rc, out = run(describe_qr(args), args, capture=True, echo=first)
            state = out.strip() if rc == 0 else "MISSING"
            if args.dry_run or state == "ACTIVE":
                return
            if state in ("FAILED", "SUSPENDED", "MISSING"):
                raise Failed(f"queued resource {args.name} is {state}")
            first = False
            time.sleep(args.poll)


def workers_finished(args, echo=True) -> tuple[list[str], list[str]]:
    """(workers whose generate exited 0, workers whose generate failed), from the markers in LOG_DIR."""
    rc, out = run(list_logs(args), args, capture=True, echo=echo)
    names = [line.rstrip("/").rsplit("/", 1)[-1] for line in out.split()] if rc == 0 else []
    done = sorted(n[len("worker-"):-len(".done")] for n in names if re.fullmatch(r"worker-.+\.done", n))
    failed = sorted(n[len("worker-"):-len(".failed")] for n in names if re.fullmatch(r"worker-.+\.failed", n))
    return done, failed


def dataset_complete(args, echo=True) -> bool:
    rc, _ = run(list_manifest(args), args, capture=True, echo=echo)
    return rc == 0


def wait(args) -> str:
    """Polls until every worker reported ('done' or 'failed') or the VM is lost ('lost')."""
    hosts, first = num_hosts(args.accelerator_type), True
    while True:
        done, failed = workers_finished(args, echo=first)
        if args.dry_run:
            node_state(args)
            return "done"
        if len(done) + len(failed) >= hosts:
            return "failed" if failed else "done"
        state = node_state(args, echo=first)
        if state in LOST_STATES or state == "MISSING":
            say(f"{args.name} is {state} (preempted?) while {hosts - len(done) - len(failed)} worker(s) still ran")
            return "lost"
        first = False
        time.sleep(args.poll)


def status(args) -> None:
    hosts = num_hosts(args.accelerator_type)
    state = node_state(args)
    done, failed = workers_finished(args)
    complete = dataset_complete(args)
    if args.dry_run:
        return
    running = hosts - len(done) - len(failed)
    print(f"VM {args.name}: {state}", flush=True)
    print(f"workers ({hosts}): {len(done)} done, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "") + f", {max(running, 0)} not finished", flush=True)
    print(f"dataset {args.out}: " + ("complete (manifest.json written)" if complete else "not complete"), flush=True)
    print(f"logs: {log_dir(args)}/worker-W.log", flush=True)


def again(args, step: str) -> str:
    """This invocation with another step: the command to print for the user."""
    argv = list(args.argv)
    if "all" in argv:
        argv.remove("all")
    argv = [a for a in argv if a != "--dry-run"]
    return shlex.join(["python", "launch/tpu.py", step, *argv])


def keep_message(args, why: str) -> str:
    return (f"{why}\nThe VM {args.name} is kept (delete it yourself when done); everything generated so far is in "
            f"{args.out}. To go on:\n"
            f"  read the logs:  {again(args, 'logs')}\n"
            f"  resume:         {again(args, 'generate')}   (continues into {args.out})\n"
            f"  check:          {again(args, 'status')}\n"
            f"  then delete:    {again(args, 'delete')}\n"
            f"If the VM is gone, `{again(args, 'all')}` creates a new one and resumes.")


def provision(args) -> None:
    create(args)
    for step in (setup_commands, weights_commands, generate_commands):
        for cmd in step(args):
            run(cmd, args)


def run_all(args) -> None:
    recreates = 0
    while True:
        try:
            provision(args)
            outcome = wait(args)
        except subprocess.CalledProcessError as e:
            if args.dry_run:
                raise
            state = node_state(args)
            if state in LOST_STATES or state == "MISSING":
                outcome = "lost"
            else:
                raise Failed(keep_message(args, f"step failed: {shlex.join(e.cmd)}")) from None
        except Failed as e:
            raise Failed(keep_message(args, str(e))) from None
        if outcome != "lost":
            break
        recreates += 1
        if recreates > args.max_recreates:
            raise Failed(keep_message(args, f"the VM was lost {recreates} times (--max-recreates {args.max_recreates})"))
        say(f"recreating {args.name} ({recreates} of at most {args.max_recreates}); generation resumes into {args.out}")
    if outcome == "failed":
        _, failed = workers_finished(args)
        raise Failed(keep_message(args, f"generate failed on worker(s) {', '.join(failed)}"))
    if not dataset_complete(args):
        raise Failed(keep_message(args, f"every worker finished but {args.out}/manifest.json is not in the bucket"))
    for cmd in delete_commands(args):
        run(cmd, args)
    if not args.dry_run:
        say(f"done: the dataset is in {args.out}; the VM {args.name} is deleted")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=(*STEPS, "all"))
    p.add_argument("--name", required=True, help="TPU VM name (also the queued resource's, with --spot)")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--accelerator-type", default="v5litepod-8",
                   help="v4-N, v5litepod-N (v5e), v5p-N or v6e-N, e.g. v5litepod-8 (1 host), v4-32 (4 hosts)")
    p.add_argument("--version", default=None, help="TPU software (runtime) version; default: from the family")
    p.add_argument("--spot", action="store_true", help="a Spot slice through a queued resource (preemptible)")
    p.add_argument("--repo", default="", help="git URL to clone on the workers (default: ship this checkout)")
    p.add_argument("--revision", default="HEAD", help="commit / branch to install")
    p.add_argument("--python", default="3.11", help="Python version uv installs on the VM")
    p.add_argument("--jax-version", default=None, help="default: the jax pin of requirements-ci.txt")
    p.add_argument("--out", required=True, help="gs://BUCKET/PREFIX: the dataset, written there directly")
    p.add_argument("--log-dir", default=None, help="gs:// prefix for the workers' logs (default OUT-logs)")
    p.add_argument("--model-src", default="", help="diffusers-format model: local folder or gs:// path")
    p.add_argument("--model-dst", default="models/shapes_sd", help="where the config expects it (repo-relative)")
    p.add_argument("--decoder-src", default="", help="the trained decoder workdir: local folder or gs:// path")
    p.add_argument("--decoder-dst", default="runs/shapes_semantic", help="the config's workdir (repo-relative)")
    p.add_argument("--config", default="configs/shapes_semantic.py")
    p.add_argument("--num_images", type=int, default=1000)
    p.add_argument("--worker", type=int, default=None, help="`logs`: only this worker's log")
    p.add_argument("--poll", type=float, default=60.0, help="seconds between state checks while waiting")
    p.add_argument("--max-recreates", type=int, default=3, help="`all`: how often a lost (preempted) VM is recreated")
    p.add_argument("--dry-run", action="store_true", help="print every command instead of running it")
    p.add_argument("overrides", nargs="*", help="config overrides for generate, key=value")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(argv)
    args.argv = argv
    for flag, value in (("--out", args.out), ("--log-dir", args.log_dir)):
        if value is not None and not re.fullmatch(r"gs://[^/]+(/.*)?", value):
            sys.exit(f"tpu.py: error: {flag} must be a gs:// path, got {value!r}")
    runtime_version(args), num_hosts(args.accelerator_type)  # fail early on an unknown accelerator type
    try:
        if args.step == "all":
            run_all(args)
        elif args.step == "create":
            create(args)
        elif args.step == "status":
            status(args)
        elif args.step == "logs":
            for cmd in logs_commands(args):
                run(cmd, args, check=False)
        else:
            for cmd in {"setup": setup_commands, "weights": weights_commands, "generate": generate_commands,
                        "delete": delete_commands}[args.step](args):
                run(cmd, args)
    except Failed as e:
        sys.exit(f"tpu.py: {e}")
    except KeyboardInterrupt:
        if args.step != "all":
            raise
        sys.exit("tpu.py: " + keep_message(args, "interrupted (generation goes on on the VM if it was started)"))
    except subprocess.CalledProcessError as e:
        sys.exit(f"tpu.py: step {args.step} failed: {shlex.join(e.cmd)}")


if __name__ == "__main__":
    main()
