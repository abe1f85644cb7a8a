"""AutoencoderKL: parity with diffusers, legacy checkpoint keys, SD 1.5 parameter count, weight errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx

from datasetdm_jax.convert import WeightsError, load_torch_state_dict
from datasetdm_jax.models import presets
from datasetdm_jax.models.vae import (
    AutoencoderKL,
    AutoencoderKLConfig,
    prepare_vae_state_dict,
    rename_legacy_vae_key,
    sample_latent,
)
from tiny_sd import nchw, nhwc, rel_err

TINY = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}

@pytest.fixture(scope="module")
def torch_vae():
    torch.manual_seed(0)
    model = TorchAutoencoderKL(**TINY).eval()
    with torch.no_grad():  # non-trivial norm affine params and biases
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def state_dict(torch_vae):
    return {k: v.numpy() for k, v in torch_vae.state_dict().items()}


@pytest.fixture(scope="module")
def jax_vae(state_dict):
    model = AutoencoderKL(AutoencoderKLConfig.from_dict(TINY), rngs=nnx.Rngs(0))
    load_torch_state_dict(model, prepare_vae_state_dict(state_dict), source="tiny vae")
    return model


@pytest.fixture(scope="module")
def jitted(jax_vae):
    graphdef, state = nnx.split(jax_vae)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        mean, logvar = m.encode(x)
        return mean, logvar, m.decode(mean)

    return lambda model, x: run(nnx.state(model), x)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


def test_parity_with_diffusers(torch_vae, jax_vae, jitted, image):
    with torch.no_grad():
        post = torch_vae.encode(nchw(image)).latent_dist
        ref_dec = torch_vae.decode(post.mean).sample
    mean, logvar, dec = jitted(jax_vae, jnp.asarray(image))
    assert mean.shape == (2, 16, 16, 4) and dec.shape == image.shape
    assert rel_err(mean, nhwc(post.mean)) < 1e-4
    assert rel_err(logvar, nhwc(post.logvar)) < 1e-4
    assert rel_err(dec, nhwc(ref_dec)) < 1e-4

    z = sample_latent(mean, logvar, jax.random.key(0))
    assert z.shape == mean.shape and np.isfinite(np.asarray(z)).all()
    assert not np.allclose(z, mean)


def test_legacy_keys_load_the_same(state_dict, jax_vae, jitted, image):
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in state_dict.items():
        for new, old in legacy_names.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if key.endswith("weight"):  # LDM-converted checkpoints keep 1x1 conv shapes
                    value = value[:, :, None, None]
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    assert rename_legacy_vae_key("decoder.mid_block.attentions.0.proj_attn.bias") == (
        "decoder.mid_block.attentions.0.to_out.0.bias"
    )
    assert rename_legacy_vae_key("encoder.down_blocks.0.resnets.0.conv1.weight") == (
        "encoder.down_blocks.0.resnets.0.conv1.weight"
    )
    model = AutoencoderKL(TINY, rngs=nnx.Rngs(1))
    load_torch_state_dict(model, prepare_vae_state_dict(legacy), source="legacy vae")
    ours = jitted(model, jnp.asarray(image))
    ref = jitted(jax_vae, jnp.asarray(image))
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sd15_param_count_matches_diffusers():
    with torch.device("meta"):
        torch_model = TorchAutoencoderKL(**{k: v for k, v in presets.SD15_VAE.items() if k != "_class_name"})
    ref = sum(p.numel() for p in torch_model.parameters())
    abstract = nnx.eval_shape(lambda: AutoencoderKL(presets.SD15_VAE, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert ref == ours == 83_653_863


def test_misshaped_tensor_names_the_key(state_dict):
    bad = dict(state_dict)
    key = "decoder.up_blocks.1.resnets.0.conv2.weight"
    bad[key] = np.zeros((1, 2, 3, 3), np.float32)
    model = AutoencoderKL(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(WeightsError, match=key.replace(".", r"\.")):
        load_torch_state_dict(model, prepare_vae_state_dict(bad))


def test_config_refuses_unsupported():
    with pytest.raises(ValueError, match="down_block_types"):
        AutoencoderKLConfig.from_dict({**TINY, "down_block_types": ["DownBlock2D", "DownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="act_fn"):
        AutoencoderKLConfig.from_dict({**TINY, "act_fn": "gelu"})
    cfg = AutoencoderKLConfig.from_dict({**presets.SD15_VAE, "shift_factor": 0.1159, "latents_mean": None})
    assert cfg.shift_factor == pytest.approx(0.1159) and cfg.downsample_factor == 8


def test_decoder_capture_matches_torch_up_block_outputs(torch_vae, jax_vae, image):
    """`decode(z, capture=True)`: the same image, and each up block's output equals diffusers' (forward hooks)."""
    from datasetdm_jax import features

    outs = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(f"up{k}", o))
             for k, b in enumerate(torch_vae.decoder.up_blocks)]
    try:
        with torch.no_grad():
            mean_t = torch_vae.encode(nchw(image)).latent_dist.mean
            torch_vae.decode(mean_t)
    finally:
        for h in hooks:
            h.remove()
    mean = jnp.asarray(nhwc(mean_t))
    img, taps = jax_vae.decode(mean, capture=True)
    assert rel_err(img, jax_vae.decode(mean)) < 1e-6
    assert sorted(taps) == sorted(outs) == ["up0", "up1"]
    for name, t in outs.items():
        assert rel_err(taps[name], nhwc(t)) < 1e-4, name
    # Both up blocks end at 32 px (the last has no upsampler): one 96-channel level, forward order.
    maps = features.vae_maps(taps, (32,))
    assert list(maps) == [32] and maps[32].shape == (2, 32, 32, 96)
    np.testing.assert_array_equal(maps[32][..., :64], taps["up0"])
    with pytest.raises(ValueError, match="not at \\[64\\]"):
        features.vae_maps(taps, (64,))
    feats = features.Features(maps={16: jnp.zeros((2, 16, 16, 3))}, cross_attention={})
    assert sorted(features.add_maps(feats, maps).maps) == [16, 32]
    with pytest.raises(ValueError, match="already come from the UNet"):
        features.add_maps(feats, {16: jnp.zeros((2, 16, 16, 1))})
