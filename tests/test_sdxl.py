"""SDXL: the UNet's micro-conditioning and per-block depths, both text encoders, the VAE's scale,
the loader and the sampler, each against diffusers/transformers on tiny random weights."""

import shutil

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

import diffusers
import torch
from datasetdm_jax.convert import load_torch_state_dict
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
    from datasetdm_jax.models.abstract import abstract_module

    model = abstract_module(lambda rngs: UNet2DConditionModel(SDXL_TINY, rngs=rngs))
    assert model.down_blocks[0].attentions is None and model.up_blocks[1].attentions is None
    assert len(model.down_blocks[1].attentions[0].transformer_blocks) == 2
    assert len(model.mid_block.attentions[0].transformer_blocks) == 2
    assert len(model.up_blocks[0].attentions[0].transformer_blocks) == 2
    assert UNet2DConditionConfig.from_dict(SDXL_TINY).pooled_dim == POOLED
    with pytest.raises(ValueError, match="text_embeds and time_ids"):
        model._added_embedding(1, None, jnp.zeros((1, 6)))
    with pytest.raises(ValueError, match="pooled width"):
        model._added_embedding(1, jnp.zeros((1, POOLED + 1)), jnp.zeros((1, 6)))


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


# --- text encoders -------------------------------------------------------------------------------

TEXT_TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=77, bos_token_id=98, eos_token_id=2, pad_token_id=1)
TEXT_TINY_2 = {**TEXT_TINY, "hidden_size": 48, "num_attention_heads": 4, "intermediate_size": 40,
               "projection_dim": POOLED, "hidden_act": "gelu"}


def torch_text(cls, config: dict, seed: int):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(**config)
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    return model


def jax_text(cls, config: dict, pt):
    from datasetdm_jax.pretrained import text_encoder_key

    model = cls(config, rngs=nnx.Rngs(0))
    load_torch_state_dict(model, {k: v.numpy() for k, v in pt.state_dict().items()}, rename=text_encoder_key)
    return model


def text_ids(batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 97, size=(batch, 77))
    ids[:, 0] = 98
    for b in range(batch):
        ids[b, 5 + 9 * b] = 99  # legacy eos_token_id == 2: the pooled token is the largest id
        ids[b, 6 + 9 * b:] = 1
    return ids


@pytest.fixture(scope="module")
def text_pair():
    import transformers
    from datasetdm_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection

    pt1 = torch_text(transformers.CLIPTextModel, TEXT_TINY, 0)
    pt2 = torch_text(transformers.CLIPTextModelWithProjection, TEXT_TINY_2, 1)
    return pt1, pt2, jax_text(CLIPTextModel, TEXT_TINY, pt1), jax_text(CLIPTextModelWithProjection, TEXT_TINY_2, pt2)


def test_text_encoder_with_projection_parity(text_pair):
    _, pt2, _, model2 = text_pair
    ids = text_ids()
    with torch.no_grad():
        ref = pt2(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    embeds, out = jax.jit(lambda i: model2.text_embeds(i, output_hidden_states=True))(ids)
    assert rel_err(embeds, ref.text_embeds.numpy()) < 1e-4
    assert rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()) < 1e-4
    hidden, pooled = jax.jit(lambda i: model2.penultimate_and_pooled(i))(ids)
    assert rel_err(hidden, ref.hidden_states[-2].numpy()) < 1e-4 and rel_err(pooled, ref.text_embeds.numpy()) < 1e-4
    hidden, _ = jax.jit(lambda i: model2.penultimate_and_pooled(i, clip_skip=1))(ids)
    assert rel_err(hidden, ref.hidden_states[-3].numpy()) < 1e-4


