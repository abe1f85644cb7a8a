"""P-Decoder and attention labels for the same images from one sampler pass.

`DecoderAttentionLabeler` is `decoder.DecoderLabeler` (features captured, trained P-Decoder(s)
label them) whose jitted sampler also carries the attention labeller's fp32 running sums
(`attention.accumulate`) through every step and refines them after the loop. Each record then
holds the P-Decoder's ``segmentation`` (and ``depth``) and the training-free ``attention_label``
of the very same image, so a comparison of the two labellers differs only in the labels; the
attention costs a few small einsums per step instead of a second sampler pass.

With ``append_class_names`` off (the demo's choice) the images, and hence the P-Decoder labels,
are those of the plain `DecoderLabeler` on the same seeds; with it on, both labellers see the
images of ``caption; name1 name2 ...`` (Dataset Diffusion's prompt).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from datasetdm_jax import generate
from datasetdm_jax.labelers import attention, calibration, class_prompts
from datasetdm_jax.labelers.decoder import DecoderLabeler

ATTENTION_KEY = "attention_label"
IGNORE = 255

__all__ = ["ATTENTION_KEY", "DecoderAttentionLabeler", "build_sampler_fn", "consensus_labels"]


def consensus_labels(decoder: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """Both labellers agreeing: the shared class where the P-Decoder's and the attention labeller's
    maps of the same image agree, 255 (ignored downstream) where they differ or either is unsure."""
    decoder, attention = np.asarray(decoder), np.asarray(attention)
    return np.where((decoder == attention) & (decoder != IGNORE), decoder, IGNORE).astype(np.uint8)


def build_sampler_fn(pipe, *, steps: int, guidance: float, scheduler: str, latent_hw: tuple[int, int],
                     capture: str, self_hw: tuple[int, int], cross_hw: tuple[int, int], tau: int, threshold: float,
                     uncertainty_threshold: float, feature_passes: Sequence[int | None] = (None,),
                     vae_features: Sequence[int] = (), max_timestep: int | None = None,
                     normalisation: str = "minmax"):
    """A pure function (params, cond_ids, uncond_ids, indices, seed, extra) -> (images in [0, 1],
    features per feature pass, {ATTENTION_KEY: (B, H, W) uint8}); ``extra`` is `attention.class_inputs`.

    The same steps, guidance and noise as `generate.build_sampler_fn` (the class prompt is encoded
    on its own and is only read as attention keys), so the images and features match it.
    """
    labeller = attention.build_labeller_fn(
        pipe, steps=steps, guidance=guidance, scheduler=scheduler, latent_hw=latent_hw, self_hw=self_hw,
        cross_hw=cross_hw, tau=tau, threshold=threshold, uncertainty_threshold=uncertainty_threshold, capture=capture,
        feature_passes=feature_passes, vae_features=vae_features, max_timestep=max_timestep,
        normalisation=normalisation)

    def run(params, cond_ids, uncond_ids, indices, seed, extra):
        class_tok, weights, class_ids, valid = extra
        out = labeller(params, cond_ids, uncond_ids, class_tok, weights, class_ids, valid, indices, seed)
        return out["images"], out["features"], {ATTENTION_KEY: out["labels"]}

    return run


class DecoderAttentionLabeler(DecoderLabeler):
    """`decoder.DecoderLabeler` plus the attention labeller's map of the same image (``attention_label``).

    ``attention``: an `attention.AttentionLabelConfig` or dict (default ``config.generate.labeler_config``);
    ``class_names``: label value -> name (default the config's data source classes)."""

    name = "decoder+attention"

    def __init__(self, config, pipe=None, config_path: str | None = None, *, also: Sequence[Any] = (),
                 attention_config: Mapping[str, Any] | attention.AttentionLabelConfig | None = None,
                 class_names: Sequence[str] | None = None):
        if attention_config is None:
            attention_config = config.generate.get("labeler_config", None)
        self.attention = attention.AttentionLabelConfig.from_dict(attention_config)
        if class_names is None:
            from datasetdm_jax.data import sources
            class_names = sources.class_names(config.data)
        self.class_names = tuple(class_names)
        self.calibration = None
        if self.attention.calibrate:  # thresholds from the labelled real images, before the sampler is built
            if pipe is None:
                from datasetdm_jax import train
                pipe = train.frozen_pipeline_for(config)
            self.attention, self.calibration = calibration.configured(config, pipe, self.attention, self.class_names)
        super().__init__(config, pipe, config_path, also=also)

    def _build_sampler(self, pipe, g, capture: str):
        latent_hw = generate.latent_size(pipe, self.size, self.size)
        self_hw, cross_hw = attention.feature_grids(pipe, latent_hw, self.attention)
        a = self.attention
        return build_sampler_fn(pipe, steps=int(g.steps), guidance=float(g.guidance), scheduler=str(g.scheduler),
                                latent_hw=latent_hw, capture=capture, self_hw=self_hw, cross_hw=cross_hw, tau=a.tau,
                                threshold=float(a.threshold), uncertainty_threshold=float(a.uncertainty_threshold),
                                feature_passes=self.feature_passes, vae_features=self.vae_features,
                                max_timestep=a.max_timestep, normalisation=a.normalisation)

    def _inputs(self, prompts, batch: int) -> tuple[list[str], Any]:
        names = [list(p.classes) for p in prompts]
        unknown = sorted({c for row in names for c in row if c not in self.class_names})
        if unknown:
            raise ValueError(f"attention labels: class {unknown[0]!r} is not a label class ({list(self.class_names)})")
        texts = [class_prompts.append_class_names(p.text, n) if self.attention.append_class_names else p.text
                 for p, n in zip(prompts, names)]
        pad = batch - len(prompts)
        names, texts = names + [names[-1]] * pad, texts + [texts[-1]] * pad
        ids = [[self.class_names.index(c) for c in row] for row in names]
        return texts, attention.class_inputs(self.pipe, names, ids, prompts=texts,
                                             class_tokens=self.attention.class_tokens)

    def describe(self) -> dict[str, Any]:
        a = self.attention
        desc = {**super().describe(), "attention": {k: getattr(a, k) for k in a.__dataclass_fields__}}
        if self.calibration is not None:
            desc["attention"]["calibration"] = self.calibration
        return desc
