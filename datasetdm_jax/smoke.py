"""`datasetdm smoke`: the whole real-weights path on a tiny random Stable Diffusion, no downloads.

Builds random tiny models from diffusers-style configs, writes them as a diffusers-format folder,
reads the folder back through `load_pipeline` (the loader used for SD 1.5), samples with all steps
in one jit and captures the DatasetDM features at the last step.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp

from datasetdm_jax import generate, pretrained
from datasetdm_jax.data import shapes
from datasetdm_jax.tokenizer import write_clip_tokenizer

TINY_UNET = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 4, "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 8, "sample_size": 8, "in_channels": 4, "out_channels": 4,
}
TINY_VAE = {
    "block_out_channels": [16, 32], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8,
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "in_channels": 3, "out_channels": 3, "sample_size": 16, "scaling_factor": 0.5,
}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
# A tiny SDXL (`datasetdm bench --model sdxl`; tests/tiny_sdxl.py builds it with diffusers): no
# attention at the first level, 1 / 2 transformer layers, linear projections, text_time
# micro-conditioning from the second text tower's pooled output.
TINY_SDXL_UNET = {
    "sample_size": 16, "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "attention_head_dim": [2, 4],
    "transformer_layers_per_block": [1, 2], "cross_attention_dim": 32 + 48, "norm_num_groups": 8,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 24,
}
TINY_SDXL_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 4,
                  "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32}
TINY_SDXL_TEXT_2 = {**TINY_SDXL_TEXT, "hidden_size": 48, "intermediate_size": 40, "hidden_act": "gelu",
                    "projection_dim": 24}
TINY_SDXL_VAE = {**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}
PNDM_SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "prediction_type": "epsilon", "timestep_spacing": "leading"}
# SDXL base's scheduler (Euler, leading spacing) on SD's betas; PNDM's keys stay for the other samplers.
EULER_SDXL = {**PNDM_SD15, "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
              "use_karras_sigmas": False}


def random_pipeline(folder: str | Path, seed: int = 0) -> pretrained.Pipeline:
    """A random-weight tiny pipeline whose tokenizer knows the shapes world's words."""
    tok_dir = Path(folder) / "tokenizer_src"
    vocab = write_clip_tokenizer(tok_dir, shapes.caption_vocabulary())
    text_cfg = {**TINY_TEXT, "vocab_size": len(vocab), "bos_token_id": vocab["<|startoftext|>"],
                "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"]}
    configs = {"text_encoder": text_cfg, "vae": TINY_VAE, "unet": TINY_UNET}
    return pretrained.random_pipeline(configs, PNDM_SD15, tok_dir, seed=seed)


def main(out: str = "work/smoke", steps: int = 4) -> None:
    t0 = time.perf_counter()
    model_dir = pretrained.save_pipeline(random_pipeline(out), Path(out) / "model", overwrite=True)
    pipe = pretrained.load_pipeline(model_dir, dtype=jnp.float32)
    print(f"wrote and reloaded a tiny diffusers-format model at {model_dir} ({time.perf_counter() - t0:.1f} s)")
    prompts = ["a red circle on a striped background", "a blue person and a green square"]
    for label in ("compile + run", "run"):
        t0 = time.perf_counter()
        images, feats = generate.sample_with_features(pipe, prompts, steps=steps, guidance=7.5, scheduler="pndm")
        jax.block_until_ready(feats)
        print(f"{label}: {len(prompts)} images, {steps} PNDM steps + capture, {time.perf_counter() - t0:.2f} s")
    print(f"images {images.shape} in [{images.min():.2f}, {images.max():.2f}]")
    for res, m in sorted(feats.maps.items()):
        print(f"  features at {res}x{res}: maps {tuple(m.shape)}, cross-attention {tuple(feats.cross_attention[res].shape)}"
              if res in feats.cross_attention else f"  features at {res}x{res}: maps {tuple(m.shape)}")
