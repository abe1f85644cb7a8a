"""The models `datasetdm bench` runs: the shapes-world SD, SD 1.5 / 2.1 shapes, a tiny SD and a
tiny SDXL (`smoke.TINY_SDXL_*`, timed beside diffusers' SDXL pipeline).

All but the shipped shapes model get random weights (`pretrained.random_pipeline`): timings and
FLOPs depend on shapes, not on weight values. Memory analysis needs no weights at all
(`abstract_pipeline`), so SD-sized programs can be compiled and measured without being run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from datasetdm_jax import pretrained, smoke
from datasetdm_jax.config_utils import configs_dir
from datasetdm_jax.assets import shapes_sd_path
from datasetdm_jax.models import presets

from datasetdm_jax.bench.config import MODELS
CONFIGS_DIR = Path(configs_dir())  # the shipped configs (installed package or checkout)


def configs_file(name: str) -> str:
    """Path of a shipped config file; a one-line error when it is missing."""
    path = CONFIGS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    return str(path)


def _shapes_configs(workdir: Path) -> tuple[dict, dict, str]:
    from datasetdm_jax.config_utils import load_config
    from datasetdm_jax.shapes_sd import data as sd_data

    config = load_config(configs_file("shapes_sd.py"))
    tok_dir = sd_data.ensure_tokenizer(str(workdir), config)
    tok = pretrained.load_tokenizer(tok_dir)
    configs = {"text_encoder": sd_data.text_encoder_dict(config, tok),
               "vae": sd_data.plain(config.vae.model.to_dict()), "unet": sd_data.plain(config.unet.to_dict())}
    return configs, sd_data.plain(config.scheduler.to_dict()), tok_dir


def _sd_configs(name: str, workdir: Path) -> tuple[dict, dict, str]:
    from datasetdm_jax.data import shapes
    from datasetdm_jax.tokenizer import write_clip_tokenizer

    tok_dir = workdir / "tokenizer"
    vocab = write_clip_tokenizer(tok_dir, shapes.caption_vocabulary(), 77)
    text = dict(presets.SD21_TEXT_ENCODER if name == "sd21" else presets.SD15_TEXT_ENCODER)
    # SD's vocabulary size (so parameter counts match SD's), the small tokenizer's special ids.
    text.update(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])
    unet = presets.SD21_UNET if name == "sd21" else presets.SD15_UNET
    return {"text_encoder": text, "vae": dict(presets.SD15_VAE), "unet": dict(unet)}, dict(smoke.PNDM_SD15), str(tok_dir)


def model_configs(name: str, workdir: str | os.PathLike) -> tuple[dict, dict, str]:
    """(component configs, scheduler config, tokenizer folder) for a random-weight `name`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "shapes":
        return _shapes_configs(workdir)
    if name in ("sd15", "sd21"):
        return _sd_configs(name, workdir)
    if name in ("tiny", "sdxl"):
        tok_dir = workdir / "tokenizer"
        from datasetdm_jax.data import shapes
        from datasetdm_jax.tokenizer import write_clip_tokenizer
        vocab = write_clip_tokenizer(tok_dir, shapes.caption_vocabulary())
        ids = {"vocab_size": len(vocab), "bos_token_id": vocab["<|startoftext|>"],
               "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"]}
        if name == "tiny":
            configs = {"text_encoder": {**smoke.TINY_TEXT, **ids}, "vae": smoke.TINY_VAE, "unet": smoke.TINY_UNET}
            return configs, dict(smoke.PNDM_SD15), str(tok_dir)
        configs = {"text_encoder": {**smoke.TINY_SDXL_TEXT, **ids}, "text_encoder_2": {**smoke.TINY_SDXL_TEXT_2, **ids},
                   "vae": smoke.TINY_SDXL_VAE, "unet": smoke.TINY_SDXL_UNET}
        return configs, dict(smoke.EULER_SDXL), str(tok_dir)
    raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {name!r}")


def load_model(name: str, workdir: str | os.PathLike, dtype: Any = jnp.float32
               ) -> tuple[pretrained.Pipeline, str, str | None]:
    """(pipeline, source, folder): the shipped shapes model (and its folder) when present, else
    random weights (folder None: `export` writes one on demand)."""
    if name == "shapes":
        try:
            folder = shapes_sd_path()
            return pretrained.load_pipeline(folder, dtype=dtype), f"shipped weights ({folder})", folder
        except FileNotFoundError:
            pass
    configs, sched, tok_dir = model_configs(name, workdir)
    source = "random weights, " + {"shapes": "configs/shapes_sd.py (no shipped model yet)",
                                   "sdxl": "tiny SDXL config (smoke.TINY_SDXL_*)"}.get(name, f"{name} config")
    return pretrained.random_pipeline(configs, sched, tok_dir, dtype=dtype), source, None


def export(pipe: pretrained.Pipeline, workdir: str | os.PathLike, folder: str | None = None) -> str:
    """A diffusers-format folder with `pipe`'s weights (for diffusers and fresh processes)."""
    return folder or str(pretrained.save_pipeline(pipe, Path(workdir) / "model", overwrite=True))


def abstract_pipeline(name: str, workdir: str | os.PathLike, dtype: Any = jnp.bfloat16) -> pretrained.Pipeline:
    """A Pipeline whose params are `jax.ShapeDtypeStruct`s: for lowering and compiling, not running."""
    configs, sched, tok_dir = model_configs(name, workdir)
    graphdefs, params, model_configs_ = {}, {}, {}
    for comp in ("text_encoder", "vae", "unet"):
        config_cls, model_cls, _, _ = pretrained.model_classes(comp)
        model_configs_[comp] = cfg = config_cls.from_dict(configs[comp])
        abstract = nnx.eval_shape(lambda: model_cls(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
        graphdefs[comp], params[comp] = nnx.split(abstract)
    return pretrained.Pipeline(tokenizer=pretrained.load_tokenizer(tok_dir), graphdefs=graphdefs, params=params,
                               model_configs=model_configs_, configs={k: dict(v) for k, v in configs.items()},
                               scheduler_config=sched, dtype=dtype, tokenizer_path=tok_dir)


def param_counts(pipe: pretrained.Pipeline) -> dict[str, int]:
    return {k: int(sum(np.prod(x.shape) for x in jax.tree.leaves(v))) for k, v in pipe.params.items()}


def native_size(pipe: pretrained.Pipeline) -> int:
    """The model's training image size in pixels (UNet sample_size x VAE factor)."""
    s = pipe.configs["unet"].get("sample_size", 64)
    return int(s if isinstance(s, int) else s[0]) * pipe.vae_scale_factor
