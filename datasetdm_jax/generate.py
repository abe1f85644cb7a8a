"""Text-to-image sampling with classifier-free guidance, every step inside one jit.

The jitted program takes token ids and per-example indices and returns images (and, on request,
the features captured at the last step): prompt encoding, the whole sampler loop, capture and VAE
decode run on device without host round trips. Initial noise for example `i` is drawn from
`fold_in(PRNGKey(seed), i)`, so an image depends on its global index only, never on the batch
it shares or on how many devices or hosts run.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from datasetdm_jax import devices, features, schedulers, sharding


def initial_noise(seed: int, indices: jax.Array, shape: tuple[int, ...], dtype=jnp.float32,
                  stream: int = 0) -> jax.Array:
    """x_T for each global example index: (len(indices), *shape), independent of batching.
    ``stream`` > 0 draws another independent noise per index (e.g. for re-noising the result)."""
    base = jax.random.PRNGKey(seed)
    if stream:
        base = jax.random.fold_in(base, 2**31 - int(stream))
    draw = lambda i: jax.random.normal(jax.random.fold_in(base, i), shape, jnp.float32)
    return jax.vmap(draw)(indices).astype(dtype)


# The pieces every text-to-image sampler here is built from (plain generation, and the attention
# labellers that also read attention inside the same loop), so they draw identical images.


def sampler_modules(pipe, params) -> tuple[Any, nnx.Module, nnx.Module]:
    """(text encoder, UNet, VAE) merged from ``params`` (``pipe.params``), inside a jitted function;
    SDXL's text encoder is both towers (`Pipeline.prompt_encoder`)."""
    return (pipe.prompt_encoder(params), *(nnx.merge(pipe.graphdefs[k], params[k]) for k in ("unet", "vae")))


def prompt_embeddings(pipe, text, cond_ids: jax.Array, uncond_ids: jax.Array,
                      latent_hw: tuple[int, int] | None = None):
    """[uncond; cond] text embeddings: classifier-free guidance's batch-2x context. SDXL: a
    `PromptEmbeds` whose pooled rows come from the same prompts and whose time ids are the default
    ones for an image of latent size ``latent_hw`` (`Pipeline.time_ids`)."""
    emb = text.encode(jnp.concatenate([uncond_ids, cond_ids]), clip_skip=pipe.clip_skip)
    return pipe.conditioning(emb, latent_hw) if pipe.is_sdxl else emb


def latent_noise(pipe, seed: int, indices: jax.Array, latent_hw: tuple[int, int]) -> jax.Array:
    """x_T of the pipeline's UNet for each global example index."""
    return initial_noise(seed, indices, (*latent_hw, int(pipe.configs["unet"].get("in_channels", 4))), pipe.dtype)


def guided_unet(unet: nnx.Module, x: jax.Array, t: jax.Array, emb: jax.Array, guidance: float, **kwargs):
    """One batch-2x UNet call with classifier-free guidance: (guided eps, the UNet's extra output
    (captured taps / attention) or None). ``kwargs`` go to the UNet (``capture``, ``attention``)."""
    x2 = jnp.concatenate([x, x])
    out = unet(x2, jnp.broadcast_to(t, (x2.shape[0],)), emb, **kwargs)
    eps, extra = out if isinstance(out, tuple) else (out, None)
    uncond, cond = jnp.split(eps, 2)
    return uncond + guidance * (cond - uncond), extra


def renoised_features(pipe, unet: nnx.Module, emb: jax.Array, z: jax.Array, seed: int, indices: jax.Array,
                      timestep: int, capture: str, guidance: float):
    """Features of one captured UNet pass on the final latents noised to ``timestep``: exactly what a
    P-Decoder trained at that timestep saw on real images (``train.Trainer.features``), at the cost
    of one more UNet call. The noise is stream 1 of each example's index."""
    noise = initial_noise(seed, indices, z.shape[1:], z.dtype, stream=1)
    zt = schedulers.add_noise(pipe.schedule, z, noise, timestep)
    _, taps = guided_unet(unet, zt, jnp.float32(timestep), emb, guidance, capture=True)
    return features.extract(taps, capture, z.shape[0])


def pass_features(pipe, unet: nnx.Module, emb: jax.Array, z: jax.Array, seed: int, indices: jax.Array,
                  passes: Sequence[int | None], capture: str, guidance: float, last_step=None) -> tuple:
    """Features per feature pass: ``None`` -> ``last_step`` (the final sampler step's, captured in
    the loop), a timestep -> `renoised_features` at it (one more UNet call each)."""
    return tuple(last_step if p is None else renoised_features(pipe, unet, emb, z, seed, indices, p, capture, guidance)
                 for p in passes)


