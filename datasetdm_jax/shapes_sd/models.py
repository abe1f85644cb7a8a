"""The shapes-world SD's models: built from their config dicts, split into (graph, params, rest),
and warm-started from a diffusers folder (``config.init_from``)."""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Collection, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from datasetdm_jax import pretrained
from datasetdm_jax.models import deepen
from datasetdm_jax.models.clip_text import CLIPTextModel
from datasetdm_jax.models.unet import UNet2DConditionModel
from datasetdm_jax.models.vae import AutoencoderKL
from datasetdm_jax.shapes_sd import data as sd_data

__all__ = ["build_model", "split_params", "init_pipeline", "config_conflicts", "init_weights", "init_step",
           "vae_encode", "vae_decode"]


def build_model(kind: str, cfg: Mapping[str, Any], seed: int, dtype=jnp.float32) -> nnx.Module:
    rngs = nnx.Rngs(seed)
    if kind == "vae":
        return AutoencoderKL(dict(cfg), dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    if kind == "unet":
        return UNet2DConditionModel(dict(cfg), dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    if kind == "text_encoder":
        return CLIPTextModel(dict(cfg), dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    raise ValueError(kind)


def split_params(model: nnx.Module):
    """(graphdef, trainable params as a pure dict, the rest)."""
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    return graph, nnx.to_pure_dict(params), rest


@functools.lru_cache(maxsize=1)
def init_pipeline(folder: str) -> pretrained.Pipeline:
    return pretrained.load_pipeline(folder, jnp.float32)


def config_conflicts(cfg: Mapping[str, Any], theirs: Mapping[str, Any], ignore: Collection[str] = ()) -> list[str]:
    """Keys that ``cfg`` sets and a folder's config.json ``theirs`` holds with another value (private
    ``_`` keys and the VAE's export-time ``scaling_factor`` aside): what stops a warm start."""
    return sorted(k for k, v in cfg.items()
                  if not k.startswith("_") and k != "scaling_factor" and k not in ignore
                  and k in theirs and sd_data.plain(theirs[k]) != sd_data.plain(v))


def init_weights(config: ml_collections.ConfigDict, name: str, cfg: Mapping[str, Any],
                  params: dict) -> dict:
    """``name``'s fp32 weights from the ``config.init_from`` folder, in the tree of ``params``.

    The folder's config.json must agree with ``cfg`` on every key ``cfg`` sets, so the exported
    folder describes the weights it holds. One exception: a UNet may be configured deeper (larger
    ``layers_per_block``) than the folder's; it is then grown without changing its function
    (``models.deepen``), so a plateaued model continues with more capacity."""
    pipe = init_pipeline(os.path.abspath(config.init_from))
    theirs = pipe.configs[name]
    deeper = name == "unet" and cfg.get("layers_per_block", 0) > theirs.get("layers_per_block", 0)
    growable = {"layers_per_block"} if deeper else set()
    diff = config_conflicts(cfg, theirs, growable)
    if diff:
        raise ValueError(f"init_from: {config.init_from}/{name}/config.json differs from the config on "
                         + ", ".join(f"{k} ({theirs[k]!r} there, {cfg[k]!r} here)" for k in diff))
    loaded = nnx.to_pure_dict(nnx.state(pipe.module(name), nnx.Param))
    if growable:
        loaded = deepen.deepen_unet_params(jax.tree.map(np.asarray, loaded), jax.tree.map(np.asarray, params),
                                           int(theirs["layers_per_block"]), int(cfg["layers_per_block"]))
    if jax.tree.structure(loaded) != jax.tree.structure(params):
        raise ValueError(f"init_from: {config.init_from}/{name} does not have the configured parameter tree")
    return jax.tree.map(lambda x: np.asarray(x, np.float32), loaded)


def init_step(folder: str) -> int | None:
    """The diffusion step recorded in a folder written by ``export`` (None for other folders)."""
    path = os.path.join(folder, "training.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("diffusion_step")


def vae_encode(vae, x):
    """Posterior (mean, logvar) of the VAE, whatever the exact return type of ``encode``."""
    out = vae.encode(x)
    if hasattr(out, "mean") and hasattr(out, "logvar"):
        return out.mean, out.logvar
    if hasattr(out, "latent_dist"):
        return out.latent_dist.mean, out.latent_dist.logvar
    mean, logvar = out
    return mean, logvar


def vae_decode(vae, z):
    out = vae.decode(z)
    return out.sample if hasattr(out, "sample") else out
