"""UNet2DConditionModel: parity with diffusers on tiny random configs, SD 1.5 size, config errors."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from datasetdm_jax.convert import load_torch_state_dict
from datasetdm_jax.models import presets
from datasetdm_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel, count_params

import diffusers
import torch
from tiny_sd import rel_err

SD1_TINY = {
    "sample_size": 16,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}
SD2_TINY = {
    **SD1_TINY,
    "attention_head_dim": [2, 4],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
    "upcast_attention": True,
    "freq_shift": 1,
    "flip_sin_to_cos": False,
}


def torch_unet(config: dict, seed: int = 0):
    """diffusers UNet with random weights, norm affines randomised too (their init is 1/0)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return model


def jax_unet(config: dict, model_pt):
    model = UNet2DConditionModel(config, rngs=nnx.Rngs(0))
    load_torch_state_dict(model, {k: v.numpy() for k, v in model_pt.state_dict().items()})
    return model


def inputs(config: dict, batch: int = 2, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((batch, 7, config["cross_attention_dim"])).astype(np.float32)
    return x, ctx


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request):
    config = SD1_TINY if request.param == "sd1" else SD2_TINY
    pt = torch_unet(config)
    model = jax_unet(config, pt)
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state, x, t, ctx):
        return nnx.merge(graphdef, state)(x, t, ctx)

    return config, pt, lambda x, t, ctx: apply(state, x, t, ctx)


@pytest.mark.parametrize("timesteps", ["scalar", "vector"])
def test_parity_with_diffusers(pair, timesteps):
    config, pt, apply = pair
    x, ctx = inputs(config)
    t = np.float32(37.0) if timesteps == "scalar" else np.array([3.0, 911.0], np.float32)
    with torch.no_grad():
        ref = pt(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(np.asarray(t)), torch.from_numpy(ctx)).sample
    out = apply(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
    assert out.shape == x.shape
    assert rel_err(out, ref.permute(0, 2, 3, 1).numpy()) < 1e-4


def test_attribute_paths_match_state_dict():
    """Linear vs conv projections follow use_linear_projection, and the key sets are identical."""
    for config in (SD1_TINY, SD2_TINY):
        model = nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)))
        proj = model.down_blocks[0].attentions[0].proj_in
        assert isinstance(proj, nnx.Linear if config.get("use_linear_projection") else nnx.Conv)
    # SD2_TINY: 4 heads of 16 at block 1 (attention_head_dim is the head count).
    assert model.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 4


def test_sd15_param_count():
    assert count_params(presets.SD15_UNET) == presets.SD15_UNET_PARAMS == 859_520_964
    with torch.device("meta"):
        pt = diffusers.UNet2DConditionModel.from_config(presets.SD15_UNET)
    assert sum(p.numel() for p in pt.parameters()) == presets.SD15_UNET_PARAMS


def test_config_parsing():
    cfg = UNet2DConditionConfig.from_dict(presets.SD21_UNET)
    assert cfg.num_attention_heads == (5, 10, 20, 20) and cfg.cross_attention_dim == (1024,) * 4
    assert cfg.use_linear_projection and cfg.upcast_attention
    cfg = UNet2DConditionConfig.from_dict({**presets.SD15_UNET, "some_future_key": 1})
    assert cfg.num_attention_heads == (8,) * 4


@pytest.mark.parametrize(
    "key,value",
    [
        ("class_embed_type", "timestep"),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 4),
        ("attention_head_dim", [8, 8]),
        ("only_cross_attention", True),
        ("time_embedding_type", "fourier"),
        ("act_fn", "gelu"),
        ("dual_cross_attention", True),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ],
)
def test_bad_config_raises(key, value):
    with pytest.raises(ValueError, match=key.split("_")[0]):
        UNet2DConditionConfig.from_dict({**presets.SD15_UNET, key: value})
