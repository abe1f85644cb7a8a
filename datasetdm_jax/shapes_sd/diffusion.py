"""Stage 2, ``diffusion``: the UNet and text encoder trained on the frozen VAE's latents, with the
held-out eps-MSE proxy and, optionally, the judged fidelity of samples as a curve."""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from datasetdm_jax import schedulers
from datasetdm_jax.shapes_sd import data as sd_data
from datasetdm_jax.shapes_sd import models as sd_models
from datasetdm_jax.shapes_sd import loop as sd_loop
from datasetdm_jax.shapes_sd import vae_stages as sd_vae
from datasetdm_jax.shapes_sd import export as sd_export
from datasetdm_jax.training_state import checkpoint_manager

__all__ = ["diffusion_stage"]


def _schedule(config: ml_collections.ConfigDict):
    return schedulers.ScheduleConfig.from_dict(sd_data.plain(config.scheduler.to_dict()))


def diffusion_stage(config: ml_collections.ConfigDict, workdir: str) -> sd_loop.Stage:
    dcfg = config.diffusion
    seed = int(config.seed)
    tokens = sd_data.Tokens(sd_data.ensure_tokenizer(workdir, config), config.tokenizer.max_length)
    text_cfg = sd_data.text_encoder_dict(config, tokens.tokenizer)
    unet_cfg = sd_data.plain(config.unet.to_dict())
    if unet_cfg["cross_attention_dim"] != text_cfg["hidden_size"]:
        raise ValueError("unet.cross_attention_dim must equal text_encoder.hidden_size")
    ug, up, ur = sd_models.split_params(sd_models.build_model("unet", unet_cfg, seed + 1))
    tg, tp, tr = sd_models.split_params(sd_models.build_model("text_encoder", text_cfg, seed + 2))
    vg, vp, vr, vae_info = sd_vae.frozen_vae(config, workdir)
    sched = _schedule(config)
    if sched.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError("diffusion training supports epsilon or v_prediction")
    ac = jnp.asarray(schedulers.alphas_cumprod(sched))
    n_t = sched.num_train_timesteps
    gamma = float(dcfg.min_snr_gamma)
    p_drop = float(dcfg.caption_dropout)
    sample_post = bool(dcfg.sample_posterior)
    uncond = jnp.asarray(tokens([""])[0])

    def encode_latents(vae_p, images, rng, sample: bool):
        vae = nnx.merge(vg, vae_p, vr)
        mean, logvar = sd_models.vae_encode(vae, images)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype) if sample else mean
        return jax.lax.stop_gradient(z.astype(jnp.float32))

    # Latent scale: 1 / std of the encoder's latents on a few training batches (SD's 0.18215 was
    # chosen the same way). Computed once; kept in the checkpoint meta so resumes reuse it.
    meta = {"unet": unet_cfg, "text_encoder": text_cfg}
    mngr = checkpoint_manager(workdir, "diffusion", config.keep_checkpoints)
    latest = mngr.latest_step()
    if latest is not None:
        meta.update(mngr.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    mngr.close()
    vae_source = vae_info["_source"]
    if meta.setdefault("vae_step", vae_source) != vae_source:
        raise ValueError(f"the diffusion checkpoint was trained on the VAE {meta['vae_step']!r}, "
                         f"but the VAE is now {vae_source!r}; use a fresh workdir")
    if config.init_from and latest is None:  # warm start; a resumed run has its own weights
        up = sd_models.init_weights(config, "unet", unet_cfg, up)
        tp = sd_models.init_weights(config, "text_encoder", text_cfg, tp)
        source = sd_models.init_pipeline(os.path.abspath(config.init_from))
        meta["scaling_factor"] = float(source.configs["vae"]["scaling_factor"])
        meta["init_step"] = sd_models.init_step(config.init_from) or 0  # the folder's steps count in the total
    if "scaling_factor" not in meta:
        it = sd_data.train_iterator(config, int(dcfg.batch_size), None)
        zs = [np.asarray(jax.jit(encode_latents, static_argnums=3)(
            vp, jnp.asarray(next(it)["image"]), jax.random.key(seed), False)) for _ in range(4)]
        meta["scaling_factor"] = float(1.0 / max(np.std(np.concatenate(zs)), 1e-6))
    scale = float(meta["scaling_factor"])

    def loss_fn(p, vae_p, batch, rng):
        k_lat, k_t, k_n, k_d = jax.random.split(rng, 4)
        z0 = encode_latents(vae_p, batch["image"], k_lat, sample_post) * scale
        b = z0.shape[0]
        t = jax.random.randint(k_t, (b,), 0, n_t)
        noise = jax.random.normal(k_n, z0.shape, jnp.float32)
        zt = schedulers.add_noise(sched, z0, noise, t)
        drop = jax.random.uniform(k_d, (b,)) < p_drop
        ids = jnp.where(drop[:, None], uncond[None], batch["input_ids"])
        ctx = nnx.merge(tg, p["text_encoder"], tr).encode(ids)
        pred = nnx.merge(ug, p["unet"], ur)(zt, t, ctx).astype(jnp.float32)
        if sched.prediction_type == "epsilon":
            target = noise
        else:
            target = schedulers.get_velocity(sched, z0, noise, t)
        mse = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))
        snr = ac[t] / (1.0 - ac[t])
        if gamma > 0:  # Min-SNR-gamma (Hang et al. 2023), in the form for the chosen target
            w = jnp.minimum(snr, gamma) / (snr if sched.prediction_type == "epsilon" else snr + 1.0)
        else:
            w = jnp.ones_like(snr)
        return jnp.mean(w * mse), {"mse": jnp.mean(mse)}

    held = sd_data.heldout_batch(config)
    held_x = jnp.asarray(held["image"])
    held_ids = jnp.asarray(tokens(held["caption"]))
    eval_ts = tuple(int(t) for t in dcfg.eval_timesteps)
    held_noise = jax.random.normal(jax.random.key(seed + 7), (len(eval_ts),) + tuple(
        jax.eval_shape(lambda: encode_latents(vp, held_x, jax.random.key(0), False)).shape))

    def eval_fn(p, vae_p):
        z0 = encode_latents(vae_p, held_x, jax.random.key(0), False) * scale
        unet = nnx.merge(ug, p["unet"], ur)
        text = nnx.merge(tg, p["text_encoder"], tr)
        ctx = text.encode(held_ids)
        ctx0 = jnp.broadcast_to(text.encode(uncond[None]), ctx.shape)
        out = {}
        cond_all, unc_all = [], []
        for i, t in enumerate(eval_ts):
            noise = held_noise[i]
            zt = schedulers.add_noise(sched, z0, noise, t)
            target = noise if sched.prediction_type == "epsilon" else schedulers.get_velocity(sched, z0, noise, t)
            c = jnp.mean(jnp.square(unet(zt, t, ctx).astype(jnp.float32) - target))
            u = jnp.mean(jnp.square(unet(zt, t, ctx0).astype(jnp.float32) - target))
            out[f"mse_t{t}"], out[f"mse_uncond_t{t}"] = c, u
            cond_all.append(c)
            unc_all.append(u)
        out["mse"] = jnp.mean(jnp.stack(cond_all))
        out["mse_uncond"] = jnp.mean(jnp.stack(unc_all))
        out["caption_gain"] = out["mse_uncond"] - out["mse"]  # > 0: the caption helps denoising
        return out

    def host_batch(b):
        return {"image": np.asarray(b["image"], np.float32), "input_ids": tokens(b["caption"])}

    sample_eval = None
    if int(dcfg.fidelity_every) > 0:
        parts = {"vae": (vg, vp, vr, sd_export.vae_config(vae_info, scale)), "unet": (ug, up, ur, unet_cfg),
                 "text_encoder": (tg, tp, tr, text_cfg)}
        sample_eval = _fidelity_eval(config, tokens, parts)
    return sd_loop.Stage("diffusion", dcfg, {"unet": up, "text_encoder": tp}, vp, loss_fn, eval_fn,
                  host_batch, meta, sample_eval)


