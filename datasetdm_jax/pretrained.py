"""Read and write diffusers-format Stable Diffusion folders (safetensors only), no torch.

A folder holds `model_index.json` and the components `unet/`, `vae/`, `text_encoder/` (each a
`config.json` plus safetensors weights), `tokenizer/` and `scheduler/scheduler_config.json`.
An SDXL folder (`StableDiffusionXLPipeline`) adds `text_encoder_2/` (CLIPTextModelWithProjection)
and `tokenizer_2/`; its `Pipeline` encodes prompts to `PromptEmbeds` (hidden + pooled).
`load_pipeline` builds our Flax NNX models from the configs without materialising a random
init (`nnx.eval_shape`), fills them through the generic converter (`convert.py`), and returns a
`Pipeline` whose methods are cached jits over `(graphdef, state)`, so repeated calls never retrace.

Pickled weights (`.bin`, `.ckpt`, `.pt`, `.pth`) are refused: unpickling can execute arbitrary
code. Every failure is a one-line `PretrainedError` naming the file or key, raised before any
model is returned, so nothing half-loads.

Longer than 400 lines: reading and writing the folder format are one contract, kept side by side.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from datasetdm_jax import convert, hub
from datasetdm_jax.models.abstract import abstract_module
from datasetdm_jax.models.clip_text import PromptEmbeds, SDXLTextEncoders
from datasetdm_jax.tokenizer import load_tokenizer, tokenize

__all__ = [
    "PretrainedError",
    "Pipeline",
    "load_pipeline",
    "save_pipeline",
    "read_json",
    "read_weights",
    "check_dtype",
    "DTYPES",
    "resolve_dtype",
    "model_classes",
]

_ALLOWED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_CONVERT_HINT = (
    "convert once where torch is installed: python -c \"from diffusers import StableDiffusionPipeline as P; "
    "P.from_pretrained('IN').save_pretrained('OUT', safe_serialization=True)\"")
# component -> (accepted class names in model_index.json, library written on save)
_COMPONENTS = {
    "text_encoder": (("CLIPTextModel",), "transformers"),
    "vae": (("AutoencoderKL",), "diffusers"),
    "unet": (("UNet2DConditionModel",), "diffusers"),
}
# SDXL's second text encoder (its tokenizer is `tokenizer_2/`).
_SDXL_COMPONENTS = {"text_encoder_2": (("CLIPTextModelWithProjection",), "transformers")}


# The frozen SD's `dtype` config values: "auto" is bfloat16 on TPU and GPU (what their matrix units
# run at full rate, and what the memory estimates assume) and float32 on CPU (XLA's CPU backend has
# no fast bfloat16 convolutions: docs/benchmarks.md).
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(name: str = "auto") -> jnp.dtype:
    """A config's `dtype` value -> the dtype the frozen SD's weights and activations use here."""
    name = str(name).lower()
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: expected one of {', '.join(DTYPES)}")
    if name == "auto":
        return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("tpu", "gpu") else jnp.float32)
    return jnp.dtype(name)


class PretrainedError(ValueError):
    """A pretrained folder cannot be read: the one-line message names the file or key."""


def check_dtype(dtype: Any) -> jnp.dtype:
    """Normalises `dtype`; only float32, bfloat16 and float16 weights make sense for SD."""
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d not in _ALLOWED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: expected float32, bfloat16 or float16")
    return d


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path`, or a one-line PretrainedError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise PretrainedError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding one component's weights (plain, sharded, then fp16 variant)."""
    for stem in _WEIGHT_STEMS:
        for single, index in ((f"{stem}.safetensors", f"{stem}.safetensors.index.json"),
                              (f"{stem}.fp16.safetensors", f"{stem}.safetensors.index.fp16.json")):
            if (folder / single).is_file():
                return [folder / single]
            if (folder / index).is_file():
                return _shards(folder / index)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise PretrainedError(
            f"{folder}: only pickled weights ({', '.join(pickles)}), which can execute code when loaded; "
            f"safetensors required, {_CONVERT_HINT}")
    raise PretrainedError(
        f"{folder}: no weights found (expected diffusion_pytorch_model.safetensors or model.safetensors, "
        "sharded *.safetensors.index.json, or a .fp16 variant)")


