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
from jax.sharding import NamedSharding, PartitionSpec as P

from datasetdm_jax import devices, features, schedulers
from datasetdm_jax.decoders import postprocess


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


def sampler_modules(pipe, params) -> tuple[nnx.Module, nnx.Module, nnx.Module]:
    """(text encoder, UNet, VAE) merged from ``params`` (``pipe.params``), inside a jitted function."""
    return tuple(nnx.merge(pipe.graphdefs[k], params[k]) for k in ("text_encoder", "unet", "vae"))


def prompt_embeddings(pipe, text: nnx.Module, cond_ids: jax.Array, uncond_ids: jax.Array) -> jax.Array:
    """[uncond; cond] text embeddings: classifier-free guidance's batch-2x context."""
    return text.encode(jnp.concatenate([uncond_ids, cond_ids]), clip_skip=pipe.clip_skip)


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
        emb = prompt_embeddings(pipe, text, cond_ids, uncond_ids)
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


def _compiled(pipe, **settings):
    """One jit per pipeline and setting (steps, guidance, scheduler, size, capture)."""
    key = ("generate", tuple(sorted(settings.items())))
    return pipe._jit(key, build_sampler_fn(pipe, **settings))


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
    return np.asarray(images), (feats[0] if feats else None)


# ==============================================================================================
# Annotated datasets: `datasetdm generate --config configs/<task>.py --num_images N --out DIR`.
#
# Global example i lives in shard i // shard_size; shard s is made by process s % process_count,
# in fixed batches of `batch_size` global indices (the last one padded), so what an example
# becomes depends on its index only: reruns, resumed runs and runs on other process counts write
# the same bytes. A shard is complete once its summary NAME.json exists (written after the data
# files, each by temp file + fsync + rename); the manifest is written last, by process 0.
# ==============================================================================================

import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from typing import Any, Callable, Mapping  # noqa: E402

SPEC_FILE = "spec.json"
FORMAT = "datasetdm-jax/generated-v1"


@dataclasses.dataclass
class LabelledExamples:
    """What a labeller returns for a batch: uint8 images (B,H,W,3) and one label dict per image
    (keys of `records.to_example`: segmentation, depth, instance_masks, keypoints, quality, ...)."""

    images: np.ndarray
    labels: list[dict[str, Any]]
    prompts: list[str] | None = None  # the prompts actually used, when the labeller changes them


