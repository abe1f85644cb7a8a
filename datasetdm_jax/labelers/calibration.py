"""Threshold calibration of the attention labeller on the labelled real images (``calibrate``).

The only labels a user has are the ~100 real images the P-Decoder trains on; pushed through the VAE
and the UNet with their captions, they give attention maps whose best threshold (by mIoU against
their truth) replaces the fixed one. `configured` is what a generation run calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from datasetdm_jax import generate, schedulers
from datasetdm_jax.labelers import class_prompts, refine
from datasetdm_jax.labelers.attention import (AttentionLabelConfig, accumulate, attention_keys, averaged_timesteps,
                                              class_inputs, feature_grids, mean_maps, zero_sums)
from datasetdm_jax.models.unet_blocks import AttentionCapture

__all__ = ["CALIBRATION_GRID", "real_attention", "calibrate_thresholds", "configured"]

CALIBRATION_GRID = tuple(round(0.2 + 0.05 * i, 2) for i in range(15))  # 0.2 ... 0.9


def real_attention(pipe, images: np.ndarray, prompts: Sequence[str], key_ids: np.ndarray, *, self_hw, cross_hw,
                   timestep: int | Sequence[int], seed: int = 0, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(self, class) attention of real uint8 NHWC images (at the pipeline's image size) encoded by the
    VAE, noised to `timestep` and read by one conditional UNet call with their `prompts`; for several
    timesteps, the mean over one call at each (one noise per image for all), as the sampler averages."""
    ls, lc = self_hw[0] * self_hw[1], cross_hw[0] * cross_hw[1]
    timesteps = [int(t) for t in np.atleast_1d(timestep)]
    fn = pipe.jit(("real_attention", ls, lc), _real_attention_fn(pipe, ls, lc))
    out_s, out_c = [], []
    for a in range(0, len(images), batch):
        x = np.asarray(images[a:a + batch], np.float32) / 127.5 - 1.0
        z0 = pipe.vae_encode(x)
        sums = zero_sums(len(x), ls, lc, key_ids.shape[-1])
        for t in timesteps:
            sums = fn(pipe.params, z0, pipe.tokenize(list(prompts[a:a + batch])), jnp.asarray(key_ids[a:a + batch]),
                      jax.random.fold_in(jax.random.PRNGKey(seed), a), jnp.int32(t), sums)
        s, c = mean_maps(sums)
        out_s.append(np.asarray(s))
        out_c.append(np.asarray(c))
    return np.concatenate(out_s), np.concatenate(out_c)


def _real_attention_fn(pipe, ls: int, lc: int):
    def run(params, z0, cond_ids, key_ids, noise_key, timestep, sums):
        text, unet, _ = generate.sampler_modules(pipe, params)
        emb = pipe.conditioning(text.encode(cond_ids, clip_skip=pipe.clip_skip), z0.shape[1:3])
        zt = schedulers.add_noise(pipe.schedule, z0, jax.random.normal(noise_key, z0.shape, z0.dtype), timestep)
        request = AttentionCapture.request(attention_keys(pipe, text, key_ids), ls, lc)
        _, att = unet(zt, jnp.full((z0.shape[0],), timestep, jnp.float32), emb, attention=request)
        return accumulate(att, sums)

    return run