def _shards(index: Path) -> list[Path]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise PretrainedError(f"{index}: no 'weight_map' object")
    files = []
    for name in dict.fromkeys(weight_map.values()):
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise PretrainedError(f"{index}: bad shard name {name!r}")
        if not (index.parent / name).is_file():
            raise PretrainedError(f"{index.parent / name}: shard listed in {index.name} not found")
        files.append(index.parent / name)
    return files


def read_weights(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one component folder as numpy arrays (PyTorch layout, stored dtype)."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in _weight_files(Path(folder)):
        try:
            with safe_open(str(path), framework="numpy") as f:
                for key in f.keys():
                    if key in tensors:
                        raise PretrainedError(f"{path}: tensor {key} also in another shard")
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            if isinstance(e, PretrainedError):
                raise
            msg = " ".join(str(e).split())[:200]
            raise PretrainedError(f"{path}: not a valid safetensors file (truncated or corrupt?): {msg}") from None
    return tensors


def _component_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise PretrainedError(f"{folder}: component folder not found")
    return read_json(folder / "config.json")


# ----------------------------------------------------------------------------------------------
# Building models
# ----------------------------------------------------------------------------------------------

def model_classes(name: str):
    """(Config class, Model class, rename, ignore) for a component; imported lazily."""
    if name == "text_encoder":
        from datasetdm_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
        return CLIPTextConfig, CLIPTextModel, text_encoder_key, ("text_model.embeddings.position_ids",)
    if name == "text_encoder_2":
        from datasetdm_jax.models.clip_text import CLIPTextConfig, CLIPTextModelWithProjection
        return CLIPTextConfig, CLIPTextModelWithProjection, text_encoder_key, ("text_model.embeddings.position_ids",)
    if name == "vae":
        from datasetdm_jax.models import vae
        # Legacy VAE keys are renamed by prepare_vae_state_dict in _prepare_tensors.
        return vae.AutoencoderKLConfig, vae.AutoencoderKL, None, ()
    if name == "unet":
        from datasetdm_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel
        return UNet2DConditionConfig, UNet2DConditionModel, None, ()
    raise KeyError(name)


def text_encoder_key(key: str) -> str:
    """A text encoder's checkpoint key as our modules name it: transformers >= 5 saves CLIPTextModel
    keys without the `text_model.` prefix older files (and CLIPTextModelWithProjection) have."""
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def _prepare_tensors(name: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if name == "vae":
        from datasetdm_jax.models.vae import prepare_vae_state_dict
        return prepare_vae_state_dict(tensors)
    return tensors


def _is_abstract(x: Any) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def _build(name: str, folder: Path, dtype: jnp.dtype):
    """(config object, model) for one component, weights from `folder`, params in `dtype`."""
    raw = _component_config(folder)
    config_cls, model_cls, rename, ignore = model_classes(name)
    try:
        config = config_cls.from_dict(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise PretrainedError(f"{folder / 'config.json'}: {e}") from None
    make = functools.partial(model_cls, config, dtype=dtype, param_dtype=dtype)
    model = abstract_module(lambda rngs: make(rngs=rngs))  # shapes only, no random init
    tensors = _prepare_tensors(name, read_weights(folder))
    try:
        convert.load_torch_state_dict(model, tensors, source=str(folder), rename=rename, ignore=ignore)
    except convert.WeightsError as e:
        raise PretrainedError(str(e)) from None
    del tensors
    graphdef, state = nnx.split(model)
    if any(_is_abstract(x) for x in jax.tree.leaves(state)):
        # Non-parameter variables (e.g. RNG state) are not in checkpoints: build just those;
        # jit drops the unused random parameter init.
        rest = jax.jit(lambda: nnx.state(make(rngs=nnx.Rngs(0)), nnx.Not(nnx.Param)))()
        nnx.update(model, rest)
        graphdef, state = nnx.split(model)
    state = jax.device_put(state)
    return raw, config, graphdef, state


# ----------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Pipeline:
    """Frozen SD components with cached jitted entry points.

    `graphdefs[name]` / `params[name]` (name in text_encoder, vae, unet, and SDXL's text_encoder_2) are the `nnx.split`
    halves that generation and training jit over themselves; the modules `text_encoder`, `vae`
    and `unet` share the same arrays (treat them as read-only). `configs` are the original
    config.json dicts (written back by `save_pipeline`, the text encoder's with its load dtype set to float32).
    """

    tokenizer: Any
    graphdefs: dict[str, Any]
    params: dict[str, Any]
    model_configs: dict[str, Any]
    configs: dict[str, dict]
    scheduler_config: dict
    dtype: Any = jnp.float32
    clip_skip: int | None = None
    tokenizer_path: str | None = None
    model_index: dict = dataclasses.field(default_factory=dict)
    tokenizer_2: Any = None  # SDXL: the second text encoder's tokenizer
    tokenizer_2_path: str | None = None

    def __post_init__(self):
        self._jits: dict[Any, Callable] = {}

    # Modules, for code that wants the objects rather than (graphdef, state).
    def module(self, name: str) -> nnx.Module:
        """The NNX module `name`, merged from its graphdef and state (arrays are shared)."""
        return nnx.merge(self.graphdefs[name], self.params[name])

    @property
    def text_encoder(self) -> nnx.Module:
        return self.module("text_encoder")

    @property
    def vae(self) -> nnx.Module:
        return self.module("vae")

    @property
    def unet(self) -> nnx.Module:
        return self.module("unet")

    @property
    def schedule(self):
        """The scheduler config parsed by `schedulers.ScheduleConfig` (raises if unsupported)."""
        from datasetdm_jax.schedulers import ScheduleConfig
        return ScheduleConfig.from_dict(self.scheduler_config)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.model_configs["vae"], "scaling_factor", None) or 0.18215)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.model_configs["vae"], "shift_factor", None) or 0.0)

    @property
    def max_length(self) -> int:
        n_pos = int(self.model_configs["text_encoder"].max_position_embeddings)
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        return min(n_pos, int(tok_max)) if isinstance(tok_max, int) and tok_max > 0 else n_pos

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.configs["vae"].get("block_out_channels", [0] * 4)) - 1)

    def jit(self, key: Any, fn: Callable) -> Callable:
        """``jax.jit(fn)`` kept with this pipeline under ``key`` (the first ``fn`` given for a key is the
        one kept): compiled programs live and die with the weights they were built for."""
        if key not in self._jits:
            self._jits[key] = jax.jit(fn)
        return self._jits[key]

    # -- text ----------------------------------------------------------------------------------
    @property
    def is_sdxl(self) -> bool:
        """Two text encoders and a micro-conditioned UNet (a `StableDiffusionXLPipeline` folder)."""
        return "text_encoder_2" in self.graphdefs

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """The `params` keys `prompt_encoder` reads: SDXL's two towers or SD's one."""
        return ("text_encoder", "text_encoder_2") if self.is_sdxl else ("text_encoder",)

    def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
        """int32 token ids (B, max_length), truncated with a warning; SDXL: (B, 2, max_length), one
        row per tokenizer (they pad differently)."""
        ids = tokenize(self.tokenizer, prompts, max_length=self.max_length)
        if not self.is_sdxl:
            return ids
        with warnings.catch_warnings():  # the same prompts: one truncation warning is enough
            warnings.simplefilter("ignore")
            ids2 = tokenize(self.tokenizer_2, prompts, max_length=self.max_length)
        return np.stack([ids, ids2], axis=1)

    def prompt_encoder(self, params: Mapping[str, Any] | None = None):
        """The text encoder merged from `params` (default `self.params`): a `CLIPTextModel`, or for
        SDXL an `SDXLTextEncoders`; its `encode(ids, clip_skip=...)` gives what the UNet conditions on."""
        params = self.params if params is None else params
        text = nnx.merge(self.graphdefs["text_encoder"], params["text_encoder"])
        if not self.is_sdxl:
            return text
        return SDXLTextEncoders(text, nnx.merge(self.graphdefs["text_encoder_2"], params["text_encoder_2"]))

    def encode_ids(self, input_ids: Any) -> jax.Array | PromptEmbeds:
        """`tokenize`'s ids -> (B, L, D) prompt embeddings (honours `clip_skip`); SDXL: `PromptEmbeds`
        (`.hidden` (B, L, D1 + D2), `.pooled` (B, P), `.time_ids` None)."""
        fn = self.jit("encode", lambda params, ids: self.prompt_encoder(params).encode(ids, clip_skip=self.clip_skip))
        return fn({k: self.params[k] for k in self.text_encoders}, jnp.asarray(input_ids, jnp.int32))

    def encode_prompt(self, prompts: str | Sequence[str]) -> jax.Array | PromptEmbeds:
        """Prompts -> (B, 77, D) embeddings (SDXL: `PromptEmbeds`), as diffusers' `encode_prompt`
        (no CFG duplication)."""
        return self.encode_ids(self.tokenize(prompts))

    def time_ids(self, latent_hw: tuple[int, int] | None = None) -> np.ndarray:
        """SDXL's default micro-conditioning for an image of latent size `latent_hw` (default the
        UNet's sample_size): (H, W, 0, 0, H, W) in pixels, as diffusers' SDXL pipeline."""
        if latent_hw is None:
            size = self.configs["unet"].get("sample_size", 128)
            latent_hw = (size, size) if isinstance(size, int) else tuple(size)
        h, w = (int(n) * self.vae_scale_factor for n in latent_hw)
        return np.array([h, w, 0, 0, h, w], np.float32)

    def conditioning(self, emb: Any, latent_hw: tuple[int, int], time_ids: Any = None) -> Any:
        """What the UNet takes for `emb`: SD's array unchanged; SDXL's `PromptEmbeds` with `time_ids`
        (default `self.time_ids(latent_hw)`) filled in and cast to the pipeline's dtype."""
        if not self.is_sdxl:
            return jnp.asarray(emb, self.dtype)
        if not isinstance(emb, PromptEmbeds):
            raise ValueError("an SDXL pipeline's UNet takes PromptEmbeds (from encode_prompt), not an array")
        if time_ids is None:
            time_ids = emb.time_ids if emb.time_ids is not None else self.time_ids(latent_hw)
        return PromptEmbeds(jnp.asarray(emb.hidden, self.dtype), jnp.asarray(emb.pooled, self.dtype),
                            jnp.asarray(time_ids, jnp.float32))

    # -- VAE -----------------------------------------------------------------------------------
    def vae_encode(self, images: Any, key: jax.Array | None = None) -> jax.Array:
        """NHWC images in [-1, 1] -> scaled latents NHWC: the posterior mean, or a sample with `key`."""
        gd, scale, shift = self.graphdefs["vae"], self.scaling_factor, self.shift_factor

        def encode(state, x, key):
            mean, logvar = nnx.merge(gd, state).encode(x)
            if key is not None:
                from datasetdm_jax.models.vae import sample_latent
                mean = sample_latent(mean, logvar, key)
            return (mean - shift) * scale

        fn = self.jit(("vae_encode", key is None), encode)
        return fn(self.params["vae"], jnp.asarray(images, self.dtype), key)

    def vae_decode(self, latents: Any) -> jax.Array:
        """Scaled latents NHWC -> NHWC images, nominally in [-1, 1] (not clipped, as diffusers)."""
        gd, scale, shift = self.graphdefs["vae"], self.scaling_factor, self.shift_factor
        fn = self.jit("vae_decode", lambda state, z: nnx.merge(gd, state).decode(z / scale + shift))
        return fn(self.params["vae"], jnp.asarray(latents, self.dtype))

    def vae_round_trip(self, images: Any) -> np.ndarray:
        """NHWC images in [-1, 1] -> the same through the VAE (posterior mean, decoded), clipped to
        [-1, 1]: what the latent keeps of them."""
        return np.clip(np.asarray(self.vae_decode(self.vae_encode(images)), np.float32), -1.0, 1.0)

    # -- UNet ----------------------------------------------------------------------------------
    def unet_apply(self, latents: Any, t: Any, emb: Any, time_ids: Any = None, capture: str | None = None):
        """Noise prediction for NHWC `latents` at timesteps `t` (scalar or (B,)).

        `emb` is `encode_prompt`'s output (SDXL: `PromptEmbeds`; `time_ids` (B, 6) or (6,) default to
        the latents' image size, `time_ids`). With `capture` a features preset name (e.g.
        "datasetdm"), returns `(eps, Features)`; the batch must then be a CFG batch: B unconditional
        rows, then B conditional rows.
        """
        latents = jnp.asarray(latents, self.dtype)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (latents.shape[0],))
        emb = self.conditioning(emb, latents.shape[1:3], time_ids)
        gd = self.graphdefs["unet"]
        if capture is None:
            fn = self.jit("unet", lambda state, x, t, c: nnx.merge(gd, state)(x, t, c))
            return fn(self.params["unet"], latents, t, emb)
        if latents.shape[0] % 2:
            raise ValueError(f"unet_apply(capture={capture!r}) needs a CFG batch (uncond then cond rows), "
                             f"got an odd batch of {latents.shape[0]}")
        from datasetdm_jax import features

        def run(state, x, t, c):
            eps, taps = nnx.merge(gd, state)(x, t, c, capture=True)
            return eps, features.extract(taps, capture, x.shape[0] // 2)

        fn = self.jit(("unet_capture", capture), run)
        return fn(self.params["unet"], latents, t, emb)


def load_pipeline(path: str | os.PathLike, dtype: Any = jnp.float32, *, clip_skip: int | None = None,
                  variant: str | None = None) -> Pipeline:
    """Loads a diffusers-format SD folder (safetensors only) with weights cast to `dtype`; `path` may
    also be a Hugging Face repo id, fetched into the HF cache by `hub.resolve` (`variant="fp16"`)."""
    dtype = check_dtype(dtype)
    try:
        root = Path(hub.resolve(path, variant=variant))
    except hub.HubError as e:
        raise PretrainedError(str(e)) from None
    if not root.is_dir():
        raise PretrainedError(f"{root}: pretrained folder not found")
    index = read_json(root / "model_index.json")
    components = {**_COMPONENTS, **(_SDXL_COMPONENTS if index.get("text_encoder_2") is not None else {})}
    for name, (classes, _) in components.items():
        entry = index.get(name)
        if entry is None:
            raise PretrainedError(f"{root / 'model_index.json'}: no {name!r} component")
        cls = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
        if cls not in classes:
            raise PretrainedError(
                f"{root / 'model_index.json'}: {name} is {entry!r}, expected one of {', '.join(classes)}")
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0):
        raise ValueError(f"clip_skip must be None or an integer >= 0, got {clip_skip!r}")
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
    try:
        tokenizer = load_tokenizer(root / "tokenizer")
        tokenizer_2 = load_tokenizer(root / "tokenizer_2") if "text_encoder_2" in components else None
    except ValueError as e:
        raise PretrainedError(str(e)) from None

    for name in components:  # cheap checks first, so a broken folder fails before any building
        _component_config(root / name)
        _weight_files(root / name)
    configs, model_configs, graphdefs, params = {}, {}, {}, {}
    for name in components:
        # A VAE marked force_upcast (SDXL's) overflows in float16: it stays float32, as in diffusers.
        upcast = name == "vae" and dtype == jnp.float16 and _component_config(root / name).get("force_upcast", True)
        raw, cfg, gd, state = _build(name, root / name, jnp.dtype(jnp.float32) if upcast else dtype)
        configs[name], model_configs[name], graphdefs[name], params[name] = raw, cfg, gd, state
    n_layers = int(model_configs["text_encoder"].num_hidden_layers)
    if clip_skip is not None and clip_skip > n_layers:
        raise ValueError(f"clip_skip={clip_skip} exceeds the text encoder's {n_layers} layers")
    return Pipeline(
        tokenizer=tokenizer, graphdefs=graphdefs, params=params, model_configs=model_configs,
        configs=configs, scheduler_config=scheduler_config, dtype=dtype, clip_skip=clip_skip,
        tokenizer_path=str(root / "tokenizer"), model_index=index, tokenizer_2=tokenizer_2,
        tokenizer_2_path=str(root / "tokenizer_2") if tokenizer_2 is not None else None)


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------

