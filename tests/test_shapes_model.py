"""The shipped shapes-world model: read by our loader exactly as SD 1.5, and by diffusers' pipeline."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from datasetdm_jax import assets, generate, pretrained
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.shapes_sd import models as sd_models
from tiny_sd import nchw, rel_err

PROMPTS = ["a red circle on a plain background", "a blue person and a green square on a dark striped background"]
STEPS = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir():
    return assets.shapes_sd_path()  # fails (does not skip) when the shipped model is missing


def test_shipped_model_is_small_and_safetensors_only(model_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(model_dir) for f in fs]
    assert not [f for f in files if f.endswith((".bin", ".ckpt", ".pt", ".pkl"))]
    weights = [f for f in files if f.endswith(".safetensors")]
    assert {os.path.basename(os.path.dirname(f)) for f in weights} == {"unet", "vae", "text_encoder"}
    assert sum(os.path.getsize(f) for f in files) < 25 * 2**20
    index = json.load(open(os.path.join(model_dir, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_shapes_sd_config_describes_the_shipped_model(model_dir):
    """So that `datasetdm pretrain init_from=<shipped folder>` continues training without overrides."""
    config = load_config(os.path.join(ROOT, "configs", "shapes_sd.py"))
    for name, cfg in (("unet", config.unet), ("vae", config.vae.model)):
        theirs = json.load(open(os.path.join(model_dir, name, "config.json")))
        assert sd_models.config_conflicts(cfg.to_dict(), theirs) == [], name
    assert sd_models.config_conflicts({"layers_per_block": 1}, {"layers_per_block": 2}) == ["layers_per_block"]


def test_our_loader_and_diffusers_sample_the_same_images(model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = pretrained.load_pipeline(model_dir, dtype=jnp.float32)
    ours = generate.sample(pipe, PROMPTS, steps=STEPS, guidance=7.5, scheduler="pndm", seed=0)
    size = pipe.configs["unet"]["sample_size"]
    x_T = generate.initial_noise(0, np.arange(len(PROMPTS)), (size, size, 4))
    torch_pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32, safety_checker=None,
                                                         requires_safety_checker=False)
    torch_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = torch_pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, latents=nchw(x_T),
                            output_type="np").images
    px = size * pipe.vae_scale_factor
    assert ours.shape == theirs.shape == (len(PROMPTS), px, px, 3)
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)
    assert ours.std() > 0.05  # a real picture, not a flat field
