"""The `datasetdm` command line. Each subcommand imports its module lazily, so `--help` is instant."""

from __future__ import annotations

import argparse
import os


def _enable_compilation_cache() -> None:
    """Persistent XLA cache on by default: one compile per shape, across runs."""
    import jax

    cache = os.environ.get("DATASETDM_JAX_CACHE", os.path.expanduser("~/.cache/datasetdm_jax/xla"))
    if cache != "off":
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _cmd_bench(args: argparse.Namespace) -> None:
    from datasetdm_jax import bench

    bench.main(bench.from_args(args), args.json)


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from datasetdm_jax import shapes_sd

    shapes_sd.main_pretrain(args.config, args.workdir, args.overrides)


def _cmd_fidelity(args: argparse.Namespace) -> None:
    from datasetdm_jax.research import judge

    judge.main_fidelity(args.model, args.judge, args.out, args.num_prompts, args.steps, args.guidance,
                        args.scheduler, args.seed, args.batch, args.judge_steps, args.judge_round_trips,
                        args.judge_seed)


def _cmd_demo(args: argparse.Namespace) -> None:
    from datasetdm_jax import demo

    demo.main_demo(args.config, args.overrides)


def _cmd_diagnose(args: argparse.Namespace) -> None:
    from datasetdm_jax.research import diagnose

    diagnose.main_diagnose(args.config, args.overrides)


def _cmd_proof(args: argparse.Namespace) -> None:
    from datasetdm_jax.research import proof

    proof.main_proof(args.config, args.out, args.overrides)


def _cmd_probe(args: argparse.Namespace) -> None:
    from datasetdm_jax.research import probe

    probe.main_probe(args.model, args.out, num_train=args.num_train, num_test=args.num_test,
                     probe_steps=args.steps, scratch_steps=args.steps, seed=args.seed,
                     timestep=args.timestep, capture=args.capture)


def _cmd_train(args: argparse.Namespace) -> None:
    from datasetdm_jax import train

    train.main_train(args.config, args.workdir, args.overrides)


def _cmd_baseline(args: argparse.Namespace) -> None:
    from datasetdm_jax.research import baselines

    baselines.main_baseline(args.config, args.workdir, args.overrides)


def _cmd_generate(args: argparse.Namespace) -> None:
    from datasetdm_jax import dataset_writer

    if args.coordinator or args.distributed:
        import jax
        kw = dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
                  process_id=args.process_id) if args.coordinator else {}
        jax.distributed.initialize(**kw)
    dataset_writer.main_generate(args.config, args.num_images, args.out, args.overrides)


def _cmd_export(args: argparse.Namespace) -> None:
    from datasetdm_jax import export

    export.main_export(args.data, args.out, args.min_quality)


def _cmd_smoke(args: argparse.Namespace) -> None:
    from datasetdm_jax import smoke

    smoke.main(args.out, args.steps)


def _cmd_downstream(args: argparse.Namespace) -> None:
    from datasetdm_jax.downstream import main

    main.main_downstream(args.config, args.workdir, args.overrides)


