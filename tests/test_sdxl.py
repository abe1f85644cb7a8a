"""SDXL: the UNet's micro-conditioning and per-block depths, both text encoders, the VAE's scale,
the loader and the sampler, each against diffusers/transformers on tiny random weights."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

import diffusers
import torch
from datasetdm_jax.models import presets
from datasetdm_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel, count_params
from test_unet import jax_unet, torch_unet
from tiny_sd import rel_err

POOLED = 24
SDXL_TINY = {
    "sample_size": 16,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": [2, 4],
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + POOLED,
}


@pytest.fixture(scope="module")
def unet_pair():
    pt = torch_unet(SDXL_TINY)
    graphdef, state = nnx.split(jax_unet(SDXL_TINY, pt))

    @jax.jit
    def apply(state, x, t, ctx, pooled, time_ids):
        return nnx.merge(graphdef, state)(x, t, ctx, text_embeds=pooled, time_ids=time_ids)

    return pt, lambda *a: apply(state, *a)


def test_unet_parity_with_diffusers(unet_pair):
    pt, apply = unet_pair
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    pooled = rng.standard_normal((2, POOLED)).astype(np.float32)
    time_ids = np.array([[128, 96, 0, 0, 128, 96], [64, 64, 8, 4, 128, 128]], np.float32)
    t = np.array([3.0, 911.0], np.float32)
    with torch.no_grad():
        ref = pt(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx),
                 added_cond_kwargs={"text_embeds": torch.from_numpy(pooled),
                                    "time_ids": torch.from_numpy(time_ids)}).sample
    out = apply(x, t, ctx, pooled, time_ids)
    assert rel_err(out, ref.permute(0, 2, 3, 1).numpy()) < 1e-4
    # The micro-conditioning matters: other time ids give another output.
    assert rel_err(apply(x, t, ctx, pooled, time_ids[::-1]), out) > 1e-3


def test_unet_layout():
    model = nnx.eval_shape(lambda: UNet2DConditionModel(SDXL_TINY, rngs=nnx.Rngs(0)))
    assert model.down_blocks[0].attentions is None and model.up_blocks[1].attentions is None
    assert len(model.down_blocks[1].attentions[0].transformer_blocks) == 2
    assert len(model.mid_block.attentions[0].transformer_blocks) == 2
    assert len(model.up_blocks[0].attentions[0].transformer_blocks) == 2
    assert UNet2DConditionConfig.from_dict(SDXL_TINY).pooled_dim == POOLED
    with pytest.raises(ValueError, match="text_embeds and time_ids"):
        jax.eval_shape(lambda: UNet2DConditionModel(SDXL_TINY, rngs=nnx.Rngs(0))(
            jnp.zeros((1, 16, 16, 4)), 1.0, jnp.zeros((1, 7, 32))))


def test_real_unet_param_count():
    with torch.device("meta"):
        pt = diffusers.UNet2DConditionModel.from_config(presets.SDXL_UNET)
    n = sum(p.numel() for p in pt.parameters())
    assert count_params(presets.SDXL_UNET) == n == presets.SDXL_UNET_PARAMS


@pytest.mark.parametrize("key,value", [
    ("addition_embed_type", "text"),
    ("addition_time_embed_dim", None),
    ("projection_class_embeddings_input_dim", 48),
    ("transformer_layers_per_block", [1, 2, 3]),
])
def test_bad_sdxl_config_raises(key, value):
    with pytest.raises(ValueError, match=key):
        UNet2DConditionConfig.from_dict({**SDXL_TINY, key: value})