def _unit_images(images: jax.Array) -> jax.Array:
    return jnp.clip((images.astype(jnp.float32) + 1) / 2, 0, 1)


def decode_latents(pipe, vae: nnx.Module, z: jax.Array) -> jax.Array:
    """Final latents -> NHWC images in [0, 1] (fp32)."""
    return _unit_images(vae.decode(z / pipe.scaling_factor + pipe.shift_factor))


def decode_with_vae_maps(pipe, vae: nnx.Module, z: jax.Array, feats: tuple,
                         vae_features: Sequence[int] = ()) -> tuple[jax.Array, tuple]:
    """Final latents -> (images in [0, 1], ``feats`` with the VAE decoder's maps at ``vae_features``
    added to each pass's `Features`, `features.vae_maps`): the decode that makes the images also
    gives the decoders their high-resolution levels, as ``train.Trainer.features`` does on real images."""
    if not vae_features or not feats:
        return decode_latents(pipe, vae, z), feats
    images, taps = vae.decode(z / pipe.scaling_factor + pipe.shift_factor, capture=True)
    extra = features.vae_maps(taps, vae_features)
    return _unit_images(images), tuple(features.add_maps(f, extra) for f in feats)


def build_sampler_fn(pipe, *, steps: int, guidance: float, scheduler: str, latent_hw: tuple[int, int],
                     capture: str | None = None, feature_passes: Sequence[int | None] = (None,),
                     vae_features: Sequence[int] = ()):
    """A pure function (params, cond_ids, uncond_ids, indices, seed) -> (images in [0, 1], features).

    Features (with a ``capture`` preset): a tuple, one per entry of ``feature_passes``: ``None`` the
    last sampler step's (the official choice, captured in the loop), a timestep those of one extra
    pass on the result re-noised to it (`renoised_features`); so decoders trained at different
    timesteps label one sampler pass. Each also holds the VAE decoder's maps at ``vae_features``
    (`decode_with_vae_maps`). `params` is `pipe.params`; wrap in `jax.jit` (the pipeline caches one
    per setting).
    """
    sampler = schedulers.get_sampler(scheduler)
    passes = tuple(feature_passes) if capture is not None else ()

    def run(params, cond_ids, uncond_ids, indices, seed):
        text, unet, vae = sampler_modules(pipe, params)
        emb = prompt_embeddings(pipe, text, cond_ids, uncond_ids, latent_hw)
        x_T = latent_noise(pipe, seed, indices, latent_hw)

        def model_fn(x, t):
            return guided_unet(unet, x, t, emb, guidance)[0]

        def last_model_fn(x, t):
            eps, taps = guided_unet(unet, x, t, emb, guidance, capture=True)
            return eps, features.extract(taps, capture, x.shape[0])

        if None in passes:
            z, last = schedulers.sample_loop(sampler, pipe.schedule, steps, model_fn, x_T, last_model_fn)
        else:
            z, last = schedulers.sample_loop(sampler, pipe.schedule, steps, model_fn, x_T), None
        feats = pass_features(pipe, unet, emb, z, seed, indices, passes, capture, guidance, last)
        return decode_with_vae_maps(pipe, vae, z, feats, vae_features)

    return run


# Per pipeline (dropped with it): its jitted samplers by (devices, setting), and its parameters
# placed on a mesh's devices (once, not copied again on every call).
_SAMPLERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_PLACED: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()


def _compiled(pipe, mesh: Mesh, param_sharding: str, **settings):
    """One jit per pipeline, device mesh, parameter placement (`sharding.param_shardings`) and
    setting (steps, guidance, scheduler, size, capture): the batch split over the mesh's ``data`` axis."""
    key = (tuple(d.id for d in mesh.devices.flat), param_sharding, tuple(sorted(settings.items())))
    cache = _SAMPLERS.setdefault(pipe, {})
    if key not in cache:
        repl, data = devices.data_shardings(mesh)
        params = sharding.param_shardings(pipe.params, mesh, param_sharding)
        cache[key] = devices.MeshJit(build_sampler_fn(pipe, **settings), mesh,
                                     in_shardings=(params, data, data, data, repl), out_shardings=data)
    return cache[key]