# `datasetdm exp <name>`: the research instruments (datasetdm_jax/research/), apart from the product.
EXPERIMENTS = ("proof", "baseline", "probe", "fidelity", "diagnose")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datasetdm", description="DatasetDM in JAX: annotated synthetic datasets from a frozen Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the shapes-world proof: P-Decoders, generation, downstream table (no downloads)")
    p.add_argument("--config", default=None, help="default configs/shapes_demo.py; configs/shapes_demo.py:small is quick")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. generate.num_images=2048)")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("train", help="train a P-Decoder on the frozen SD's features (resumable)")
    p.add_argument("--config", default="configs/shapes_semantic.py",
                   help="config file, optionally FILE.py:ARG (e.g. configs/shapes_depth.py:tiny)")
    p.add_argument("--workdir", default=None, help="checkpoints and metrics (default: the config's workdir)")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. steps=500)")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("generate", help="generate an annotated dataset (sharded, resumable, multi-host)")
    p.add_argument("--config", default="configs/shapes_semantic.py", help="config file, optionally FILE.py:ARG")
    p.add_argument("--num_images", type=int, required=True)
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() with auto-detection (Cloud TPU pods)")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0, for a manual multi-process run")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    p.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. generate.steps=50)")
    p.set_defaults(fn=_cmd_generate)

    p = sub.add_parser("export", help="a generated dataset to a plain folder (JPEG + PNG) and COCO JSON")
    p.add_argument("--data", required=True, help="folder written by `datasetdm generate`")
    p.add_argument("--out", required=True)
    p.add_argument("--min_quality", type=float, default=None, help="leave out examples below this confidence")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("downstream", help="train downstream models on real / generated / mixed data, evaluate on real test")
    p.add_argument("--config", default="configs/downstream_shapes.py",
                   help="config file, optionally FILE.py:ARG (e.g. configs/downstream_voc.py)")
    p.add_argument("--workdir", default=None, help="report.json and table.txt (default: the config's workdir)")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. synthetic.records=DIR)")
    p.set_defaults(fn=_cmd_downstream)

    p = sub.add_parser("pretrain", help="train the shapes-world Stable Diffusion from scratch (resumable)")
    p.add_argument("--config", default="configs/shapes_sd.py", help="config file, optionally FILE.py:ARG (e.g. :tiny)")
    p.add_argument("--workdir", default="runs/shapes_sd", help="checkpoints, metrics and the exported model")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. diffusion.steps=1000)")
    p.set_defaults(fn=_cmd_pretrain)

    p = sub.add_parser("smoke", help="end-to-end check on a tiny random-weight Stable Diffusion (no downloads)")
    p.add_argument("--out", default="work/smoke", help="folder for the tiny diffusers-format model")
    p.add_argument("--steps", type=int, default=4, help="sampling steps")
    p.set_defaults(fn=_cmd_smoke)

    p = sub.add_parser("bench", help="speed, FLOPs, MFU and memory on this device, side by side with diffusers")
    from datasetdm_jax.bench.config import add_arguments as bench_arguments  # no JAX import
    bench_arguments(p)
    p.set_defaults(fn=_cmd_bench)

    p = sub.add_parser("exp", help="research instruments: " + ", ".join(EXPERIMENTS) + " (datasetdm exp --help)",
                       description="Research instruments (datasetdm_jax/research/): the experiments behind "
                                   "docs/experiments/, kept apart from the product commands.")
    exp = p.add_subparsers(dest="experiment", required=True)

    p = exp.add_parser("proof", help="P-Decoder vs a scratch model on all four tasks, shapes world (cached stages)")
    p.add_argument("--config", default=None, help="default configs/shapes_proof.py; configs/shapes_proof.py:small is quick")
    p.add_argument("--out", default=None, help="workdir for the stages, report.json and table.md (default: the config's)")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. tasks.depth.steps=1000)")
    p.set_defaults(fn=_cmd_proof)

    p = exp.add_parser("baseline", help="train and score a scratch conv model with the same head and data as `train`")
    p.add_argument("--config", default="configs/shapes_semantic.py", help="train config file, optionally FILE.py:ARG")
    p.add_argument("--workdir", default=None, help="writes baseline.json here (default: the config's workdir)")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. steps=500 baseline.width=16)")
    p.set_defaults(fn=_cmd_baseline)

    p = exp.add_parser("probe", help="1x1-conv head on frozen UNet features vs a scratch segmenter, same 100 images")
    p.add_argument("--model", default=None, help="diffusers-format model folder (default: the shipped shapes model)")
    p.add_argument("--out", default="runs/probe", help="folder for probe.json")
    p.add_argument("--num_train", type=int, default=100, help="labelled real training images")
    p.add_argument("--num_test", type=int, default=500, help="test-split images")
    p.add_argument("--steps", type=int, default=600, help="training steps of each head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timestep", type=int, default=1, help="diffusion timestep of the feature pass (noise level)")
    p.add_argument("--capture", default="datasetdm", help="feature capture preset (datasetdm, lean)")
    p.set_defaults(fn=_cmd_probe)

    p = exp.add_parser("fidelity", help="judge whether a shapes-world model draws the prompted class and colour")
    p.add_argument("--model", required=True, help="diffusers-format model folder")
    p.add_argument("--judge", default="train", help="judge file, or 'train' to train one (cached in --out)")
    p.add_argument("--out", default="runs/fidelity", help="folder for the report, sample grid and judge")
    p.add_argument("--num_prompts", type=int, default=200)
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="pndm", choices=["ddim", "pndm", "dpmpp_2m"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--judge_steps", type=int, default=1000, help="training steps when the judge is trained here")
    p.add_argument("--judge_round_trips", action=argparse.BooleanOptionalAction, default=True,
                   help="train the judge on real scenes and their round trips through the model's VAE")
    p.add_argument("--judge_seed", type=int, default=None, help="seed of the judge trained here (default: --seed)")
    p.set_defaults(fn=_cmd_fidelity)

    p = exp.add_parser("diagnose", help="after the demo: what N more images are worth with ground truth, with "
                       "P-Decoder labels, and generated (downstream segmenter rows)")
    p.add_argument("--config", default=None, help="the demo's config (default configs/shapes_demo.py)")
    p.add_argument("overrides", nargs="*", help="the demo's config overrides as key=value")
    p.set_defaults(fn=_cmd_diagnose)
    return parser


# What Ctrl-C leaves behind, per command: how to go on.
_INTERRUPTED = {
    "generate": "finished shards are kept: rerun the same command to resume",
    "export": "the --out folder is incomplete (it holds an INCOMPLETE file): rerun the same command to redo it",
    "train": "rerun the same command to resume from the last checkpoint",
    "pretrain": "rerun the same command to resume from the last checkpoint",
}


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` and run the command inside the error boundary (``errors.boundary``): a user
    error prints one line ``datasetdm CMD: error: ...`` and exits 2, Ctrl-C exits 130 with how to go
    on, a bug shows its traceback and says it is one."""
    from datasetdm_jax import errors

    args = build_parser().parse_args(argv)
    name = "datasetdm " + args.command + (f" {args.experiment}" if args.command == "exp" else "")
    with errors.boundary(name, interrupted_hint=_INTERRUPTED.get(args.command, "rerun the same command")):
        from datasetdm_jax import devices

        devices.use_host_cores()  # before any JAX work: one XLA device per core on CPU hosts
        _enable_compilation_cache()
        args.fn(args)


if __name__ == "__main__":
    main()
