"""Test helper: a tiny random Stable Diffusion folder in diffusers format, made with torch.

It has SD 1.5's layout (4-level UNet with cross-attention in the first three levels, a KL VAE,
a CLIP text tower, a CLIP BPE tokenizer folder, a PNDM scheduler) at toy width, so loader,
converter and parity tests exercise the real code paths in seconds. Norm scales and biases are
perturbed away from their 1/0 init so that a swapped or dropped affine parameter shows up.
Torch, diffusers and transformers are imported only here, inside functions.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

WORDS = ["a", "an", "the", "of", "on", "and", "photo", "red", "green", "blue", "yellow", "circle",
         "square", "triangle", "star", "small", "large", "background"]

IMAGE_SIZE = 32  # pixels; latents are 16 x 16 (the VAE downsamples once)
LATENT_SIZE = 16

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=2,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=IMAGE_SIZE,
    scaling_factor=0.5,
)

TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)


def _perturb(module, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:  # norm scales/biases and layer biases start at constants
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def build_tiny_sd(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Writes a tiny random SD folder (safetensors) to `folder` and returns its path."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from datasetdm_jax.tokenizer import load_tokenizer, write_clip_tokenizer

    folder = Path(folder)
    tok_dir = folder.parent / (folder.name + "_tokenizer_src")
    vocab = write_clip_tokenizer(tok_dir, WORDS)
    tokenizer = load_tokenizer(tok_dir)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG))
    for i, m in enumerate((unet, vae, text_encoder)):
        _perturb(m, seed + i + 1)
    scheduler = PNDMScheduler(**SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    # Real SD folders carry vocab.json + merges.txt; ship exactly the files we wrote.
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(tok_dir, folder / "tokenizer")
    shutil.rmtree(tok_dir)
    return folder


def torch_pipeline(folder: str | os.PathLike):
    """diffusers' StableDiffusionPipeline (CPU, no progress bar) for a saved folder, loaded with the
    plain call a user would type (no dtype: every component float32, whatever the stored dtype)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the parity metric of the test suite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def nchw(x):
    """NHWC numpy/JAX -> NCHW torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t):
    """NCHW torch tensor -> NHWC numpy."""
    return t.detach().numpy().transpose(0, 2, 3, 1)


def save_random_decoder(config, trainer) -> None:
    """What `train.run` writes at a checkpoint, with the initial (random) decoder parameters: lets
    generation tests use a 'trained' decoder without training one."""
    import jax
    import orbax.checkpoint as ocp

    from datasetdm_jax import train, training_state

    mngr = training_state.checkpoint_manager(str(config.workdir), train.STAGE, 2)
    params = jax.device_get(trainer.init_params)
    mngr.save(1, args=ocp.args.Composite(
        data=ocp.args.JsonSave({"note": "test"}), params=ocp.args.StandardSave(params),
        train=ocp.args.StandardSave({"step": np.ones((), np.int32), "opt": trainer.tx.init(params)})), force=True)
    mngr.wait_until_finished()
    mngr.close()
