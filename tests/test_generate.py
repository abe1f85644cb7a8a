"""generate.sample: the one-jit CFG sampler against diffusers' StableDiffusionPipeline, same weights."""

import jax
import numpy as np
import pytest
import torch

from datasetdm_jax import generate
from tiny_sd import LATENT_SIZE, nchw, rel_err

PROMPTS = ["a red circle", "a blue square on a green background", "a small yellow star"]


def _diffusers_images(torch_pipe, scheduler, steps, guidance, latents):
    import diffusers

    cls = {"ddim": diffusers.DDIMScheduler, "pndm": diffusers.PNDMScheduler,
           "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}[scheduler]
    # SD 1.5's scheduler_config.json says clip_sample=false; the tiny PNDM config omits the key, and
    # diffusers' DDIM would then fall back to its own default (True), which SD never uses.
    # A new pipeline object over the same modules: the session-shared torch_pipe keeps its scheduler
    # (other tests, in whatever order xdist runs them, sample it with the folder's PNDM).
    pipe = type(torch_pipe)(**{**torch_pipe.components,
                               "scheduler": cls.from_config(torch_pipe.scheduler.config, clip_sample=False)})
    with torch.no_grad():
        out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=nchw(latents),
                   output_type="np")
    return out.images


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "dpmpp_2m"])
def test_sample_matches_diffusers(pipe, torch_pipe, scheduler):
    steps, guidance, seed = 4, 7.5, 3
    ours = generate.sample(pipe, PROMPTS, steps=steps, guidance=guidance, scheduler=scheduler, seed=seed)
    x_T = generate.initial_noise(seed, np.arange(len(PROMPTS)), (LATENT_SIZE, LATENT_SIZE, 4))
    theirs = _diffusers_images(torch_pipe, scheduler, steps, guidance, x_T)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)  # 8-bit-image scale; fp32 drift over steps


def test_image_depends_on_global_index_only(pipe):
    """Example i is the same image whether it is drawn alone or inside a batch."""
    batch = generate.sample(pipe, PROMPTS, steps=2, scheduler="ddim", seed=5)
    alone = generate.sample(pipe, PROMPTS[2:], steps=2, scheduler="ddim", seed=5, start_index=2)
    np.testing.assert_allclose(alone[0], batch[2], atol=1e-5)
    other_seed = generate.sample(pipe, PROMPTS, steps=2, scheduler="ddim", seed=6)
    assert np.abs(other_seed - batch).max() > 1e-2


def test_sample_uses_every_local_device_with_the_same_images(pipe):
    """The batch is split over the local devices (2 host devices in the suite; 3 prompts are padded
    to 4), and the images are those of one device: noise depends on the example's index only."""
    assert jax.local_device_count() == 2
    one = generate.sample(pipe, PROMPTS, steps=2, scheduler="ddim", seed=5, num_devices=1)
    both = generate.sample(pipe, PROMPTS, steps=2, scheduler="ddim", seed=5)
    np.testing.assert_allclose(both, one, atol=1e-5)
    _, feats = generate.sample_with_features(pipe, PROMPTS + PROMPTS[:1], steps=2, scheduler="pndm", seed=0)
    leaf = jax.tree.leaves(feats)[0]
    assert leaf.shape[0] == 4 and len(leaf.sharding.device_set) == 2  # each device computed half the batch


def test_sample_with_features_captures_last_step(pipe):
    images, feats = generate.sample_with_features(pipe, PROMPTS, steps=2, scheduler="pndm", seed=0)
    plain = generate.sample(pipe, PROMPTS, steps=2, scheduler="pndm", seed=0)
    np.testing.assert_allclose(images, plain, atol=1e-5)  # capture does not change the image
    assert all(m.shape[0] == len(PROMPTS) for m in jax.tree.leaves(feats))
    assert sorted(feats.maps) == sorted({LATENT_SIZE // 2**k for k in range(len(pipe.configs["unet"]["block_out_channels"]))})


def test_sample_rejects_bad_input(pipe):
    with pytest.raises(ValueError, match="no prompts"):
        generate.sample(pipe, [])
    with pytest.raises(ValueError, match="multiples"):
        generate.sample(pipe, PROMPTS[:1], height=31)


def test_feature_passes(pipe):
    """feature_passes: None = the last sampler step's features, t = one extra pass on the result noised
    to t (so they change with it); several in one program equal each alone, keyed by example index
    like the images, and the images never change."""
    import jax.numpy as jnp

    def run(prompts, start, passes):
        fn = jax.jit(generate.build_sampler_fn(pipe, steps=2, guidance=7.5, scheduler="pndm",
                                               latent_hw=(LATENT_SIZE, LATENT_SIZE), capture="datasetdm",
                                               feature_passes=passes))
        idx = jnp.arange(start, start + len(prompts), dtype=jnp.int32)
        images, feats = fn(pipe.params, pipe.tokenize(prompts), pipe.tokenize([""] * len(prompts)), idx, jnp.int32(4))
        assert len(feats) == len(passes)
        return np.asarray(images), [[np.asarray(x) for x in jax.tree.leaves(f)] for f in feats]

    last, t50, t400 = run(PROMPTS, 0, (None,)), run(PROMPTS, 0, (50,)), run(PROMPTS, 0, (400,))
    for images, _ in (t50, t400):
        np.testing.assert_allclose(images, last[0], atol=1e-5)
    diff = lambda a, b: max(float(np.abs(x - y).max()) for x, y in zip(a, b))  # noqa: E731
    assert diff(t50[1][0], last[1][0]) > 1e-3 and diff(t50[1][0], t400[1][0]) > 1e-3
    images, (m50, mlast, m400) = run(PROMPTS, 0, (50, None, 400))
    np.testing.assert_allclose(images, last[0], atol=1e-5)
    for got, alone in ((m50, t50), (mlast, last), (m400, t400)):
        assert diff(got, alone[1][0]) < 1e-4
    alone = run(PROMPTS[2:], 2, (50,))
    assert diff(alone[1][0], [x[2:] for x in t50[1][0]]) < 1e-4
    assert generate.feature_pass({"feature_pass": "renoise"}, 400) == 400
    assert generate.feature_pass({}, 400) is None                       # the official last step
    with pytest.raises(ValueError, match="feature_pass"):
        generate.feature_pass({"feature_pass": "middle"}, 400)
