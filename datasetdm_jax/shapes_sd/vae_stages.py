"""Stage 1, ``vae``: an AutoencoderKL on shapes images; stage 1b, ``vae_decoder``: its decoder
fine-tuned with the encoder frozen; and the VAE either of them leaves for the diffusion stage and
the export."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from datasetdm_jax.shapes_sd import data as sd_data
from datasetdm_jax.shapes_sd import models as sd_models
from datasetdm_jax.shapes_sd import loop as sd_loop

__all__ = ["DECODER_KEYS", "vae_stage", "frozen_vae", "vae_decoder_stage", "export_vae"]


# The VAE parameters behind z -> image; the rest (encoder, quant_conv) define the latent space.
DECODER_KEYS = ("decoder", "post_quant_conv")


def _kl(mean, logvar):
    """KL(q || N(0, I)) summed over latent elements, per image."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def _psnr(vae, x, mean):
    """Mean PSNR (on the [0, 1] scale) of decode(``mean``, the posterior mean of images ``x`` in [-1, 1])."""
    xr = jnp.clip(sd_models.vae_decode(vae, mean).astype(jnp.float32), -1, 1)
    mse = jnp.mean(jnp.square((xr - x) / 2.0), axis=(1, 2, 3))
    return jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))


def vae_stage(config: ml_collections.ConfigDict, workdir: str) -> sd_loop.Stage:
    vcfg = config.vae
    model_cfg = sd_data.plain(vcfg.model.to_dict())
    graph, params, rest = sd_models.split_params(sd_models.build_model("vae", model_cfg, int(config.seed)))
    l1w, l2w, klw = float(vcfg.l1_weight), float(vcfg.mse_weight), float(vcfg.kl_weight)

    def loss_fn(p, frozen, batch, rng):
        vae = nnx.merge(graph, p, rest)
        x = batch["image"]
        mean, logvar = sd_models.vae_encode(vae, x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        xr = sd_models.vae_decode(vae, z).astype(jnp.float32)
        l1 = jnp.mean(jnp.abs(xr - x))
        l2 = jnp.mean(jnp.square(xr - x))
        kl = jnp.mean(_kl(mean.astype(jnp.float32), logvar.astype(jnp.float32)))
        loss = l1w * l1 + l2w * l2 + klw * kl
        return loss, {"l1": l1, "mse": l2, "kl": kl}

    held = sd_data.heldout_batch(config)
    held_x = jnp.asarray(held["image"])

    def eval_fn(p, frozen):
        vae = nnx.merge(graph, p, rest)
        mean = sd_models.vae_encode(vae, held_x)[0]
        return {"psnr": _psnr(vae, held_x, mean), "latent_std": jnp.std(mean)}

    return sd_loop.Stage("vae", vcfg, params, {}, loss_fn, eval_fn,
                  lambda b: {"image": np.asarray(b["image"], np.float32)}, {"model": model_cfg})


def frozen_vae(config: ml_collections.ConfigDict, workdir: str):
    """The trained VAE: the vae stage's finished checkpoint, or ``config.init_from``'s. The last item
    is its config.json plus ``_source`` (the VAE's identity, checked when the diffusion stage resumes)."""
    model_cfg = sd_data.plain(config.vae.model.to_dict())
    graph, params, rest = sd_models.split_params(sd_models.build_model("vae", model_cfg, int(config.seed)))
    if config.init_from:
        params = sd_models.init_weights(config, "vae", model_cfg, params)
        return graph, params, rest, {**model_cfg, "_source": f"init_from {os.path.abspath(config.init_from)}"}
    params, meta = sd_loop.restore_item(workdir, "vae", "params", params, config.keep_checkpoints)
    if meta["step"] < int(config.vae.steps):
        raise ValueError(f"the VAE checkpoint is at step {meta['step']} of {config.vae.steps}; "
                         "finish the vae stage first")
    return graph, params, rest, {**model_cfg, "_source": meta["step"]}


def vae_decoder_stage(config: ml_collections.ConfigDict, workdir: str) -> sd_loop.Stage:
    """Decoder + post_quant_conv trained on posterior samples of the frozen encoder."""
    dcfg = config.vae_decoder
    graph, base, rest, info = frozen_vae(config, workdir)
    params = {k: base[k] for k in DECODER_KEYS}
    frozen = {k: v for k, v in base.items() if k not in DECODER_KEYS}
    l1w, l2w = float(dcfg.l1_weight), float(dcfg.mse_weight)

    def loss_fn(p, frozen, batch, rng):
        vae = nnx.merge(graph, {**frozen, **p}, rest)
        x = batch["image"]
        mean, logvar = jax.lax.stop_gradient(sd_models.vae_encode(vae, x))
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        xr = sd_models.vae_decode(vae, z).astype(jnp.float32)
        l1, l2 = jnp.mean(jnp.abs(xr - x)), jnp.mean(jnp.square(xr - x))
        return l1w * l1 + l2w * l2, {"l1": l1, "mse": l2}

    held_x = jnp.asarray(sd_data.heldout_batch(config)["image"])

    def eval_fn(p, frozen):
        vae = nnx.merge(graph, {**frozen, **p}, rest)
        return {"psnr": _psnr(vae, held_x, sd_models.vae_encode(vae, held_x)[0])}

    return sd_loop.Stage("vae_decoder", dcfg, params, frozen, loss_fn, eval_fn,
                  lambda b: {"image": np.asarray(b["image"], np.float32)},
                  {"vae_step": info["_source"]})


def export_vae(config: ml_collections.ConfigDict, workdir: str):
    """The VAE to ship: the frozen one, with the ``vae_decoder`` stage's decoder when that stage is
    configured (it must have finished, and on this VAE's encoder)."""
    graph, params, rest, info = frozen_vae(config, workdir)
    if "vae_decoder" not in config.stages:
        return graph, params, rest, info
    dec, meta = sd_loop.restore_item(workdir, "vae_decoder", "params", {k: params[k] for k in DECODER_KEYS},
                              config.keep_checkpoints)
    if meta["step"] < int(config.vae_decoder.steps) or meta.get("vae_step") != info["_source"]:
        raise ValueError(f"the vae_decoder checkpoint (step {meta['step']}, VAE {meta.get('vae_step')!r}) "
                         f"is not a finished fine-tune of the VAE {info['_source']!r}")
    return graph, {**params, **dec}, rest, info
