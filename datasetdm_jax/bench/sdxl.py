"""SDXL's memory and FLOPs from the compiled programs alone (never run, no weights).

The real SDXL base architecture (`models.presets`) is built abstractly (`abstract_module`: every
parameter a `jax.ShapeDtypeStruct`), and each program is lowered and compiled for the local
backend with those abstract arguments; XLA's memory analysis gives the peak (arguments + outputs +
temporaries) and its cost analysis the FLOPs of one call. Programs, at `--size` px (1024: 128x128
latents) and batch B images:

* `unet_cfg`: one classifier-free-guided UNet call (2B rows: uncond then cond), the sampler's step;
* `unet_cfg_capture`: the same with the `datasetdm` feature capture (the last step's);
* `text`: both text encoders on 2B prompts of 77 tokens;
* `vae_decode`: the VAE decoder on B latents (float32 when SDXL's VAE is force_upcast under fp16).

With ``--devices N`` each program is compiled for a ``data`` mesh of N devices (on the CPU backend,
N host devices), B images per device; ``--param-sharding fsdp`` splits the large weights over them
(`sharding.py`). The memory analysis is then one device's: compare replicated and fsdp there.

    python -m datasetdm_jax.bench.sdxl --size 1024 --batches 1 2 4 --dtype bfloat16
    python -m datasetdm_jax.bench.sdxl --size 1024 --batches 1 --devices 8 --param-sharding fsdp
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

import jax
import jax.numpy as jnp
from flax import nnx

from datasetdm_jax import devices, features, sharding, smoke
from datasetdm_jax.bench.timing import compile_fn
from datasetdm_jax.models import presets
from datasetdm_jax.models.abstract import abstract_module
from datasetdm_jax.models.clip_text import (CLIPTextModel, CLIPTextModelWithProjection, PromptEmbeds,
                                            SDXLTextEncoders)
from datasetdm_jax.models.unet import UNet2DConditionModel
from datasetdm_jax.models.vae import AutoencoderKL

GIB = 2**30
TOKENS = 77
SDXL_BASE = {"unet": presets.SDXL_UNET, "text_encoder": presets.SDXL_TEXT_ENCODER,
             "text_encoder_2": presets.SDXL_TEXT_ENCODER_2, "vae": presets.SDXL_VAE}
# The tiny SDXL's layout (`datasetdm bench --model sdxl` times it), for fast compile-only checks.
TINY_SDXL = {"unet": smoke.TINY_SDXL_UNET, "text_encoder": {**smoke.TINY_SDXL_TEXT, "vocab_size": 1000},
             "text_encoder_2": {**smoke.TINY_SDXL_TEXT_2, "vocab_size": 1000}, "vae": smoke.TINY_SDXL_VAE}
ARCHITECTURES = {"sdxl": SDXL_BASE, "tiny_sdxl": TINY_SDXL}


def abstract_split(cls, config: dict, dtype) -> tuple[Any, Any]:
    """(graphdef, abstract state) of `cls(config)` with parameters in `dtype`."""
    return nnx.split(abstract_module(lambda rngs: cls(config, dtype=dtype, param_dtype=dtype, rngs=rngs)))


def programs(size: int, batch: int, dtype, configs: dict[str, dict] = SDXL_BASE,
             param_sharding: str = "replicated", mesh=None) -> dict[str, tuple]:
    """name -> (function, abstract arguments) for one batch of `batch` images of `size` px, for the
    architecture `configs` (config.json dicts of unet, text_encoder, text_encoder_2, vae). With a
    ``data`` `mesh`, the batch-leading arguments are split over it and the weights placed by
    `param_sharding` (`sharding.param_shardings`); without, they are unplaced (one device)."""
    lat = size // 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    unet_gd, unet_state = abstract_split(UNet2DConditionModel, configs["unet"], dtype)
    t1_gd, t1_state = abstract_split(CLIPTextModel, configs["text_encoder"], dtype)
    t2_gd, t2_state = abstract_split(CLIPTextModelWithProjection, configs["text_encoder_2"], dtype)
    upcast = jnp.dtype(dtype) == jnp.float16 and configs["vae"].get("force_upcast", True)
    vae_dtype = jnp.float32 if upcast else dtype
    vae_gd, vae_state = abstract_split(AutoencoderKL, configs["vae"], vae_dtype)
    repl, split = devices.data_shardings(mesh) if mesh is not None else (None, None)
    if mesh is not None:
        unet_state, t1_state, t2_state, vae_state = (
            jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state,
                         sharding.param_shardings(state, mesh, param_sharding))
            for state in (unet_state, t1_state, t2_state, vae_state))
    spec = lambda shape, dt, sh=split: jax.ShapeDtypeStruct(shape, dt, sharding=sh)  # noqa: E731
    rows = 2 * batch
    x = spec((batch, lat, lat, configs["unet"].get("in_channels", 4)), dtype)
    hidden = configs["text_encoder"]["hidden_size"] + configs["text_encoder_2"]["hidden_size"]
    emb = PromptEmbeds(spec((rows, TOKENS, hidden), dtype), spec((rows, configs["text_encoder_2"]["projection_dim"]), dtype),
                       spec((6,), jnp.float32, repl))

    def guided(state, x, emb, capture):
        x2 = jnp.concatenate([x, x])
        out = nnx.merge(unet_gd, state)(x2, jnp.full((rows,), 500.0), emb, capture=capture)
        if not capture:
            return out
        eps, taps = out
        return eps, features.extract(taps, "datasetdm", batch)

    def text(s1, s2, ids):
        return SDXLTextEncoders(nnx.merge(t1_gd, s1), nnx.merge(t2_gd, s2)).encode(ids)

    return {
        "unet_cfg": (lambda s, x, e: guided(s, x, e, False), (unet_state, x, emb)),
        "unet_cfg_capture": (lambda s, x, e: guided(s, x, e, True), (unet_state, x, emb)),
        "text": (text, (t1_state, t2_state, spec((rows, 2, TOKENS), jnp.int32))),
        "vae_decode": (lambda s, z: nnx.merge(vae_gd, s).decode(z),
                       (vae_state, spec((batch, lat, lat, configs["vae"].get("latent_channels", 4)), vae_dtype))),
    }


def report(size: int, batches: list[int], dtype, names: list[str] | None = None,
           configs: dict[str, dict] = SDXL_BASE, *, num_devices: int = 1,
           param_sharding: str = "replicated", out: TextIO = sys.stdout) -> list[dict]:
    """One row per program and batch (printed to `out` as JSON lines as they come): peak, argument and
    temporary GiB of one device, GFLOP of one call, compile seconds. Batches are per device: with
    `num_devices` > 1 each program runs on a ``data`` mesh of that many local devices."""
    sharding.check_mode(param_sharding)
    if not 1 <= num_devices <= jax.local_device_count():
        raise ValueError(f"--devices must be between 1 and the {jax.local_device_count()} local devices, got {num_devices}")
    rows = []
    for batch in batches:
        mesh = devices.data_mesh(batch * num_devices, num_devices) if num_devices > 1 else None
        for name, (fn, args) in programs(size, batch * num_devices, dtype, configs, param_sharding, mesh).items():
            if names and name not in names:
                continue
            c = compile_fn(devices.MeshJit(fn, mesh) if mesh is not None else fn, *args)
            gib = lambda n: round(n / GIB, 4)  # noqa: E731
            rows.append({"program": name, "size": size, "batch": batch, "devices": num_devices,
                         "param_sharding": param_sharding, "dtype": jnp.dtype(dtype).name,
                         "peak_gib": gib(c.peak_bytes), "argument_gib": gib(c.memory.get("argument", 0)),
                         "temp_gib": gib(c.memory.get("temp", 0)), "gflop": round(c.gflop, 3),
                         "compile_s": round(c.compile_s, 1)})
            print(json.dumps(rows[-1]), file=out, flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="images per device")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--programs", nargs="*", default=None)
    p.add_argument("--devices", type=int, default=1,
                   help="data-mesh devices (on CPU: that many host devices, for compile-only analysis)")
    p.add_argument("--param-sharding", default="replicated", choices=sharding.MODES)
    a = p.parse_args(argv)
    if a.devices > 1 and jax.config.jax_num_cpu_devices < a.devices:
        jax.config.update("jax_num_cpu_devices", a.devices)  # the CPU backend only; before it starts
    report(a.size, a.batches, jnp.dtype(a.dtype), a.programs, num_devices=a.devices, param_sharding=a.param_sharding)


if __name__ == "__main__":
    main()