def _write_json(path: Path, data: Mapping) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _saved_config(name: str, config: Mapping) -> dict:
    """The config.json written for component `name`: `config` as it is, except the text encoder's
    load dtype.

    With no dtype argument, transformers >= 5 builds the text encoder in the dtype its config.json
    names (`dtype`, or the older `torch_dtype`), else in the dtype the weights are stored in, while
    diffusers builds the UNet and VAE in float32: fp16/bf16 weights would then meet in one forward
    pass and fail ("mat1 and mat2 must have the same dtype"). Naming float32 makes the plain
    `StableDiffusionPipeline.from_pretrained(folder)` all-float32 whatever the stored dtype; an
    explicit `dtype=` still overrides it for every component.
    """
    out = dict(config)
    if name in ("text_encoder", "text_encoder_2"):
        out["dtype"] = out["torch_dtype"] = "float32"
    return out


def save_pipeline(pipe: Pipeline, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes `pipe` as a diffusers-format folder that `StableDiffusionPipeline.from_pretrained` loads
    (an SDXL pipeline: `StableDiffusionXLPipeline`, with text_encoder_2/ and tokenizer_2/).

    The weights keep the pipeline's dtype (float32, bfloat16 or float16); the folder loads and samples
    in diffusers/transformers with their default calls, no dtype argument (see `_saved_config`).

    The folder is assembled under a temporary name and renamed into place, so a crash never
    leaves a half-written model where a complete one is expected.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise PretrainedError(f"{path}: already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o755)
    try:
        components = {**_COMPONENTS, **(_SDXL_COMPONENTS if pipe.is_sdxl else {})}
        for name, (_, library) in components.items():
            sub = tmp / name
            sub.mkdir()
            _write_json(sub / "config.json", _saved_config(name, pipe.configs[name]))
            weights = "model.safetensors" if library == "transformers" else "diffusion_pytorch_model.safetensors"
            save_file(convert.to_torch_state_dict(pipe.module(name)), str(sub / weights), metadata={"format": "pt"})
        tokenizers = [("tokenizer", pipe.tokenizer, pipe.tokenizer_path)]
        if pipe.is_sdxl:
            tokenizers.append(("tokenizer_2", pipe.tokenizer_2, pipe.tokenizer_2_path))
        for tok_name, tokenizer, tok_path in tokenizers:
            src = Path(tok_path) if tok_path else None
            if src is not None and src.is_dir():
                shutil.copytree(src, tmp / tok_name)
            else:
                tokenizer.save_pretrained(str(tmp / tok_name))
        (tmp / "scheduler").mkdir()
        _write_json(tmp / "scheduler" / "scheduler_config.json", pipe.scheduler_config)
        index = {
            "_class_name": pipe.model_index.get("_class_name", "StableDiffusionPipeline"),
            "_diffusers_version": pipe.model_index.get("_diffusers_version", "0.21.0"),
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", pipe.scheduler_config.get("_class_name", "PNDMScheduler")],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        if pipe.is_sdxl:
            for key in ("safety_checker", "requires_safety_checker"):
                del index[key]
            index.update(_class_name="StableDiffusionXLPipeline", image_encoder=[None, None],
                         text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                         tokenizer_2=["transformers", "CLIPTokenizer"],
                         force_zeros_for_empty_prompt=pipe.model_index.get("force_zeros_for_empty_prompt", True))
        _write_json(tmp / "model_index.json", index)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------------------------
# Random weights (smoke runs, benchmarks, shape checks)
# ----------------------------------------------------------------------------------------------

def random_params(abstract_state: Any, seed: int = 0) -> Any:
    """Fills an abstract NNX state with numpy draws: kernels N(0, 1/fan_in), norm scales 1,
    embeddings N(0, 0.02^2), biases 0. Seconds for 1B parameters, unlike eager module init."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        keys = [getattr(k, "key", None) for k in path]  # the last dict key; Variables add a `.value` attr
        name = str([k for k in keys if k is not None][-1])
        if name == "kernel":
            std = 1.0 / np.sqrt(int(np.prod(leaf.shape[:-1])))
        elif name == "embedding":
            std = 0.02
        else:
            return np.full(leaf.shape, 1.0 if name == "scale" else 0.0, leaf.dtype)
        return (rng.standard_normal(leaf.shape, dtype=np.float32) * std).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract_state)


def random_pipeline(configs: Mapping[str, dict], scheduler_config: dict, tokenizer_path: str | os.PathLike,
                    *, dtype: Any = jnp.float32, seed: int = 0) -> Pipeline:
    """A Pipeline with random weights from diffusers-style `configs` (text_encoder, vae, unet; with
    text_encoder_2 an SDXL pipeline, both towers reading the one tokenizer)."""
    dtype = check_dtype(dtype)
    graphdefs, params, model_configs = {}, {}, {}
    sdxl = "text_encoder_2" in configs
    for i, name in enumerate(("text_encoder", "vae", "unet") + (("text_encoder_2",) if sdxl else ())):
        config_cls, model_cls, _, _ = model_classes(name)
        model_configs[name] = config = config_cls.from_dict(configs[name])
        abstract = nnx.eval_shape(lambda: model_cls(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
        graphdefs[name], state = nnx.split(abstract)
        params[name] = jax.device_put(random_params(state, seed + i))
    return Pipeline(tokenizer=load_tokenizer(tokenizer_path), graphdefs=graphdefs, params=params,
                    model_configs=model_configs, configs={k: dict(configs[k]) for k in graphdefs},
                    scheduler_config=dict(scheduler_config), dtype=dtype, tokenizer_path=str(tokenizer_path),
                    model_index={"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"},
                    tokenizer_2=load_tokenizer(tokenizer_path) if sdxl else None,
                    tokenizer_2_path=str(tokenizer_path) if sdxl else None)