def _fidelity_eval(config: ml_collections.ConfigDict, tokens: sd_data.Tokens, parts: dict) -> Callable[[Any], dict]:
    """(EMA params) -> judged fidelity of samples from them: the real yardstick (does the
    model draw the prompted class and colour, `judge.fidelity`) as a training curve, next to the
    eps-MSE proxy. One pipeline whose jitted sampler is reused; each call swaps in the weights."""
    from datasetdm_jax.research import judge as judge_lib

    dcfg = config.diffusion
    judge = judge_lib.load_judge(str(dcfg.fidelity_judge))
    pipe = sd_export.assemble_pipeline(config, tokens, parts, jnp.float32)

    def run(weights) -> dict:
        # A new params dict, not an in-place swap: generation places a pipeline's parameters once per
        # dict (``generate``), so the weights must arrive as a dict it has not seen.
        swapped = {name: nnx.split(nnx.merge(parts[name][0], weights[name], parts[name][2]))[1]
                   for name in ("unet", "text_encoder")}
        pipe.params = {**pipe.params, **swapped}
        r = judge_lib.fidelity(pipe, judge, num_prompts=int(dcfg.fidelity_prompts), steps=int(dcfg.fidelity_steps),
                               guidance=float(dcfg.fidelity_guidance), scheduler="pndm", seed=0)
        return {"class_fidelity": r["single"]["class"], "colour_fidelity": r["single"]["colour"],
                "multi_object_presence": r["multi"]["classes"]}

    return run
