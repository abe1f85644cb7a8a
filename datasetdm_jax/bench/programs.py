"""The jitted programs the bench compiles: UNet forward (+capture), one sampler step, and full
generation, each with its arguments (real arrays, or `ShapeDtypeStruct`s for compile-only use).

Batch-leading arguments are split over a `('data',)` mesh of `devices` local devices; weights
are replicated. Generation is `generate.build_sampler_fn`: the same one-jit program as
`generate.sample` (text encoding, every step, last-step capture, VAE decode).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from datasetdm_jax import features, generate, schedulers
from datasetdm_jax.devices import MeshJit, data_mesh, data_shardings
from datasetdm_jax.models.clip_text import PromptEmbeds
from datasetdm_jax.pretrained import Pipeline

PROMPT = "a red circle and a blue person on a light striped background"


@dataclasses.dataclass
class Program:
    fn: Callable
    args: tuple
    devices: int


def _put(x: Any, sharding: NamedSharding, abstract: bool):
    if abstract:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), x)
    return jax.device_put(x, sharding)


def _is_abstract(pipe: Pipeline) -> bool:
    return isinstance(jax.tree.leaves(pipe.params["unet"])[0], jax.ShapeDtypeStruct)


def latent_shape(pipe: Pipeline, size: int) -> tuple[int, int, int]:
    f = pipe.vae_scale_factor
    if size % f:
        raise ValueError(f"--size must be a multiple of {f} for this model, got {size}")
    return size // f, size // f, int(pipe.configs["unet"].get("in_channels", 4))


def generation(pipe: Pipeline, batch: int, size: int, *, steps: int, scheduler: str, guidance: float = 7.5,
               capture: str | None = None, devices: int | None = None) -> Program:
    """Full text-to-image generation of `batch` images (all steps in one jit)."""
    mesh = data_mesh(batch, devices)
    abstract = _is_abstract(pipe)
    repl, data = data_shardings(mesh)
    h, w, _ = latent_shape(pipe, size)
    fn = generate.build_sampler_fn(pipe, steps=steps, guidance=guidance, scheduler=scheduler, latent_hw=(h, w),
                                   capture=capture)
    cond = np.asarray(pipe.tokenize([PROMPT] * batch), np.int32)
    uncond = np.asarray(pipe.tokenize([""] * batch), np.int32)
    args = (_put(pipe.params, repl, abstract), _put(cond, data, abstract), _put(uncond, data, abstract),
            _put(np.arange(batch, dtype=np.int32), data, abstract), _put(np.int32(0), repl, abstract))
    return Program(MeshJit(fn, mesh), args, mesh.size)


def loop_trips(pipe: Pipeline, steps: int, scheduler: str, capture: str | None) -> int:
    """Iterations of the sampler's `fori_loop` (the capture step runs outside the loop)."""
    n = len(schedulers.get_sampler(scheduler).timesteps(pipe.schedule, steps))
    return n - 1 if capture else n


def _inputs(pipe: Pipeline, batch: int, size: int, mesh: Mesh, abstract: bool):
    """CFG-batch inputs: x (batch images) and emb (2 * batch rows), batch-sharded; SDXL's emb is a
    `PromptEmbeds` (pooled rows batch-sharded, the image size's time ids replicated)."""
    repl, data = data_shardings(mesh)
    shape = latent_shape(pipe, size)
    dim = int(pipe.configs["unet"]["cross_attention_dim"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape), np.float32).astype(pipe.dtype)
    emb = rng.standard_normal((2 * batch, pipe.max_length, dim), np.float32).astype(pipe.dtype)
    x, emb = _put(x, data, abstract), _put(emb, data, abstract)
    if not pipe.is_sdxl:
        return x, emb
    pooled = rng.standard_normal((2 * batch, int(pipe.configs["text_encoder_2"]["projection_dim"])), np.float32)
    return x, PromptEmbeds(emb, _put(pooled.astype(pipe.dtype), data, abstract),
                           _put(pipe.time_ids(shape[:2]), repl, abstract))


def unet_forward(pipe: Pipeline, batch: int, size: int, *, capture: str | None = None,
                 devices: int | None = None) -> Program:
    """One UNet call on the CFG batch of `batch` images (2 * batch rows), optionally capturing."""
    mesh = data_mesh(batch, devices)
    abstract = _is_abstract(pipe)
    gd = pipe.graphdefs["unet"]
    x, emb = _inputs(pipe, batch, size, mesh, abstract)

    def run(params, x, emb):
        x2 = jnp.concatenate([x, x])
        t = jnp.full((x2.shape[0],), 500.0, jnp.float32)
        if capture is None:
            return nnx.merge(gd, params)(x2, t, emb)
        eps, taps = nnx.merge(gd, params)(x2, t, emb, capture=True)
        return eps, features.extract(taps, capture, batch)

    params = _put(pipe.params["unet"], data_shardings(mesh)[0], abstract)
    return Program(MeshJit(run, mesh), (params, x, emb), mesh.size)


def sampler_step(pipe: Pipeline, batch: int, size: int, *, steps: int, scheduler: str, guidance: float = 7.5,
                 devices: int | None = None) -> Program:
    """One denoising step as the loop runs it: CFG UNet call, guidance, scheduler update."""
    mesh = data_mesh(batch, devices)
    abstract = _is_abstract(pipe)
    gd = pipe.graphdefs["unet"]
    sampler = schedulers.get_sampler(scheduler)
    cfg = pipe.schedule
    x, emb = _inputs(pipe, batch, size, mesh, abstract)
    state = jax.eval_shape(lambda x: sampler.init(cfg, steps, x), x) if abstract else \
        jax.jit(lambda x: sampler.init(cfg, steps, x))(x)

    def run(params, x, emb, state, i):
        x2 = jnp.concatenate([x, x])
        t = jnp.broadcast_to(state["timesteps"][i], (x2.shape[0],))
        uncond, cond = jnp.split(nnx.merge(gd, params)(x2, t, emb), 2)
        return sampler.step(state, uncond + guidance * (cond - uncond), i, x)

    params = _put(pipe.params["unet"], data_shardings(mesh)[0], abstract)
    i = jax.ShapeDtypeStruct((), jnp.int32) if abstract else jnp.int32(1)
    return Program(MeshJit(run, mesh), (params, x, emb, state, i), mesh.size)
