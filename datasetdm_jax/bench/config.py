"""What one `datasetdm bench` run measures, and its command-line flags (no JAX import here, so
`datasetdm --help` stays instant)."""

from __future__ import annotations

import argparse
import dataclasses

MODELS = ("shapes", "sd15", "sd21", "tiny", "sdxl")
# compile-only architectures of the memory section: the models', and the tiny SDXL (tests)
MEMORY_MODELS = MODELS + ("tiny_sdxl",)
SDXL_MEMORY_MODELS = ("sdxl", "tiny_sdxl")  # measured per program by bench/sdxl.py


@dataclasses.dataclass
class BenchConfig:
    model: str = "shapes"             # shapes | sd15 | sd21 | tiny | sdxl (timed on the tiny SDXL)
    size: int | None = None           # image px; default the model's native size
    batches: tuple[int, ...] = (1, 4, 16)  # generation sweep; the last is the headline batch
    steps: int = 25
    scheduler: str = "pndm"
    guidance: float = 7.5
    capture: str = "datasetdm"        # features preset for the "+capture" rows
    repeats: int = 3
    dtype: str | None = None          # JAX compute dtype; default float32 on CPU, else bfloat16
    devices: int | None = None        # local devices to split the batch over (default: all that divide it)
    torch: bool = True                # diffusers fp32 side by side
    torch_bf16: bool = True           # and diffusers bf16 (the stretch goal)
    train_step: bool = True
    compile_probe: bool = True
    memory: bool = True
    memory_only: bool = False         # only the compile-only memory / FLOPs section (no model runs)
    memory_model: str | None = None   # default: sdxl (SDXL base) with --model sdxl, else sd15
    memory_sizes: tuple[int, ...] | None = None  # default: 1024 for SDXL, else 512 and 768
    memory_dtype: str = "bfloat16"
    memory_budget_gib: float = 16.0   # TPU v5e HBM per chip
    workdir: str | None = None        # scratch (random models, exported folder); default a temp dir


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `datasetdm bench` flags; defaults are BenchConfig's."""
    d = BenchConfig()
    p.add_argument("--model", default=d.model, choices=MODELS,
                   help="shapes: the shipped shapes-world SD (random weights with its config until it ships); "
                        "sd15 / sd21: SD-shaped random weights; tiny: seconds, for tests; sdxl: timings on a tiny "
                        "random SDXL beside diffusers' StableDiffusionXLPipeline, memory of SDXL base (compile only)")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's own)")
    p.add_argument("--batch", type=_ints, default=d.batches, dest="batches",
                   help="generation batch sweep, comma-separated; the last is the headline batch (default 1,4,16)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--scheduler", default=d.scheduler, choices=["pndm", "ddim", "dpmpp_2m", "euler"])
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--capture", default=d.capture, help="features preset of the +capture rows")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed repeats per program (median)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="JAX compute dtype (default float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--devices", type=int, default=None, help="local devices to split the batch over (default all)")
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip diffusers fp32")
    p.add_argument("--no-torch-bf16", dest="torch_bf16", action="store_false", help="skip diffusers bf16")
    p.add_argument("--no-train-step", dest="train_step", action="store_false", help="skip the P-Decoder step")
    p.add_argument("--no-compile-probe", dest="compile_probe", action="store_false",
                   help="skip cold / warm compile timing in fresh processes")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory analysis")
    p.add_argument("--memory-only", action="store_true",
                   help="only the memory section: compile SD-sized generation (never run) for peak memory, "
                        "largest batch in budget and GFLOP per image at --steps (no timing, no diffusers)")
    p.add_argument("--memory-model", default=d.memory_model, choices=MEMORY_MODELS,
                   help="compile-only architecture (default sdxl with --model sdxl, else sd15); sdxl / tiny_sdxl: "
                        "SDXL base / the tiny SDXL per program (bench/sdxl.py), batch 1")
    p.add_argument("--memory-sizes", type=_ints, default=d.memory_sizes,
                   help="image sizes, comma-separated (default 1024 for SDXL, else 512,768)")
    p.add_argument("--memory-dtype", default=d.memory_dtype, choices=["float32", "bfloat16"])
    p.add_argument("--memory-budget-gib", type=float, default=d.memory_budget_gib, help="per device (v5e: 16)")
    p.add_argument("--workdir", default=None, help="scratch folder for random models (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the full report to this JSON file")


def from_args(args: argparse.Namespace) -> BenchConfig:
    names = {f.name for f in dataclasses.fields(BenchConfig)}
    return BenchConfig(**{k: v for k, v in vars(args).items() if k in names})


def memory_settings(cfg: BenchConfig) -> tuple[str, tuple[int, ...]]:
    """(memory model, image sizes) of the memory section, the defaults filled in from ``--model``."""
    model = cfg.memory_model or ("sdxl" if cfg.model == "sdxl" else "sd15")
    sizes = cfg.memory_sizes or ((1024,) if model in SDXL_MEMORY_MODELS else (512, 768))
    return model, tuple(sizes)