class DecoderLabeler:
    """DatasetDM's labeller: sampler (features captured) -> trained P-Decoder(s) -> post-processing,
    all in one jit over a `data` mesh of the local devices; features never leave the device.

    ``also``: more task configs (e.g. depth beside semantic) whose trained decoders label the same
    images, so one sampler pass yields every annotation. Each decoder reads the feature pass of its
    own config's ``generate.feature_pass`` (`feature_pass`); decoders sharing a pass share its
    features, each distinct re-noised timestep costs one more UNet call per image."""

    name = "decoder"

    def __init__(self, config, pipe=None, config_path: str | None = None, *, also: Sequence[Any] = ()):
        from datasetdm_jax import train

        g = config.generate
        self.trainer, params, step = train.load_trained_decoder(config, pipe=pipe, config_path=config_path)
        tr = self.trainer
        self.pipe = tr.pipe
        decoders = [(tr, params, step, config)]
        for cfg in also:
            t2, p2, s2 = train.load_trained_decoder(cfg, pipe=tr.pipe)
            if t2.capture != tr.capture:
                raise ValueError(f"{cfg.name}: capture {t2.capture!r} differs from {config.name}'s {tr.capture!r}; "
                                 "decoders labelling one sampler pass must read the same features")
            decoders.append((t2, p2, s2, cfg))
        self.size = int(config.data.image_size)
        self.batch_size = int(g.batch_size)
        # Its own mesh: the decoder trained at another batch size (the papers' 1) than it labels at.
        mesh = devices.data_mesh(self.batch_size)
        self.repl, self.data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        self.frozen = jax.device_put(tr.frozen, self.repl)
        self.params = jax.device_put([p for _, p, _, _ in decoders], self.repl)
        passes = [feature_pass(c.generate, t.t) for t, _, _, c in decoders]
        self.feature_passes = tuple(dict.fromkeys(passes))  # distinct, in decoder order
        # VAE-decoder levels any decoder reads (a decoder's stem takes only its own resolutions)
        self.vae_features = tuple(sorted({r for t, _, _, _ in decoders for r in t.vae_features}))
        slots = [self.feature_passes.index(q) for q in passes]
        self.parts = [{"task": t.task, "workdir": os.path.abspath(str(c.workdir)), "checkpoint_step": s,
                       "params_sha256": _sha256(p), "feature_pass": describe_pass(q)}
                      for (t, p, s, c), q in zip(decoders, passes)]
        self.uncond = tr.pipe.tokenize([str(g.negative_prompt)])[0]
        sampler = self._build_sampler(tr.pipe, g, tr.capture)
        min_area = int(g.get("min_area", 0))  # semantic only (pose configs have none)
        size = self.size
        finish = postprocess.finisher([(t.task, t.config) for t, _, _, _ in decoders], size)  # pose (per person)

        def label(t, params, feats):
            out = nnx.merge(t.graph, params, t.rest)(feats)
            if t.task == "semantic":
                from datasetdm_jax.decoders import inference
                scores = inference.semantic_scores(out["logits"][-1], out["masks"][-1], size)
                return {"segmentation": inference.class_map(scores, min_area=min_area),
                        "quality": inference.pixel_confidence(scores).mean((1, 2))}
            if t.task == "depth":
                return {"depth": out.astype(jnp.float32)}
            if t.task in ("instance", "pose"):  # padded to fixed slots here, trimmed on the host
                from datasetdm_jax.decoders import tasks
                out = tasks.pose_heatmaps(t.spec, out) if t.task == "pose" else out
                return postprocess.task_labels(t.task, out, size, postprocess.label_settings(t.config))
            raise ValueError(f"generation labels tasks semantic, instance, depth and pose, not {t.task!r}")

        def run(frozen, dec_params, cond, uncond, indices, seed, extra):
            images, feats, labels = sampler(frozen, cond, uncond, indices, seed, extra)
            for (t, _, _, _), p, slot in zip(decoders, dec_params, slots):
                labels.update(label(t, p, feats[slot]))
            return jnp.round(images * 255).astype(jnp.uint8), finish(labels)

        data, repl = self.data_sharding, self.repl
        self.fn = jax.jit(run, in_shardings=(repl, repl, data, data, data, repl, data), out_shardings=data)

    def _build_sampler(self, pipe, g, capture: str):
        """(frozen, cond, uncond, indices, seed, extra) -> (images, features per pass, labels): the
        sampler with `feature_passes` captured; a subclass (labelers/composite.py) also labels inside
        it from `extra`."""
        fn = build_sampler_fn(pipe, steps=int(g.steps), guidance=float(g.guidance), scheduler=str(g.scheduler),
                              latent_hw=_latent_hw(pipe, self.size, self.size), capture=capture,
                              feature_passes=self.feature_passes, vae_features=self.vae_features)
        return lambda frozen, cond, uncond, indices, seed, extra: (*fn(frozen, cond, uncond, indices, seed), {})

    def _inputs(self, prompts, batch: int) -> tuple[list[str], Any]:
        """The generation texts (padded to `batch`) and the sampler's `extra` inputs (batch-leading arrays)."""
        return [p.text for p in prompts] + [prompts[-1].text] * (batch - len(prompts)), ()

    def __call__(self, prompts, indices: np.ndarray, seed: int) -> LabelledExamples:
        n, b = len(indices), self.batch_size
        pad = list(indices) + [indices[-1]] * (b - n)
        texts, extra = self._inputs(prompts, b)
        cond = np.asarray(self.pipe.tokenize(texts), np.int32)
        uncond = np.broadcast_to(np.asarray(self.uncond, np.int32), cond.shape)
        # explicit placement: jit refuses sharded numpy inputs under jax.distributed
        cond, uncond, idx, extra = jax.device_put((cond, uncond, np.asarray(pad, np.int32), extra), self.data_sharding)
        seed_arr = jax.device_put(np.int32(seed), self.repl)
        images, labels = jax.device_get(self.fn(self.frozen, self.params, cond, uncond, idx, seed_arr, extra))
        rows = [postprocess.trim({k: v[i] for k, v in labels.items()}) for i in range(n)]
        return LabelledExamples(np.asarray(images[:n]), rows, texts[:n])

    def describe(self) -> dict[str, Any]:
        first = self.parts[0]
        desc = {"name": self.name, **first, "capture": self.trainer.capture}
        if len(self.parts) > 1:
            desc["also"] = self.parts[1:]
        return desc