def test_sdxl_prompt_embeds(text_pair):
    from datasetdm_jax.models.clip_text import SDXLTextEncoders

    pt1, pt2, model1, model2 = text_pair
    ids = text_ids()
    ids2 = np.where(ids == 1, 0, ids)  # the second tokenizer pads with another id
    with torch.no_grad():
        h1 = pt1(input_ids=torch.from_numpy(ids), output_hidden_states=True).hidden_states[-2]
        out2 = pt2(input_ids=torch.from_numpy(ids2), output_hidden_states=True)
    emb = jax.jit(lambda i: SDXLTextEncoders(model1, model2).encode(i))(np.stack([ids, ids2], axis=1))
    assert emb.hidden.shape == (2, 77, 32 + 48) and emb.pooled.shape == (2, POOLED)
    assert rel_err(emb.hidden, torch.cat([h1, out2.hidden_states[-2]], dim=-1).numpy()) < 1e-4
    assert rel_err(emb.pooled, out2.text_embeds.numpy()) < 1e-4


def test_real_text_encoder_param_counts():
    import transformers
    from datasetdm_jax.models.abstract import abstract_module
    from datasetdm_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection

    for cls, pt_cls, config, expected in (
            (CLIPTextModel, transformers.CLIPTextModel, presets.SDXL_TEXT_ENCODER, presets.SDXL_TEXT_ENCODER_PARAMS),
            (CLIPTextModelWithProjection, transformers.CLIPTextModelWithProjection, presets.SDXL_TEXT_ENCODER_2,
             presets.SDXL_TEXT_ENCODER_2_PARAMS)):
        with torch.device("meta"):
            pt = pt_cls(transformers.CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"}))
        model = abstract_module(lambda rngs: cls(config, rngs=rngs))
        n = sum(int(v.size) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
        assert n == sum(p.numel() for p in pt.parameters()) == expected


# --- the VAE and the loader ----------------------------------------------------------------------

PROMPTS = ["a red circle on the green background", "a small blue star"]


@pytest.fixture(scope="session")
def sdxl_torch(sdxl_dir):
    import tiny_sdxl

    return tiny_sdxl.torch_pipeline(sdxl_dir)


def test_vae_config_reads_sdxl_scale():
    from datasetdm_jax.models.vae import AutoencoderKLConfig

    cfg = AutoencoderKLConfig.from_dict(presets.SDXL_VAE)
    assert cfg.scaling_factor == 0.13025 and cfg.force_upcast
    assert not AutoencoderKLConfig.from_dict({**presets.SDXL_VAE, "force_upcast": False}).force_upcast


def test_load_sdxl_folder(sdxl_pipe, sdxl_torch):
    pipe = sdxl_pipe
    assert pipe.is_sdxl and pipe.scaling_factor == 0.13025
    assert set(pipe.params) == {"text_encoder", "text_encoder_2", "vae", "unet"}
    ids = pipe.tokenize(PROMPTS)
    assert ids.shape == (2, 2, 77)
    for row, tok in ((0, sdxl_torch.tokenizer), (1, sdxl_torch.tokenizer_2)):
        ref = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        np.testing.assert_array_equal(ids[:, row], ref)
    assert (ids[:, 0] != ids[:, 1]).any()  # the two tokenizers pad differently


def test_encode_prompt_matches_diffusers(sdxl_pipe, sdxl_torch):
    with torch.no_grad():
        hidden, _, pooled, _ = sdxl_torch.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    emb = sdxl_pipe.encode_prompt(PROMPTS)
    assert emb.hidden.shape == (2, 77, 80) and emb.pooled.shape == (2, 24)
    assert rel_err(emb.hidden, hidden.numpy()) < 1e-4 and rel_err(emb.pooled, pooled.numpy()) < 1e-4


def test_unet_apply_default_time_ids(sdxl_pipe, sdxl_torch):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 8, 12, 4)).astype(np.float32)
    emb = sdxl_pipe.encode_prompt(PROMPTS)
    time_ids = sdxl_pipe.time_ids((8, 12))
    assert time_ids.tolist() == [16, 24, 0, 0, 16, 24]  # the tiny VAE downsamples by 2
    with torch.no_grad():
        ref = sdxl_torch.unet(torch.from_numpy(latents).permute(0, 3, 1, 2), torch.tensor([500.0, 20.0]),
                              torch.from_numpy(np.array(emb.hidden)),
                              added_cond_kwargs={"text_embeds": torch.from_numpy(np.array(emb.pooled)),
                                                 "time_ids": torch.from_numpy(np.stack([time_ids] * 2))}).sample
    eps = sdxl_pipe.unet_apply(latents, np.array([500.0, 20.0]), emb)
    assert rel_err(eps, ref.permute(0, 2, 3, 1).numpy()) < 1e-4
    other = sdxl_pipe.unet_apply(latents, np.array([500.0, 20.0]), emb, time_ids=np.array([8, 8, 2, 2, 16, 24]))
    assert rel_err(other, eps) > 1e-4