def _placed_params(pipe, mesh: Mesh, param_sharding: str):
    """``pipe.params`` on the devices of ``mesh`` (replicated or FSDP-sharded), placed once per
    parameter set."""
    params, placement = pipe.params, (tuple(d.id for d in mesh.devices.flat), param_sharding)
    hit = _PLACED.get(pipe)  # (the parameter dict itself, placement, its copy): identity, not id()
    if hit is None or hit[0] is not params or hit[1] != placement:
        hit = (params, placement, jax.device_put(params, sharding.param_shardings(params, mesh, param_sharding)))
        _PLACED[pipe] = hit
    return hit[2]


FEATURE_PASSES = ("last_step", "renoise")


def feature_pass(g, timestep: int) -> int | None:
    """A decoder's ``generate.feature_pass``: 'last_step' (official: the final sampler step's
    features) -> None; 'renoise' -> ``timestep``, the one it was trained at."""
    mode = str(g.get("feature_pass", "last_step"))
    if mode not in FEATURE_PASSES:
        raise ValueError(f"generate.feature_pass must be one of {FEATURE_PASSES}, got {mode!r}")
    return None if mode == "last_step" else int(timestep)


def describe_pass(p: int | None) -> str:
    return "last_step" if p is None else f"renoise t={p}"


def latent_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    size = pipe.configs["unet"].get("sample_size", 64)
    size = (size, size) if isinstance(size, int) else tuple(size)
    f = pipe.vae_scale_factor
    h, w = (height or size[0] * f), (width or size[1] * f)
    if h % f or w % f:
        raise ValueError(f"height and width must be multiples of {f}, got {h}x{w}")
    return h // f, w // f


def sample(pipe, prompts: Sequence[str], steps: int = 25, guidance: float = 7.5, scheduler: str = "ddim",
           seed: int = 0, *, height: int | None = None, width: int | None = None, negative_prompt: str = "",
           start_index: int = 0, num_devices: int | None = None, param_sharding: str = "replicated") -> np.ndarray:
    """NHWC images in [0, 1] for `prompts` (no labels), through the same jitted sampler as generation.

    Example `k` of the call uses the noise of global index `start_index + k`, so the images do not
    depend on the batch or on the device count. The batch is split over all local devices (at most
    ``num_devices``), padded to a multiple of their count. ``param_sharding``: 'replicated' or
    'fsdp' (large weights split over those devices, `sharding.py`); the images are the same.
    """
    images, _ = sample_with_features(pipe, prompts, steps, guidance, scheduler, seed, capture=None, height=height,
                                     width=width, negative_prompt=negative_prompt, start_index=start_index,
                                     num_devices=num_devices, param_sharding=param_sharding)
    return images


def sample_with_features(pipe, prompts: Sequence[str], steps: int = 25, guidance: float = 7.5,
                         scheduler: str = "ddim", seed: int = 0, *, capture: str | None = "datasetdm",
                         height: int | None = None, width: int | None = None, negative_prompt: str = "",
                         start_index: int = 0, num_devices: int | None = None, param_sharding: str = "replicated"):
    """Like `sample`, plus the features captured at the last denoising step (`features.Features`,
    device arrays split over the devices like the batch)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("sample: no prompts given")
    n = len(prompts)
    local = jax.local_devices()
    count = max(1, min(int(num_devices or len(local)), len(local)))
    mesh = devices.data_mesh(count, count)
    padded = -(-n // count) * count
    fn = _compiled(pipe, mesh, sharding.check_mode(param_sharding), steps=int(steps), guidance=float(guidance),
                   scheduler=scheduler, latent_hw=latent_size(pipe, height, width), capture=capture)
    texts = prompts + prompts[-1:] * (padded - n)
    cond = np.asarray(pipe.tokenize(texts), np.int32)
    uncond = np.asarray(pipe.tokenize([negative_prompt] * padded), np.int32)
    indices = np.arange(start_index, start_index + padded, dtype=np.int32)
    repl, data = devices.data_shardings(mesh)
    cond, uncond, indices = jax.device_put((cond, uncond, indices), data)
    seed_arr = jax.device_put(np.int32(seed), repl)
    images, feats = fn(_placed_params(pipe, mesh, param_sharding), cond, uncond, indices, seed_arr)
    feats = feats[0] if feats else None
    if padded != n and feats is not None:
        feats = jax.tree.map(lambda x: x[:n], feats)
    return np.asarray(images)[:n], feats