def _sha256(params: Any) -> str:
    leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))]
    return hashlib.sha256(b"".join(x.tobytes() for x in leaves)).hexdigest()


class _RegisteredLabeler:
    """Adapter for a batch labeller of `datasetdm_jax.labelers` (e.g. the training-free `attention`)."""

    def __init__(self, name: str, config, pipe=None, config_path: str | None = None):
        from datasetdm_jax import labelers, train
        from datasetdm_jax.data import shapes

        self.name, self.fn, self.config = name, labelers.get_labeler(name), config
        self.pipe = pipe or train.load_frozen_pipeline(str(config.pipeline))
        self.class_names = shapes.CLASSES

    def __call__(self, prompts, indices: np.ndarray, seed: int) -> LabelledExamples:
        g = self.config.generate
        size = int(self.config.data.image_size)
        ids = [[self.class_names.index(c) if c in self.class_names else 0 for c in p.classes] for p in prompts]
        out = self.fn(self.pipe, [p.text for p in prompts], [list(p.classes) for p in prompts], list(indices), seed,
                      class_ids=ids, steps=int(g.steps), guidance=float(g.guidance), scheduler=str(g.scheduler),
                      negative_prompt=str(g.negative_prompt), config=g.get("labeler_config", None),
                      height=size, width=size)
        images = np.round(np.asarray(out.images) * 255).astype(np.uint8)
        return LabelledExamples(images, [{"segmentation": s} for s in np.asarray(out.labels)], list(out.prompts))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def _decoder_attention(config, pipe=None, config_path: str | None = None):
    """``labeler: decoder+attention``: P-Decoder and attention labels of the same images (one pass)."""
    from datasetdm_jax.labelers.composite import DecoderAttentionLabeler
    return DecoderAttentionLabeler(config, pipe=pipe, config_path=config_path)


LABELERS: dict[str, Callable[..., Any]] = {"decoder": DecoderLabeler, "decoder+attention": _decoder_attention}


def register_labeler(name: str, factory: Callable[..., Any]) -> None:
    """Make ``generate.labeler = name`` build ``factory(config, pipe=None, config_path=None)``: a callable
    ``(prompts, indices, seed) -> LabelledExamples`` with a ``describe() -> dict`` for the manifest."""
    LABELERS[name] = factory


def make_labeler(config, pipe=None, config_path: str | None = None):
    """The labeller named by ``config.generate.labeler``: ours, or one of ``datasetdm_jax.labelers``."""
    name = str(config.generate.labeler)
    if name in LABELERS:
        return LABELERS[name](config, pipe=pipe, config_path=config_path)
    return _RegisteredLabeler(name, config, pipe=pipe, config_path=config_path)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if _canonical(a.get(k)) != _canonical(b.get(k)):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    return f"{path or 'spec'}: {_canonical(a)[:60]} != {_canonical(b)[:60]}"


def _model_fingerprint(path: str) -> dict[str, Any]:
    """The model folder and a hash of its JSON configs (weights are too big to hash on every run)."""
    if not path:  # "" = the shipped shapes-world model, as in `train.load_frozen_pipeline`
        from datasetdm_jax.assets import SHAPES_SD
        path = SHAPES_SD
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".json"):
                h.update(f.encode() + open(os.path.join(root, f), "rb").read())
    return {"path": os.path.abspath(path), "configs_sha256": h.hexdigest()}


# Config keys that only steer the decoder's training. The labeller's description pins the trained
# decoder itself (its parameters' sha256), so these cannot change a generated label; comparing them
# made a dataset refuse to resume after an unrelated training setting (say `baseline.width`) was added.
TRAINING_ONLY_KEYS = frozenset({
    "baseline", "batch_size", "cache_features", "checkpoint_every_s", "deep_supervision", "eval", "eval_every",
    "keep_checkpoints", "log_every", "lr", "max_steps", "name", "num_points", "seed", "select_metric", "steps",
    "val"})


def _generation_view(spec: dict[str, Any]) -> dict[str, Any]:
    """What of a dataset spec decides its content: the spec without the training-only config keys."""
    config = {k: v for k, v in spec.get("config", {}).items() if k not in TRAINING_ONLY_KEYS}
    return {**spec, "config": config}


