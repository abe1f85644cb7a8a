"""The `datasetdm` command line. Each subcommand imports its module lazily, so `--help` is instant."""

from __future__ import annotations

import argparse
import os
import sys


def _enable_compilation_cache() -> None:
    """Persistent XLA cache on by default: one compile per shape, across runs."""
    import jax

    cache = os.environ.get("DATASETDM_JAX_CACHE", os.path.expanduser("~/.cache/datasetdm_jax/xla"))
    if cache != "off":
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _cmd_bench(args: argparse.Namespace) -> None:
    from datasetdm_jax import bench

    bench.main_unet(args.model, args.size, args.batch, args.repeats, args.json)


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from datasetdm_jax import pretrain

    pretrain.main_pretrain(args.config, args.workdir, args.overrides)


def _cmd_smoke(args: argparse.Namespace) -> None:
    from datasetdm_jax import smoke

    smoke.main(args.out, args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datasetdm", description="DatasetDM in JAX: annotated synthetic datasets from a frozen Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("smoke", help="end-to-end check on a tiny random-weight Stable Diffusion (no downloads)")
    p.add_argument("--out", default="work/smoke", help="folder for the tiny diffusers-format model")
    p.add_argument("--steps", type=int, default=4, help="sampling steps")
    p.set_defaults(fn=_cmd_smoke)

    p = sub.add_parser("pretrain", help="train the shapes-world Stable Diffusion from scratch (resumable)")
    p.add_argument("--config", default="configs/shapes_sd.py", help="config file, optionally FILE.py:ARG (e.g. :tiny)")
    p.add_argument("--workdir", default="runs/shapes_sd", help="checkpoints, metrics and the exported model")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. diffusion.steps=1000)")
    p.set_defaults(fn=_cmd_pretrain)

    p = sub.add_parser("bench", help="UNet forward timings, FLOPs and capture overhead on this device")
    p.add_argument("--model", default="sd15", choices=["sd15", "sd21"])
    p.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / 8)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (a CFG pair of 1 image is 2)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(fn=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _enable_compilation_cache()
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, no traceback
        sys.exit(f"datasetdm {args.command}: error: {e}")


if __name__ == "__main__":
    main()
