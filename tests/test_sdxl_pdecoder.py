"""The P-Decoder on SDXL: configs/voc_semantic_sdxl.py end to end on a tiny random SDXL (conftest
``sdxl_dir``) and a fake VOC folder (``datasetdm train`` -> ``generate`` -> ``export``, as
tests/test_generate_real_configs.py runs voc_semantic), the trainer's features against the pipeline's
own SDXL conditioning, and the attention labeller on SDXL. Sizes only are overridden: 32 px images
(16x16 latents: features at 16 and 8), a small decoder, 2 sampler steps."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datasetdm_jax import cli, generate, schedulers, train
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.data import records, voc
from datasetdm_jax.decoders import feature_spec
from fake_voc import write_fake_voc

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "voc_semantic_sdxl.py")
NUM = 3  # generated images: shards of 2 + 1
STEPS = 3


@pytest.fixture(scope="module")
def overrides(sdxl_dir, tmp_path_factory):
    root = write_fake_voc(str(tmp_path_factory.mktemp("voc") / "VOCdevkit" / "VOC2012"))
    return [f"pipeline={sdxl_dir}", f"workdir={tmp_path_factory.mktemp('run')}", f"data.root={root}",
            "data.min_pixels=100", "data.per_class=1", "data.image_size=32", f"steps={STEPS}", "log_every=1",
            "eval_every=1000", "val.num_images=1", "eval.num_images=1", "decoder.hidden=16", "decoder.num_layers=1",
            "decoder.heads=2", "decoder.ffn=32", "num_points=64", "generate.steps=2", "generate.batch_size=2",
            "generate.shard_size=2"]


@pytest.fixture(scope="module")
def trained(overrides):
    cli.main(["train", "--config", CONFIG, *overrides])
    return load_config(CONFIG, overrides)


def test_config_is_voc_on_sdxl_at_1024():
    c, base = load_config(CONFIG), load_config(os.path.join(os.path.dirname(CONFIG), "voc_semantic.py"))
    assert (c.pipeline, c.data.image_size, c.capture) == ("stabilityai/stable-diffusion-xl-base-1.0", 1024, "lean")
    assert (c.generate.scheduler, c.generate.batch_size, c.generate.min_area) == ("euler", 1, 1024)
    assert c.generate.scheduler in schedulers.SAMPLERS and c.batch_size == 1 and c.dtype == "auto"  # bf16 on TPU
    # the rest is the VOC recipe
    assert c.decoder == base.decoder and c.generate.prompts == base.generate.prompts and c.lr == base.lr


def test_trainer_features_are_the_sdxl_unet_on_its_own_conditioning(sdxl_pipe, overrides):
    # 64 px: a 32x32 latent, not the UNet's sample_size 16, so the time ids must be the image's own
    config = load_config(CONFIG, [*overrides, "data.image_size=64"])
    tr = train.Trainer(config, pipe=sdxl_pipe)
    assert set(tr.frozen) == {"vae", "unet", "text_encoder", "text_encoder_2"} and tr.uncond_ids.shape == (2, 77)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    ids = sdxl_pipe.tokenize(["a photo of a bird"])
    key = jax.random.key(3)
    feats = tr.features_fn(tr.frozen, image, ids, key)
    # the tiny SDXL's two levels, the lean preset's channels (up-block layers, mid; uncond | cond), and
    # cross-attention only where the UNet attends (not at its first level, as SDXL's 128)
    assert {r: m.shape for r, m in feats.maps.items()} == {32: (1, 32, 32, 2 * 32 * 2), 16: (1, 16, 16, 2 * 64 * 3)}
    assert set(feats.cross_attention) == {16} and feats.cross_attention[16].shape == (1, 16, 16, 1, 77)
    # the same pass through the pipeline's public calls: both towers, pooled text, time ids of the size
    z0 = sdxl_pipe.vae_encode(image)
    zt = schedulers.add_noise(sdxl_pipe.schedule, z0, jax.random.normal(key, z0.shape, z0.dtype), tr.t)
    emb = sdxl_pipe.encode_ids(np.concatenate([sdxl_pipe.tokenize([""]), ids]))
    _, ref = sdxl_pipe.unet_apply(jnp.concatenate([zt, zt]), tr.t, emb, capture="lean")
    for r in (32, 16):
        np.testing.assert_allclose(feats.maps[r], ref.maps[r], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats.cross_attention[16], ref.cross_attention[16], rtol=1e-4, atol=1e-6)
    # the decoder's stem reads exactly these levels: one 1x1 projection of each level's channels
    assert feature_spec(feats) == {32: (128, 0), 16: (384, 77)}
    kernels = {x.shape for x in jax.tree.leaves(tr.init_params) if x.ndim == 4 and x.shape[:2] == (1, 1)}
    assert {(1, 1, 128, 16), (1, 1, 384 + 77, 16)} <= kernels


def test_voc_semantic_sdxl_trains_generates_and_exports(trained, overrides, tmp_path):
    from pycocotools.coco import COCO

    losses = [json.loads(line)["loss"] for line in open(os.path.join(trained.workdir, "metrics.jsonl"))
              if "loss" in json.loads(line)]
    assert len(losses) == STEPS and np.isfinite(losses).all()
    tr, params, step = train.load_trained_decoder(trained)
    assert tr.pipe.is_sdxl and step == STEPS
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(tr.init_params))]
    assert max(moved) > 0  # the decoder trained

    gen, exp = tmp_path / "generated", tmp_path / "exported"
    cli.main(["generate", "--config", CONFIG, "--num_images", str(NUM), "--out", str(gen), *overrides])
    cli.main(["export", "--data", str(gen), "--out", str(exp)])
    manifest = records.read_manifest(str(gen))
    assert manifest["model"]["path"] == os.path.abspath(trained.pipeline)  # the SDXL folder did the work
    assert manifest["config"]["pipeline"] == trained.pipeline and manifest["config"]["capture"] == "lean"
    assert manifest["config"]["generate"]["scheduler"] == "euler"
    assert manifest["counts"]["images"] == NUM and manifest["labeler"]["name"] == "decoder"
    assert manifest["class_names"] == list(voc.CLASSES)
    exs = list(records.read_examples(str(gen)))
    assert [e["index"] for e in exs] == list(range(NUM))
    for e in exs:
        assert e["image"].shape == (32, 32, 3) and e["segmentation"].shape == (32, 32)
        named = {voc.CLASSES.index(c) for c in e["classes"]}
        assert named and set(np.unique(e["segmentation"]).tolist()) <= {0} | named  # labels follow the prompt
    api = COCO(str(exp / "annotations.json"))
    assert sorted(api.getImgIds()) == list(range(NUM)) and len(os.listdir(exp / "images")) == NUM


def test_attention_labeller_on_sdxl_draws_the_samplers_images(sdxl_pipe):
    from datasetdm_jax.labelers import attention, calibration

    prompts, names = ["a red circle", "a blue star"], [["circle"], ["star"]]
    # 64 px: a 32x32 latent, not the UNet's sample_size 16, so the time ids must be the image's own;
    # the tiny SDXL attends at its second level only, 16x16 here (SDXL: 64 and 32 at 1024 px)
    cfg = dict(self_res=16, cross_res=16, tau=1)
    batch = attention.label_batch(sdxl_pipe, prompts, names, [0, 1], seed=5, steps=2, scheduler="euler", config=cfg,
                                  height=64, width=64)
    assert batch.labels.shape == (2, 64, 64) and set(np.unique(batch.labels)) <= {0, 1, 255}
    images = generate.sample(sdxl_pipe, batch.prompts, steps=2, scheduler="euler", seed=5, height=64, width=64)
    np.testing.assert_allclose(batch.images, images, atol=1e-5)  # same conditioning, same images
    tokens, *_ = attention.class_inputs(sdxl_pipe, names)
    assert tokens.shape == (2, 2, 77) and (tokens[:, 0] != tokens[:, 1]).any()  # both towers' ids, own padding
    # calibration's pass on real images reads the same keys: softmax rows over the 77 class tokens
    real = np.round(batch.images * 255).astype(np.uint8)
    s, c = calibration.real_attention(sdxl_pipe, real, batch.prompts, tokens, self_hw=(16, 16), cross_hw=(16, 16),
                                      timestep=400)
    assert s.shape == (2, 256, 256) and c.shape == (2, 256, 77)
    np.testing.assert_allclose(c.sum(-1), 1.0, rtol=1e-4)