def test_sharded_fp16_variant_folder(sdxl_dir, sdxl_pipe, tmp_path):
    """fp16 variant files (`*.fp16.safetensors`, sharded with `*.safetensors.index.fp16.json`) load."""
    import diffusers
    import transformers
    from datasetdm_jax.pretrained import load_pipeline

    root = tmp_path / "fp16"
    shutil.copytree(sdxl_dir, root)
    for name, load in (("unet", diffusers.UNet2DConditionModel.from_pretrained),
                       ("text_encoder_2", transformers.CLIPTextModelWithProjection.from_pretrained)):
        model = load(str(sdxl_dir / name)).half()
        shutil.rmtree(root / name)
        model.save_pretrained(str(root / name), variant="fp16", max_shard_size="100KB", safe_serialization=True)
    assert list((root / "unet").glob("*.safetensors.index.fp16.json"))
    assert len(list((root / "text_encoder_2").glob("*.safetensors"))) > 1
    pipe = load_pipeline(root, dtype=jnp.float16)
    assert pipe.params["vae"]["encoder"]["conv_in"]["kernel"].dtype == jnp.float32  # force_upcast
    assert pipe.params["unet"]["conv_in"]["kernel"].dtype == jnp.float16
    emb = pipe.encode_prompt(PROMPTS)
    assert rel_err(emb.pooled, sdxl_pipe.encode_prompt(PROMPTS).pooled) < 2e-2


# --- sampling ------------------------------------------------------------------------------------

def test_sample_matches_diffusers_sdxl(sdxl_pipe, sdxl_torch):
    """The whole guided sampling loop against StableDiffusionXLPipeline with the folder's own
    scheduler (Euler), the same prompts, negative prompts and x_T. (The other samplers' loops are
    checked on SD; what is SDXL's here is the conditioning of both CFG halves.)"""
    import diffusers
    from datasetdm_jax import generate
    from tiny_sd import nchw

    steps, guidance, seed = 3, 5.0, 2
    ours = generate.sample(sdxl_pipe, PROMPTS, steps=steps, guidance=guidance, scheduler="euler", seed=seed,
                           negative_prompt="a square")
    x_T = generate.initial_noise(seed, np.arange(len(PROMPTS)), (16, 16, 4))
    # A fresh pipeline object: the session's keeps its scheduler state. diffusers scales x_T by
    # Euler's init_noise_sigma itself.
    sch = diffusers.EulerDiscreteScheduler.from_config(sdxl_torch.scheduler.config)
    pipe = type(sdxl_torch)(**{**sdxl_torch.components, "scheduler": sch})
    pipe.watermark = None
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(PROMPTS, negative_prompt=["a square"] * 2, num_inference_steps=steps, guidance_scale=guidance,
                      latents=nchw(x_T), output_type="np").images
    assert ours.shape == theirs.shape == (2, 32, 32, 3)
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)


def test_sample_with_features_sdxl(sdxl_pipe):
    """The datasetdm preset reads SDXL's three levels; cross-attention only where the UNet has it."""
    from datasetdm_jax import generate

    images, feats = generate.sample_with_features(sdxl_pipe, PROMPTS, steps=2, scheduler="ddim", seed=0)
    assert images.shape == (2, 32, 32, 3)
    assert sorted(feats.maps) == [8, 16]
    assert sorted(feats.cross_attention) == [8]  # the 16x16 level (DownBlock2D / UpBlock2D) has none
    # conv_in 32 + down0.layer0 32 + up0.upsample 64 + up1.layer0/1 32 + 32, both CFG halves
    assert feats.maps[16].shape == (2, 16, 16, 2 * (32 + 32 + 64 + 32 + 32))
    # 8x8: down1 (1 layer x 2 blocks), mid (2 blocks), up0 (2 layers x 2 blocks): 8 blocks x 4 heads
    assert feats.cross_attention[8].shape == (2, 8, 8, 8 * 4, 77)


