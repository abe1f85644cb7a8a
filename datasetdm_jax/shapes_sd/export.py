"""The trained parts as a diffusers-format folder (``export``), and as an in-memory
``pretrained.Pipeline`` (``assemble_pipeline``, also what the fidelity curve samples from)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from datasetdm_jax import pretrained
from datasetdm_jax.shapes_sd import data as sd_data
from datasetdm_jax.shapes_sd import models as sd_models
from datasetdm_jax.shapes_sd import loop as sd_loop
from datasetdm_jax.shapes_sd import vae_stages as sd_vae

__all__ = ["vae_config", "assemble_pipeline", "export"]


def vae_config(info: dict, scaling_factor: float) -> dict:
    """The VAE's config.json as shipped: ``frozen_vae``'s info without its ``_source`` tag, with
    the latent scale measured for (or carried into) the diffusion stage."""
    return {**{k: v for k, v in info.items() if k != "_source"}, "scaling_factor": float(scaling_factor)}


def assemble_pipeline(config: ml_collections.ConfigDict, tokens: sd_data.Tokens, parts: dict,
                      dtype) -> pretrained.Pipeline:
    """A `pretrained.Pipeline` of trained parts, name -> (graph, params, rest, config dict), with
    floating weights in ``dtype``: what ``export`` writes and what the fidelity curve samples from."""
    graphdefs, params, model_configs = {}, {}, {}
    for name, (graph, p, rest, cfg) in parts.items():
        p = jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, p)
        model = nnx.merge(graph, p, rest)
        graphdefs[name], params[name] = nnx.split(model)
        mc = getattr(model, "config", None)  # re-parsed: the VAE's scaling_factor is new
        model_configs[name] = type(mc).from_dict(cfg) if hasattr(mc, "from_dict") else cfg
    return pretrained.Pipeline(
        tokenizer=tokens.tokenizer, graphdefs=graphdefs, params=params, model_configs=model_configs,
        configs={name: cfg for name, (_, _, _, cfg) in parts.items()},
        scheduler_config=sd_data.plain(config.scheduler.to_dict()), dtype=dtype, tokenizer_path=tokens.folder,
        model_index={"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"})


def export(config: ml_collections.ConfigDict, workdir: str, out_dir: str | None = None) -> str:
    """Write the diffusers-format folder via ``pretrained.save_pipeline``: EMA weights of the latest
    diffusion checkpoint, the VAE with its measured ``scaling_factor``, the closed-vocabulary
    tokenizer and SD 1.x's PNDM scheduler config; weights in ``config.export_dtype``. Returns the
    folder (default ``<workdir>/model``)."""
    out_dir = out_dir or config.export_dir or os.path.join(workdir, "model")
    seed = int(config.seed)
    tokens = sd_data.Tokens(sd_data.ensure_tokenizer(workdir, config), config.tokenizer.max_length)
    vg, vp, vr, vae_info = sd_vae.export_vae(config, workdir)
    text_cfg = sd_data.text_encoder_dict(config, tokens.tokenizer)
    unet_cfg = sd_data.plain(config.unet.to_dict())
    ug, up, ur = sd_models.split_params(sd_models.build_model("unet", unet_cfg, seed + 1))
    tg, tp, tr = sd_models.split_params(sd_models.build_model("text_encoder", text_cfg, seed + 2))
    if "diffusion" in config.stages:
        weights, meta = sd_loop.restore_item(workdir, "diffusion", "ema", {"unet": up, "text_encoder": tp},
                                      config.keep_checkpoints)
    else:  # a decoder-only fine-tune of ``init_from``: its UNet and text encoder as they are
        weights = {"unet": sd_models.init_weights(config, "unet", unet_cfg, up),
                   "text_encoder": sd_models.init_weights(config, "text_encoder", text_cfg, tp)}
        source = sd_models.init_pipeline(os.path.abspath(config.init_from))
        meta = {"step": sd_models.init_step(config.init_from),
                "scaling_factor": float(source.configs["vae"]["scaling_factor"])}
    dtype = jnp.dtype(config.export_dtype)
    parts = {"vae": (vg, vp, vr, vae_config(vae_info, meta["scaling_factor"])),
             "unet": (ug, weights["unet"], ur, unet_cfg),
             "text_encoder": (tg, weights["text_encoder"], tr, text_cfg)}
    pipe = assemble_pipeline(config, tokens, parts, dtype)
    path = pretrained.save_pipeline(pipe, out_dir, overwrite=True)
    with open(os.path.join(path, "training.json"), "w") as f:
        json.dump({"diffusion_step": meta.get("init_step", 0) + meta["step"], "weights": "EMA", "dtype": str(dtype),
                   "config": json.loads(config.to_json())}, f, indent=2)
    return str(path)
