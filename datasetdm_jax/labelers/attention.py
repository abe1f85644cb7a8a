"""Training-free attention labeller (Dataset Diffusion): images and label maps from one jitted sampler.

For a batch of captions with their class names, the image is generated from the caption (with
`; name1 name2 ...` appended if `append_class_names`) with classifier-free guidance, while every
UNet call of every step also reads, for the conditional half, (a) the self-attention of the layers
at `self_res` and (b) the softmax of the cross-attention queries of the layers at `cross_res`
against a set of text keys, `class_tokens`:

- ``"class_prompt"`` (the official method): the separately encoded class prompt `name1 name2 ...`
  (keys only: it never changes the image);
- ``"caption"``: the generation prompt itself, each class read at its own words' tokens, i.e. the
  cross-attention the UNet really computes.

Why both: the official keys rely on a large text encoder giving a class word nearly the same
embedding alone as inside the caption. A small one does not: on the shipped shapes-world model
(4-layer, 192-wide CLIP), 24 real labelled scenes pushed through at timestep 400 with their
captions give, per class, IoU with the object / with its complement of 0.32 / 0.33 for the
class-prompt keys (self_res = cross_res = 8, tau 4; half the pixels labelled foreground where 11%
are) against 0.48 / 0.07 for the caption's own class tokens, and 0.59 / 0.07 with the latent-
resolution self-attention (self_res 16, tau 1). The shapes configs therefore use ``"caption"``; the
official keys stay the default here and for Stable Diffusion.

Both are averaged over heads and layers inside the UNet call and summed into fp32 running sums
carried through the sampler's `fori_loop` (only the calls at timesteps <= ``max_timestep`` if set),
so the mean never leaves the device. After the loop the VAE decodes and `refine.attention_labels`
turns the means into uint8 label maps of the image size, each class normalised per class
(``"minmax"``, official) or against the strongest named class (``"peak"``). With ``calibrate``
the thresholds are chosen on real labelled images (`labelers.calibration`) instead of fixed, at
one timestep or (``calibration_timestep=None``) averaged over the sampler's own timesteps.

Why ``"peak"`` and ``max_timestep``: a generated image often lacks a class its prompt names (on
64 shapes-world images of the demo's settings, 25 of the 108 named classes cover < 0.5% of the
pixels by the P-Decoder of the same images). Min-max normalisation stretches such a class's
near-flat map to [0, 1] and labels the background with it: 35.4% of the pixels foreground where
the P-Decoder finds 14.6%, mIoU 44.3 against its labels. ``"peak"`` keeps those classes low
(18.4%, 50.6); also dropping the calls above timestep 600 and calibrating at the sampler's
timesteps gives 16.8-18.4% and 50.6-51.5 (the calibration picks 0.55 or 0.60, tied on the real
images). Alone, ``max_timestep`` 600 moves little (33.3%, 45.8). The cost is on real scenes,
where every named class is present: mIoU 56.5 -> 52.4 at timestep 400 (64 test scenes).

Noise for example `i` comes from `fold_in(PRNGKey(seed), i)` as in `generate.py`, so an image is
the one `generate.sample(pipe, [generation prompt], seed=seed, start_index=i)` draws.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from datasetdm_jax import features, generate, schedulers
from datasetdm_jax.labelers import class_prompts, refine
from datasetdm_jax.models.unet_blocks import AttentionCapture


CLASS_TOKENS = ("class_prompt", "caption")


@dataclasses.dataclass(frozen=True)
class AttentionLabelConfig:
    """Labeller settings (Dataset Diffusion defaults). Resolutions are feature heights; None picks
    half (self) and a quarter (cross) of the latent height, the paper's 32 and 16 for a 64 latent."""

    tau: int = 4
    threshold: float = 0.6
    uncertainty_threshold: float = 0.5
    self_res: int | None = None
    cross_res: int | None = None
    append_class_names: bool = True
    class_tokens: str = "class_prompt"    # attention keys: "class_prompt" (official) or "caption"
    calibrate: bool = False               # thresholds from real labelled images (`calibrate_thresholds`)
    calibration_timestep: int | None = 400  # noise level of those images; None: the sampler's, as averaged
    max_timestep: int | None = None       # average only the sampler calls at timesteps <= this (None: all)
    normalisation: str = "minmax"         # per-class "minmax" (official) or "peak" (`refine.normalise`)

    def __post_init__(self):
        if self.class_tokens not in CLASS_TOKENS:
            raise ValueError(f"labeler config class_tokens={self.class_tokens!r}: expected one of {CLASS_TOKENS}")
        if self.normalisation not in refine.NORMALISATIONS:
            raise ValueError(f"labeler config normalisation={self.normalisation!r}: expected one of "
                             f"{refine.NORMALISATIONS}")
        if self.max_timestep is not None and (not isinstance(self.max_timestep, (int, np.integer))
                                              or isinstance(self.max_timestep, bool) or self.max_timestep < 0):
            raise ValueError(f"labeler config max_timestep={self.max_timestep!r}: expected an integer >= 0 or None")
        if self.calibration_timestep is not None and (not isinstance(self.calibration_timestep, (int, np.integer))
                                                      or isinstance(self.calibration_timestep, bool)
                                                      or self.calibration_timestep < 0):
            raise ValueError(f"labeler config calibration_timestep={self.calibration_timestep!r}: expected an "
                             "integer >= 0 or None")
        if not isinstance(self.tau, (int, np.integer)) or isinstance(self.tau, bool) or self.tau < 0:
            raise ValueError(f"labeler config tau={self.tau!r}: expected an integer >= 0")
        if not 0 <= self.uncertainty_threshold <= self.threshold:
            raise ValueError(f"labeler config: need 0 <= uncertainty_threshold ({self.uncertainty_threshold}) "
                             f"<= threshold ({self.threshold})")
        for key in ("self_res", "cross_res"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
                raise ValueError(f"labeler config {key}={v!r}: expected a positive integer or None")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "AttentionLabelConfig":
        """From a dict / ConfigDict; an unknown key is a one-line error naming it."""
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"labeler config: unknown key {unknown[0]!r} (known: {sorted(known)})")
        return cls(**d)