def test_save_pipeline_round_trip_sdxl(sdxl_pipe, tmp_path):
    """Our saved SDXL folder loads in diffusers' StableDiffusionXLPipeline and in load_pipeline."""
    from datasetdm_jax.pretrained import load_pipeline, save_pipeline
    import tiny_sdxl

    out = save_pipeline(sdxl_pipe, tmp_path / "saved")
    theirs = tiny_sdxl.torch_pipeline(out)
    assert type(theirs).__name__ == "StableDiffusionXLPipeline"
    with torch.no_grad():
        hidden, _, pooled, _ = theirs.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    emb = sdxl_pipe.encode_prompt(PROMPTS)
    assert rel_err(emb.hidden, hidden.numpy()) < 1e-4 and rel_err(emb.pooled, pooled.numpy()) < 1e-4
    again = load_pipeline(out)
    assert again.is_sdxl and again.scaling_factor == sdxl_pipe.scaling_factor
    np.testing.assert_array_equal(again.tokenize(PROMPTS), sdxl_pipe.tokenize(PROMPTS))


def test_bench_programs_compile_tiny():
    """The compile-only SDXL report (`bench/sdxl.py`) on the tiny architecture: the guided UNet step
    compiles from abstract weights and reports memory and FLOPs."""
    import tiny_sdxl
    from datasetdm_jax.bench import sdxl

    text = lambda c: {**c, "vocab_size": 300}  # noqa: E731
    configs = {"unet": tiny_sdxl.UNET_CONFIG, "text_encoder": text(tiny_sdxl.TEXT_CONFIG),
               "text_encoder_2": text(tiny_sdxl.TEXT_CONFIG_2), "vae": {**tiny_sdxl.VAE_CONFIG, "force_upcast": True}}
    (row,) = sdxl.report(32, [2], jnp.float32, ["unet_cfg"], configs)
    assert row["batch"] == 2 and row["peak_gib"] > 0 and row["gflop"] > 0
    assert set(sdxl.programs(32, 1, jnp.float32, configs)) == {"unet_cfg", "unet_cfg_capture", "text", "vae_decode"}


def test_euler_loop_matches_diffusers():
    """The euler sampler (y = x / sqrt(sigma^2 + 1) carried) against EulerDiscreteScheduler's loop
    with its init_noise_sigma and scale_model_input, on a stand-in model."""
    import tiny_sdxl
    from datasetdm_jax import schedulers as S

    cfg_dict = tiny_sdxl.EULER_CONFIG
    rng = np.random.default_rng(0)
    r, x_T = rng.standard_normal((2, 2, 4, 8, 8)).astype(np.float32)
    fake = lambda x, t, xp: 0.1 * x + xp.cos(t / 137.0) * r  # noqa: E731
    sch = diffusers.EulerDiscreteScheduler.from_config(cfg_dict)
    sch.set_timesteps(10)
    x, r_pt = torch.from_numpy(x_T) * sch.init_noise_sigma, torch.from_numpy(r)
    for t in sch.timesteps:
        y = sch.scale_model_input(x, t)
        x = sch.step(0.1 * y + torch.cos(t.to(torch.float32) / 137.0) * r_pt, t, x).prev_sample
    cfg = S.ScheduleConfig.from_dict(cfg_dict)
    assert S.default_sampler_name(cfg) == "euler"
    sampler = S.get_sampler("euler")
    np.testing.assert_array_equal(sampler.timesteps(cfg, 10), sch.timesteps.numpy())
    ours = jax.jit(lambda x: S.sample_loop(sampler, cfg, 10, lambda y, t: fake(y, t.astype(jnp.float32), jnp), x))(x_T)
    assert rel_err(ours, x.numpy()) < 1e-5
    with pytest.raises(ValueError, match="timestep_spacing"):
        sampler.timesteps(S.ScheduleConfig.from_dict({**cfg_dict, "timestep_spacing": "trailing"}), 10)