def _stored_spec(out: str) -> dict[str, Any] | None:
    path = os.path.join(out, SPEC_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _check_spec(out: str, spec: dict[str, Any], stored: dict[str, Any] | None) -> dict[str, Any]:
    """Refuse to mix datasets: ``out`` must be empty/new or hold a spec (``stored``) that generates
    the same data. Returns the spec of record (the stored one, on a resume), which the manifest repeats."""
    from datasetdm_jax.data import records

    if stored is not None:
        old, new = _generation_view(stored), _generation_view(spec)
        if _canonical(old) != _canonical(new):
            raise ValueError(f"{out} holds a dataset made with a different setting ({_first_difference(old, new)}); "
                             "choose a new --out, or rerun the command that made it to resume")
        return stored
    if os.path.isdir(out) and [n for n in os.listdir(out) if not n.startswith(".")]:
        raise ValueError(f"{out} is not empty and has no {SPEC_FILE}: not a dataset of `datasetdm generate`; "
                         "choose a new --out")
    os.makedirs(out, exist_ok=True)
    records.atomic_write(os.path.join(out, SPEC_FILE), json.dumps(spec, indent=1, sort_keys=True))
    return spec


def _shard_stats(labels: list[dict[str, Any]], num_classes: int | None) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    key = next((k for k in ("segmentation", "instance_labels") if labels and k in labels[0]), None)
    if num_classes and key:  # semantic maps, else instance classes
        present = np.zeros(num_classes, np.int64)
        for lab in labels:
            present += np.bincount(np.asarray(lab[key]).reshape(-1).clip(0, num_classes - 1),
                                   minlength=num_classes) > 0
        stats["images_with_class"] = present.tolist()
    q = [float(lab["quality"]) for lab in labels if lab.get("quality") is not None]
    if q:
        stats["quality_sum"] = float(np.sum(np.asarray(q, np.float64)))
    return stats


def _gather_summaries(mine: list[dict[str, Any]], run_key: str) -> list[dict[str, Any]] | None:
    """Process 0 gets every process's shard summaries (through jax.distributed's key-value store,
    so per-host local disks work); other processes get None."""
    if jax.process_count() == 1:
        return mine
    from jax._src import distributed  # the coordinator's key-value store; no public API yet

    client = distributed.global_state.client
    client.key_value_set(f"{run_key}/{jax.process_index()}", json.dumps(mine))
    if jax.process_index() != 0:
        return None
    out = []
    for p in range(jax.process_count()):
        out += json.loads(client.blocking_key_value_get(f"{run_key}/{p}", 3_600_000))
    return out


def generate_dataset(config, num_images: int, out: str, *, config_path: str | None = None, pipe=None,
                     labeler=None, progress: bool = True) -> dict[str, Any] | None:
    """Generate (or resume) ``num_images`` annotated examples into ``out``; returns the manifest
    (None on processes other than 0). See the section comment above for the layout."""
    from tqdm.auto import tqdm

    from datasetdm_jax import prompts as prompts_lib
    from datasetdm_jax.data import records, sources

    g = config.generate
    num_images = int(num_images)
    if num_images < 1:
        raise ValueError(f"--num_images must be >= 1, got {num_images}")
    class_names = tuple(sources.class_names(config.data))  # the decoder's label values, e.g. VOC's 21
    source = prompts_lib.from_config(g.prompts, known_classes=class_names)
    shard_size, seed, fmt = int(g.shard_size), int(g.seed), str(g.image_format)
    num_shards = -(-num_images // shard_size)
    pid, nproc = jax.process_index(), jax.process_count()
    mine = [s for s in range(num_shards) if s % nproc == pid]
    names = [records.shard_name(s, num_shards) for s in range(num_shards)]
    todo = [s for s in mine if not os.path.isfile(os.path.join(out, names[s] + ".json"))]
    spec = {"format": FORMAT, "config": json.loads(config.to_json()), "num_images": num_images,
            "model": _model_fingerprint(str(config.pipeline)), "prompts": source.describe()}
    labeler = labeler or (make_labeler(config, pipe=pipe, config_path=config_path) if todo else None)
    stored = _stored_spec(out)
    if labeler is not None:
        spec["labeler"] = labeler.describe()
    elif stored is not None:  # nothing left to do here: keep the stored labeller
        spec["labeler"] = stored.get("labeler")
    spec = _check_spec(out, spec, stored)

    def count(s):
        return min(shard_size, num_images - s * shard_size)

    total = sum(count(s) for s in mine)
    done_before = total - sum(count(s) for s in todo)
    bar = tqdm(total=total, initial=done_before, unit="img", desc=f"generate [{pid + 1}/{nproc}]",
               dynamic_ncols=True, disable=not progress)
    t0, made = time.time(), 0
    bs = int(g.batch_size)

    def encode(recs: list[dict]) -> list[bytes]:
        return [records.to_example(r, fmt, class_names=class_names) for r in recs]

    # Image/label encoding of batch k runs in this thread while the device works on batch k + 1;
    # results are collected in submission order, so the shards do not depend on timing.
    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datasetdm-encode")
    try:
        for s in todo:
            for stale in os.listdir(out):
                if stale.startswith(names[s]) and ".tmp-" in stale:
                    os.remove(os.path.join(out, stale))
            encoded, all_labels = [], []
            lo, hi = s * shard_size, s * shard_size + count(s)
            for b0 in range(lo, hi, bs):
                idx = np.arange(b0, min(b0 + bs, hi))
                ps = source.batch(idx)
                res = labeler(ps, idx, seed)
                used = res.prompts or [p.text for p in ps]
                encoded.append(encoder.submit(encode, [
                    {"image": res.images[k], "prompt": used[k], "classes": list(ps[k].classes),
                     "index": int(i), "seed": seed, **res.labels[k]} for k, i in enumerate(idx)]))
                all_labels += res.labels
                bar.update(len(idx))
                made += len(idx)
            examples = [e for f in encoded for e in f.result()]
            records.write_shard(out, names[s], examples, extra={"stats": _shard_stats(all_labels, len(class_names))})
    finally:
        encoder.shutdown(wait=True, cancel_futures=True)
        bar.close()
    elapsed = time.time() - t0
    summaries = []
    for s in mine:
        with open(os.path.join(out, names[s] + ".json")) as f:
            summaries.append(json.load(f))
    summaries = _gather_summaries(summaries, "datasetdm_generate/" + hashlib.sha256(
        _canonical(spec).encode()).hexdigest()[:16])
    if summaries is None:
        print(f"generate: process {pid} wrote {len(todo)} shard(s), {made} images in {elapsed:.1f} s")
        return None
    summaries.sort(key=lambda x: x["name"])
    manifest = _manifest(spec, summaries, num_images, shard_size, class_names)
    from datasetdm_jax import export
    export.write_preview(out, [os.path.join(out, x["files"]["tfrecord"]["file"]) for x in summaries[:1]],
                         os.path.join(out, "preview.png"))
    from datasetdm_jax.data import records_tfds
    records_tfds.write_metadata(out, summaries)  # tfds.builder_from_directory(out) reads the shards in place
    records.atomic_write(os.path.join(out, records.MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    rate = made / elapsed if elapsed > 0 and made else 0.0
    print(f"generate: {num_images} images in {num_shards} shard(s) at {out} "
          f"(this process: {made} made now in {elapsed:.1f} s, {rate:.2f} img/s; {done_before} already there)")
    return manifest


def _manifest(spec: Mapping[str, Any], summaries: list[dict[str, Any]], num_images: int,
              shard_size: int, class_names: Sequence[str]) -> dict[str, Any]:
    counts: dict[str, Any] = {"images": sum(x["num_records"] for x in summaries)}
    if counts["images"] != num_images:
        raise RuntimeError(f"manifest: {counts['images']} records in shards, expected {num_images}")
    with_class = [x["stats"].get("images_with_class") for x in summaries]
    if all(w is not None for w in with_class) and with_class:
        tot = np.sum(np.asarray(with_class), 0)
        counts["images_with_class"] = {class_names[k]: int(v) for k, v in enumerate(tot)}
    q = [x["stats"].get("quality_sum") for x in summaries]
    if all(v is not None for v in q) and q:
        counts["mean_quality"] = float(np.sum(q) / num_images)
    return {**spec, "counts": counts, "shard_size": shard_size, "num_shards": len(summaries),
            "shards": [{k: v for k, v in x.items() if k != "stats"} for x in summaries]}


def main_generate(config_path: str, num_images: int, out: str, overrides: Sequence[str] | None = None) -> None:
    """CLI body of ``datasetdm generate --config FILE.py[:arg] --num_images N --out DIR [key=value ...]``."""
    from datasetdm_jax.config_utils import load_config

    config = load_config(config_path, overrides)
    if "generate" not in config:
        raise ValueError(f"{config_path} has no `generate` section")
    generate_dataset(config, num_images, out, config_path=config_path.split(":")[0])