def _resize_nearest(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = labels.shape[1:3]
    rows = (np.arange(hw[0]) * h // hw[0])[:, None]
    cols = (np.arange(hw[1]) * w // hw[1])[None, :]
    return labels[:, rows, cols]


def calibrate_thresholds(pipe, images: np.ndarray, captions: Sequence[str], class_names: Sequence[Sequence[str]],
                         class_ids: Sequence[Sequence[int]], truth: np.ndarray,
                         config: AttentionLabelConfig | Mapping[str, Any] | None = None, *, seed: int = 0,
                         grid: Sequence[float] = CALIBRATION_GRID, timesteps: Sequence[int] | None = None
                         ) -> tuple[AttentionLabelConfig, dict[str, Any]]:
    """`config` with the `threshold` maximising the mIoU of attention labels against `truth` on real
    labelled images, and `uncertainty_threshold` kept the same distance below it (clipped at 0).

    Each image (uint8 NHWC, resized to the pipeline's image size) is pushed through the VAE and the
    UNet at `config.calibration_timestep` (None: averaged over one call at each of `timesteps`, the
    generation sampler's, `averaged_timesteps`) with its caption (names appended as in generation); its
    classes are `class_names[i]` with label values `class_ids[i]`. While searching, the uncertain
    band is empty (an ignored pixel can only lose IoU, so the band cannot be chosen by mIoU).
    Returns (the calibrated config, {"miou": per grid threshold, "threshold": chosen, ...}).
    """
    from datasetdm_jax import metrics

    cfg = AttentionLabelConfig.from_dict(config)
    if cfg.calibration_timestep is not None:
        timesteps = [int(cfg.calibration_timestep)]
    elif not timesteps:
        raise ValueError("calibration_timestep=None calibrates at the sampler's timesteps: pass `timesteps`")
    timesteps = [int(t) for t in timesteps]
    latent_hw = generate.latent_size(pipe, None, None)
    image_hw = (latent_hw[0] * pipe.vae_scale_factor, latent_hw[1] * pipe.vae_scale_factor)
    self_hw, cross_hw = feature_grids(pipe, latent_hw, cfg)
    images = np.asarray(images)
    if images.shape[1:3] != image_hw:
        images = np.asarray(jax.image.resize(jnp.asarray(images, jnp.float32), (len(images), *image_hw, 3),
                                             "bilinear")).clip(0, 255)
    names = [list(n) for n in class_names]
    prompts = [class_prompts.append_class_names(c, n) if cfg.append_class_names else c for c, n in zip(captions, names)]
    key_ids, weights, ids, valid = class_inputs(pipe, names, class_ids, prompts=prompts, class_tokens=cfg.class_tokens)
    s, c = real_attention(pipe, images, prompts, key_ids, self_hw=self_hw, cross_hw=cross_hw,
                          timestep=timesteps, seed=seed)
    scores = refine.class_scores(jnp.asarray(s), jnp.asarray(c), jnp.asarray(weights), self_hw=self_hw,
                                 cross_hw=cross_hw, image_hw=image_hw, tau=cfg.tau, normalisation=cfg.normalisation,
                                 valid=jnp.asarray(valid))
    scores = np.where(valid[:, None, None, :], np.asarray(scores), -np.inf)
    best, arg = scores.max(-1), scores.argmax(-1)
    cls = np.take_along_axis(ids, arg.reshape(len(ids), -1), axis=1).reshape(arg.shape)
    truth = np.asarray(truth)
    k = int(max(ids.max(), truth[truth != refine.IGNORE].max(initial=0))) + 1
    miou = {}
    for thr in grid:
        pred = _resize_nearest(np.where(best >= thr, cls, 0), truth.shape[1:3])
        miou[float(thr)] = metrics.iou_from_confusion(metrics.confusion_matrix(pred, truth, k))[0]
    chosen = max(miou, key=lambda t: (miou[t], -abs(t - cfg.threshold)))
    gap = cfg.threshold - cfg.uncertainty_threshold
    out = dataclasses.replace(cfg, threshold=chosen, uncertainty_threshold=max(0.0, round(chosen - gap, 6)))
    return out, {"threshold": chosen, "uncertainty_threshold": out.uncertainty_threshold, "miou": miou,
                 "images": len(images), "timesteps": timesteps}


def configured(config, pipe, attention_config: AttentionLabelConfig | Mapping[str, Any] | None,
               class_names: Sequence[str]) -> tuple[AttentionLabelConfig, dict[str, Any] | None]:
    """The labeller settings a generation run uses: `attention_config` as given, or, with `calibrate`,
    with thresholds calibrated on the training split of ``config.data`` (the labelled real images;
    classes: those in each image's truth, captions: the items' own or "a photo of a X and a Y"; with
    ``calibration_timestep=None`` at the timesteps ``config.generate``'s sampler averages)."""
    cfg = AttentionLabelConfig.from_dict(attention_config)
    if not cfg.calibrate:
        return cfg, None
    from datasetdm_jax.data import sources

    src = sources.build(config.data, train=True)
    items = [src[i] for i in range(len(src))]
    truth = np.stack([np.asarray(it["segmentation"]) for it in items])
    present = [[int(v) for v in np.unique(t) if 0 < v < refine.IGNORE] for t in truth]
    names = [[class_names[v] for v in row] for row in present]
    captions = [it.get("caption") or "a photo of " + " and ".join(f"a {n}" for n in row)
                for it, row in zip(items, names)]
    keep = [i for i, row in enumerate(present) if row]
    g = config.generate
    timesteps = (averaged_timesteps(pipe, str(g.scheduler), int(g.steps), cfg.max_timestep)
                 if cfg.calibration_timestep is None else None)
    return calibrate_thresholds(pipe, np.stack([items[i]["image"] for i in keep]), [captions[i] for i in keep],
                                [names[i] for i in keep], [present[i] for i in keep], truth[keep], cfg,
                                timesteps=timesteps)