@dataclasses.dataclass
class LabelledBatch:
    """Host outputs: `images` (B, H, W, 3) float32 in [0, 1], `labels` (B, H, W) uint8 (255 = ignore),
    `prompts` the generation prompts actually used (captions with class names appended)."""

    images: np.ndarray
    labels: np.ndarray
    prompts: list[str]


def attention_resolutions(pipe, latent_hw: tuple[int, int]) -> list[int]:
    """Feature heights at which the pipeline's UNet has attention layers, for a given latent size."""
    cfg = pipe.model_configs["unet"]
    n = len(cfg.block_out_channels)
    res = {latent_hw[0] // 2 ** (n - 1)}  # the mid block always attends
    for i, kind in enumerate(cfg.down_block_types):
        if kind.startswith("CrossAttn"):
            res.add(latent_hw[0] // 2 ** i)
    for i, kind in enumerate(cfg.up_block_types):
        if kind.startswith("CrossAttn"):
            res.add(latent_hw[0] // 2 ** (n - 1 - i))
    return sorted(res)


def _grid(latent_hw: tuple[int, int], res: int, key: str, available: list[int]) -> tuple[int, int]:
    if res not in available or latent_hw[0] % res:
        raise ValueError(f"labeler {key}={res}: the UNet has attention only at feature heights {available} "
                         f"for a {latent_hw[0]}x{latent_hw[1]} latent; set labeler.{key} to one of them")
    f = latent_hw[0] // res
    return res, latent_hw[1] // f


def feature_grids(pipe, latent_hw: tuple[int, int],
                  cfg: AttentionLabelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(self_hw, cross_hw): the attention grids `cfg` asks for (one-line error if the UNet has none there)."""
    available = attention_resolutions(pipe, latent_hw)
    return (_grid(latent_hw, cfg.self_res or latent_hw[0] // 2, "self_res", available),
            _grid(latent_hw, cfg.cross_res or latent_hw[0] // 4, "cross_res", available))


def attention_keys(pipe, text, key_ids: jax.Array) -> jax.Array:
    """The class keys' (B, T, D) context, what the UNet's cross-attention reads keys from: SDXL's
    is both towers' hidden states (`PromptEmbeds.hidden`), from `class_inputs`' (B, 2, T) ids."""
    emb = text.encode(key_ids, clip_skip=pipe.clip_skip)
    return emb.hidden if pipe.is_sdxl else emb


def zero_sums(batch: int, ls: int, lc: int, class_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Running sums (self attention, class-prompt attention, UNet calls) before the first step."""
    return (jnp.zeros((batch, ls, ls), jnp.float32), jnp.zeros((batch, lc, class_tokens), jnp.float32),
            jnp.zeros((), jnp.float32))


def accumulate(att: Mapping[str, list], sums: tuple[jax.Array, jax.Array, jax.Array], weight=1.0):
    """Adds one UNet call's layer-mean self and class-prompt attention, times `weight` (a traced 0/1
    for a call outside `max_timestep`), to the fp32 running sums."""
    acc_self, acc_cross, calls = sums
    if not att["self_attention"] or not att["class_attention"]:  # trace-time check
        raise ValueError(f"labeler: no attention layers with {acc_self.shape[1]} (self) / {acc_cross.shape[1]} "
                         "(cross) query positions")
    return (acc_self + weight * (sum(att["self_attention"]) / len(att["self_attention"])),
            acc_cross + weight * (sum(att["class_attention"]) / len(att["class_attention"])), calls + weight)


def step_weight(t: jax.Array, max_timestep: int | None):
    """1.0 for a sampler call at timestep t that the mean includes (t <= `max_timestep`), else 0.0."""
    return 1.0 if max_timestep is None else (t <= max_timestep).astype(jnp.float32)


def averaged_timesteps(pipe, scheduler: str, steps: int, max_timestep: int | None) -> list[int]:
    """The timesteps of the sampler calls whose attention the labeller averages (one per call, in
    order); a one-line error if none is <= `max_timestep` (nothing to average)."""
    ts = np.asarray(schedulers.get_sampler(scheduler).timesteps(pipe.schedule, int(steps)))
    kept = [int(t) for t in ts if max_timestep is None or t <= max_timestep]
    if not kept:
        raise ValueError(f"labeler max_timestep={max_timestep}: no {scheduler} step of {steps} is at a timestep "
                         f"<= it (the lowest is {int(ts.min())}); raise it or set it to None")
    return kept


def mean_maps(sums: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(self, class-prompt) attention averaged over the UNet calls summed (weight 1)."""
    acc_self, acc_cross, calls = sums
    return acc_self / calls, acc_cross / calls


def build_labeller_fn(pipe, *, steps: int, guidance: float, scheduler: str, latent_hw: tuple[int, int],
                      self_hw: tuple[int, int], cross_hw: tuple[int, int], tau: int, threshold: float,
                      uncertainty_threshold: float, capture: str | None = None,
                      feature_passes: Sequence[int | None] = (None,), vae_features: Sequence[int] = (),
                      max_timestep: int | None = None, normalisation: str = "minmax"):
    """A pure function (params, cond_ids, uncond_ids, class_prompt_ids, token_weights, class_ids, valid,
    indices, seed) -> dict(images, labels, self_attention, class_attention); wrap in `jax.jit`.

    `self_attention` (B, Ls, Ls) and `class_attention` (B, Lc, T) are the fp32 means over heads,
    layers and the sampler steps at timesteps <= `max_timestep` (None: all), normalised per
    `normalisation` before thresholding. With `capture` (a features preset), UNet features come back
    too (`features`: one per entry of `feature_passes`, with the VAE maps at `vae_features`, as in
    `generate.build_sampler_fn`), for P-Decoders labelling the same images (labelers/composite.py).
    The images equal `generate.build_sampler_fn`'s: the class prompt is encoded on its own and only
    read as attention keys.
    """
    averaged_timesteps(pipe, scheduler, steps, max_timestep)  # checks that one is left
    sampler = schedulers.get_sampler(scheduler)
    passes = tuple(feature_passes) if capture is not None else ()
    image_hw = (latent_hw[0] * pipe.vae_scale_factor, latent_hw[1] * pipe.vae_scale_factor)
    ls, lc = self_hw[0] * self_hw[1], cross_hw[0] * cross_hw[1]

    def run(params, cond_ids, uncond_ids, class_prompt_ids, token_weights, class_ids, valid, indices, seed):
        text, unet, vae = generate.sampler_modules(pipe, params)
        emb = generate.prompt_embeddings(pipe, text, cond_ids, uncond_ids, latent_hw)
        request = AttentionCapture.request(attention_keys(pipe, text, class_prompt_ids), ls, lc)
        x_T = generate.latent_noise(pipe, seed, indices, latent_hw)

        def model_fn(x, t, sums):
            eps, att = generate.guided_unet(unet, x, t, emb, guidance, attention=request)
            return eps, accumulate(att, sums, step_weight(t, max_timestep))

        def last_model_fn(x, t, sums):  # a P-Decoder reads this step's features
            eps, taps = generate.guided_unet(unet, x, t, emb, guidance, capture=True, attention=request)
            sums = accumulate(taps, sums, step_weight(t, max_timestep))
            return eps, features.extract(taps, capture, x.shape[0]), sums

        sums = zero_sums(cond_ids.shape[0], ls, lc, class_prompt_ids.shape[-1])
        if None in passes:
            z, last, sums = schedulers.sample_loop(sampler, pipe.schedule, steps, model_fn, x_T, last_model_fn, sums)
        else:
            z, sums = schedulers.sample_loop(sampler, pipe.schedule, steps, model_fn, x_T, carry=sums)
            last = None
        feats = generate.pass_features(pipe, unet, emb, z, seed, indices, passes, capture, guidance, last)
        images, feats = generate.decode_with_vae_maps(pipe, vae, z, feats, vae_features)
        out = {"features": feats} if capture is not None else {}
        acc_self, acc_cross = mean_maps(sums)
        labels = refine.attention_labels(acc_self, acc_cross, token_weights, class_ids, valid, self_hw=self_hw,
                                         cross_hw=cross_hw, image_hw=image_hw, tau=tau, threshold=threshold,
                                         uncertainty_threshold=uncertainty_threshold, normalisation=normalisation)
        return {"images": images, "labels": labels,
                "self_attention": acc_self, "class_attention": acc_cross, **out}

    return run


def _class_ids(names: Sequence[Sequence[str]], ids: Sequence[Sequence[int]] | None,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, k) int32 label values and validity mask; default values 1, 2, ... per image."""
    out = np.zeros((len(names), k), np.int32)
    valid = np.zeros((len(names), k), bool)
    for b, row in enumerate(names):
        row_ids = list(range(1, len(row) + 1)) if ids is None else list(ids[b])
        if len(row_ids) != len(row):
            raise ValueError(f"image {b}: {len(row)} class names but {len(row_ids)} class ids")
        bad = [i for i in row_ids if not 1 <= int(i) <= 254]
        if bad:
            raise ValueError(f"image {b}: class id {bad[0]} out of range 1..254 (0 is background, 255 ignore)")
        out[b, : len(row)] = row_ids
        valid[b, : len(row)] = True
    return out, valid


def class_inputs(pipe, class_names: Sequence[Sequence[str]], class_ids: Sequence[Sequence[int]] | None = None,
                 max_classes: int | None = None, *, prompts: Sequence[str] | None = None,
                 class_tokens: str = "class_prompt") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per image (key token ids (T,), SDXL (2, T); (K, T) token weights, K label values, K validity flags), with
    K = `max_classes` or the class count rounded up to a multiple of 4 (few distinct compiles).

    The keys are the class prompt's (``class_tokens="class_prompt"``) or, for ``"caption"``, the
    generation `prompts` themselves (encoded again as keys: the same embeddings the UNet reads)."""
    k = max_classes or max(4, -(-max(len(c) for c in class_names) // 4) * 4)
    if class_tokens not in CLASS_TOKENS:
        raise ValueError(f"class_tokens={class_tokens!r}: expected one of {CLASS_TOKENS}")
    if class_tokens == "caption" and prompts is None:
        raise ValueError("class_tokens='caption' needs the generation prompts")

    def keys(tokenizer):
        if class_tokens == "caption":
            return class_prompts.caption_token_weights(tokenizer, prompts, class_names, pipe.max_length, k)
        return class_prompts.class_prompt_tokens(tokenizer, class_names, pipe.max_length, k)

    tokens, weights = keys(pipe.tokenizer)
    if pipe.is_sdxl:  # (B, 2, T) like `Pipeline.tokenize`: the second tokenizer pads otherwise, same positions
        tokens = np.stack([tokens, keys(pipe.tokenizer_2)[0]], axis=1)
    return (tokens, weights, *_class_ids(class_names, class_ids, k))


def label_batch(pipe, captions: Sequence[str], class_names: Sequence[Sequence[str]], indices: Sequence[int],
                seed: int = 0, *, class_ids: Sequence[Sequence[int]] | None = None, steps: int = 25,
                guidance: float = 7.5, scheduler: str = "pndm", negative_prompt: str = "",
                config: AttentionLabelConfig | Mapping[str, Any] | None = None, height: int | None = None,
                width: int | None = None, max_classes: int | None = None, return_attention: bool = False):
    """Images and attention labels for one batch: `LabelledBatch` (and the averaged maps if `return_attention`).

    `class_names[b]` are the classes named for image b (duplicates allowed; multi-word and
    multi-token names handled); `class_ids[b]` their label values (default 1, 2, ... in order).
    Label 0 is background, 255 uncertain; an image with no class names is all 255.
    `indices` are the global example indices (noise `fold_in(PRNGKey(seed), index)`).
    """
    cfg = AttentionLabelConfig.from_dict(config)
    captions, class_names = list(captions), [list(c) for c in class_names]
    if not captions:
        raise ValueError("label_batch: no captions given")
    if not len(captions) == len(class_names) == len(indices):
        raise ValueError(f"label_batch: {len(captions)} captions, {len(class_names)} class-name lists and "
                         f"{len(indices)} indices must match")
    latent_hw = generate.latent_size(pipe, height, width)
    self_hw, cross_hw = feature_grids(pipe, latent_hw, cfg)
    prompts = [class_prompts.append_class_names(c, n) if cfg.append_class_names else c
               for c, n in zip(captions, class_names)]
    class_tok, weights, ids, valid = class_inputs(pipe, class_names, class_ids, max_classes, prompts=prompts,
                                                  class_tokens=cfg.class_tokens)
    settings = dict(steps=int(steps), guidance=float(guidance), scheduler=scheduler, latent_hw=latent_hw,
                    self_hw=self_hw, cross_hw=cross_hw, tau=cfg.tau, threshold=float(cfg.threshold),
                    uncertainty_threshold=float(cfg.uncertainty_threshold), max_timestep=cfg.max_timestep,
                    normalisation=cfg.normalisation)
    fn = pipe.jit(("attention_labels", tuple(sorted(settings.items()))), build_labeller_fn(pipe, **settings))
    out = fn(pipe.params, pipe.tokenize(prompts), pipe.tokenize([negative_prompt] * len(prompts)), class_tok,
             weights, ids, valid, jnp.asarray(np.asarray(indices, np.int32)), jnp.int32(seed))
    batch = LabelledBatch(np.asarray(out["images"]), np.asarray(out["labels"]), prompts)
    if return_attention:
        return batch, {"self_attention": np.asarray(out["self_attention"]),
                       "class_attention": np.asarray(out["class_attention"])}
    return batch
