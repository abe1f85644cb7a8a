"""Test helper: a tiny random Stable Diffusion XL folder in diffusers format, written by diffusers.

SDXL's layout at toy width: a UNet with no attention in its first level, 1/2 transformer layers,
linear projections and text_time micro-conditioning; CLIP (`text_encoder`) plus CLIP with
projection (`text_encoder_2`, gelu); two tokenizers that pad differently (`<|endoftext|>` and `!`,
as SDXL's); a VAE with SDXL's scaling factor. Torch and diffusers are imported inside functions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tiny_sd import SCHEDULER_CONFIG, VAE_CONFIG, WORDS, _perturb

from datasetdm_jax import smoke

# The package's tiny SDXL layout (`datasetdm bench --model sdxl` builds it with random JAX weights).
UNET_CONFIG, TEXT_CONFIG, TEXT_CONFIG_2 = smoke.TINY_SDXL_UNET, smoke.TINY_SDXL_TEXT, smoke.TINY_SDXL_TEXT_2
# SDXL base's scheduler: Euler, leading spacing; the sampler tests set DDIM/PNDM on both sides.
EULER_CONFIG = dict(SCHEDULER_CONFIG, _class_name="EulerDiscreteScheduler", interpolation_type="linear",
                    use_karras_sigmas=False, timestep_spacing="leading")


def _pad_with(folder: Path, token: str) -> None:
    """Makes a tokenizer folder pad with `token` (SDXL's second tokenizer pads with '!')."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = json.loads((folder / name).read_text())
        data["pad_token"] = token
        (folder / name).write_text(json.dumps(data, indent=2))


def build_tiny_sdxl(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Writes a tiny random SDXL folder (safetensors) to `folder` and returns its path."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from datasetdm_jax.tokenizer import load_tokenizer, write_clip_tokenizer

    folder = Path(folder)
    tok_dirs = [folder.parent / (folder.name + f"_tok{i}") for i in (1, 2)]
    vocab = write_clip_tokenizer(tok_dirs[0], WORDS)
    write_clip_tokenizer(tok_dirs[1], WORDS)
    _pad_with(tok_dirs[1], "!")
    tokenizer, tokenizer_2 = load_tokenizer(tok_dirs[0]), load_tokenizer(tok_dirs[1])
    ids = dict(vocab_size=len(vocab), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**{**VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True})
    text_encoder = CLIPTextModel(CLIPTextConfig(pad_token_id=tokenizer.pad_token_id, **ids, **TEXT_CONFIG))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(pad_token_id=tokenizer_2.pad_token_id, **ids, **TEXT_CONFIG_2))
    for i, m in enumerate((unet, vae, text_encoder, text_encoder_2)):
        _perturb(m, seed + i + 1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=EulerDiscreteScheduler(**{k: v for k, v in EULER_CONFIG.items()
                                                                        if not k.startswith("_")
                                                                        and k not in ("set_alpha_to_one",
                                                                                      "skip_prk_steps")}))
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for name, src in zip(("tokenizer", "tokenizer_2"), tok_dirs):
        shutil.rmtree(folder / name)
        shutil.copytree(src, folder / name)
        shutil.rmtree(src)
    return folder


def torch_pipeline(folder: str | os.PathLike):
    """diffusers' StableDiffusionXLPipeline (CPU, float32, no progress bar) for a saved folder."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe
