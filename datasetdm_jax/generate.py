"""Text-to-image sampling with classifier-free guidance, every step inside one jit.

The jitted program takes token ids and per-example indices and returns images (and, on request,
the features captured at the last step): prompt encoding, the whole sampler loop, capture and VAE
decode run on device without host round trips. Initial noise for example `i` is drawn from
`fold_in(PRNGKey(seed), i)`, so an image depends on its global index only, never on the batch
it shares or on how many devices or hosts run.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from datasetdm_jax import features, schedulers


def initial_noise(seed: int, indices: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """x_T for each global example index: (len(indices), *shape), independent of batching."""
    base = jax.random.PRNGKey(seed)
    draw = lambda i: jax.random.normal(jax.random.fold_in(base, i), shape, jnp.float32)
    return jax.vmap(draw)(indices).astype(dtype)


def _guided(eps: jax.Array, guidance: float) -> jax.Array:
    uncond, cond = jnp.split(eps, 2)
    return uncond + guidance * (cond - uncond)


def build_sampler_fn(pipe, *, steps: int, guidance: float, scheduler: str, latent_hw: tuple[int, int],
                     capture: str | None = None):
    """A pure function (params, cond_ids, uncond_ids, indices, seed) -> (images in [0, 1], features).

    `params` is `pipe.params`; wrap in `jax.jit` (the pipeline caches one per setting).
    """
    sampler = schedulers.get_sampler(scheduler)
    cfg = pipe.schedule
    gds = pipe.graphdefs
    clip_skip, scale, shift = pipe.clip_skip, pipe.scaling_factor, pipe.shift_factor
    latent_channels = int(pipe.configs["unet"].get("in_channels", 4))

    def run(params, cond_ids, uncond_ids, indices, seed):
        text = nnx.merge(gds["text_encoder"], params["text_encoder"])
        unet = nnx.merge(gds["unet"], params["unet"])
        vae = nnx.merge(gds["vae"], params["vae"])
        emb = text.encode(jnp.concatenate([uncond_ids, cond_ids]), clip_skip=clip_skip)
        x_T = initial_noise(seed, indices, (*latent_hw, latent_channels), pipe.dtype)

        def model_fn(x, t):
            x2 = jnp.concatenate([x, x])
            return _guided(unet(x2, jnp.broadcast_to(t, (x2.shape[0],)), emb), guidance)

        def last_model_fn(x, t):
            x2 = jnp.concatenate([x, x])
            eps, taps = unet(x2, jnp.broadcast_to(t, (x2.shape[0],)), emb, capture=True)
            return _guided(eps, guidance), features.extract(taps, capture, x.shape[0])

        if capture is None:
            z, feats = schedulers.sample_loop(sampler, cfg, steps, model_fn, x_T), None
        else:
            z, feats = schedulers.sample_loop(sampler, cfg, steps, model_fn, x_T, last_model_fn)
        images = vae.decode(z / scale + shift)
        return jnp.clip((images.astype(jnp.float32) + 1) / 2, 0, 1), feats

    return run


def _compiled(pipe, **settings):
    """One jit per pipeline and setting (steps, guidance, scheduler, size, capture)."""
    key = ("generate", tuple(sorted(settings.items())))
    return pipe._jit(key, build_sampler_fn(pipe, **settings))


def _latent_hw(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    size = pipe.configs["unet"].get("sample_size", 64)
    size = (size, size) if isinstance(size, int) else tuple(size)
    f = pipe.vae_scale_factor
    h, w = (height or size[0] * f), (width or size[1] * f)
    if h % f or w % f:
        raise ValueError(f"height and width must be multiples of {f}, got {h}x{w}")
    return h // f, w // f


def sample(pipe, prompts: Sequence[str], steps: int = 25, guidance: float = 7.5, scheduler: str = "ddim",
           seed: int = 0, *, height: int | None = None, width: int | None = None, negative_prompt: str = "",
           start_index: int = 0) -> np.ndarray:
    """NHWC images in [0, 1] for `prompts` (no labels), through the same jitted sampler as generation.

    Example `k` of the call uses the noise of global index `start_index + k`.
    """
    images, _ = sample_with_features(pipe, prompts, steps, guidance, scheduler, seed, capture=None, height=height,
                                     width=width, negative_prompt=negative_prompt, start_index=start_index)
    return images


def sample_with_features(pipe, prompts: Sequence[str], steps: int = 25, guidance: float = 7.5,
                         scheduler: str = "ddim", seed: int = 0, *, capture: str | None = "datasetdm",
                         height: int | None = None, width: int | None = None, negative_prompt: str = "",
                         start_index: int = 0):
    """Like `sample`, plus the features captured at the last denoising step (`features.Features`)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("sample: no prompts given")
    fn = _compiled(pipe, steps=int(steps), guidance=float(guidance), scheduler=scheduler,
                   latent_hw=_latent_hw(pipe, height, width), capture=capture)
    cond = pipe.tokenize(prompts)
    uncond = pipe.tokenize([negative_prompt] * len(prompts))
    indices = jnp.arange(start_index, start_index + len(prompts), dtype=jnp.int32)
    images, feats = fn(pipe.params, cond, uncond, indices, jnp.int32(seed))
    return np.asarray(images), feats
