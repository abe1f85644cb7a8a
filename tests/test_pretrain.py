"""Pretraining on the shapes world: runs, learns, resumes exactly, stops on NaN, exports a loadable folder.

Everything uses ``configs/shapes_sd.py:tiny`` (16 px, a few steps); one full run is shared.
"""

import json
import os

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx


from datasetdm_jax import shapes_sd, training_state  # noqa: E402
from datasetdm_jax.shapes_sd import data as sd_data  # noqa: E402
from datasetdm_jax.shapes_sd import diffusion as sd_diffusion  # noqa: E402
from datasetdm_jax.shapes_sd import models as sd_models  # noqa: E402
from datasetdm_jax.shapes_sd import vae_stages as sd_vae  # noqa: E402
from datasetdm_jax.config_utils import load_config  # noqa: E402

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_sd.py") + ":tiny"


def _restore_all(workdir, stage):
    """Every array item and the data position of a stage's latest checkpoint."""
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, stage)))
    step = mngr.latest_step()
    items = [k for k in ("params", "ema", "train") if os.path.isdir(os.path.join(workdir, stage, str(step), k))]
    r = mngr.restore(step, args=ocp.args.Composite(
        data=ocp.args.JsonRestore(), **{k: ocp.args.StandardRestore() for k in items}))
    mngr.close()
    return step, {k: r[k] for k in items}, r["data"]


def _metrics(workdir):
    with open(os.path.join(workdir, training_state.METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain_full"))
    config = load_config(TINY)
    assert shapes_sd.run(config, workdir) is True
    return config, workdir


def test_config_loading_and_overrides():
    c = load_config(TINY, ["diffusion.lr=2e-3", "vae.steps=9", "data.classes=('circle',)"])
    assert c.diffusion.lr == 2e-3 and c.vae.steps == 9 and c.data.classes == ("circle",)
    with pytest.raises(ValueError, match="no config field"):
        load_config(TINY, ["diffusion.lrr=1"])
    default = load_config(TINY.rsplit(":", 1)[0])
    assert default.data.image_size == 64 and default.unet.sample_size == 16


def test_run_metrics_and_checkpoints(tiny_run):
    config, workdir = tiny_run
    recs = _metrics(workdir)
    for stage in ("vae", "vae_decoder", "diffusion"):
        train = [r for r in recs if r["stage"] == stage and "loss" in r]
        assert train and all(np.isfinite(r["loss"]) and r["img_per_s"] > 0 and r["lr"] >= 0 for r in train)
        assert max(r["step"] for r in train) == config[stage].steps
        assert _restore_all(workdir, stage)[0] == config[stage].steps
    assert any("eval/psnr" in r for r in recs)
    ev = [r for r in recs if "eval/mse" in r]
    assert ev and all(np.isfinite(r["eval/mse"]) and np.isfinite(r["eval/caption_gain"]) for r in ev)


def test_resume_equals_uninterrupted(tiny_run, tmp_path):
    config, full = tiny_run
    pieces = str(tmp_path / "pieces")
    # Stop mid-VAE, then mid-diffusion, then finish: three invocations of the same run.
    for max_steps in (3, config.vae.steps - 3 + 2, 0):
        c = load_config(TINY, [f"max_steps={max_steps}", "export=False"])
        assert shapes_sd.run(c, pieces) is (max_steps == 0)
    for stage in ("vae", "vae_decoder", "diffusion"):
        step_a, a, data_a = _restore_all(full, stage)
        step_b, b, data_b = _restore_all(pieces, stage)
        assert step_a == step_b and data_a == data_b
        la, lb = jax.tree_util.tree_leaves_with_path(a), dict(jax.tree_util.tree_leaves_with_path(b))
        assert len(la) == len(lb)
        for path, value in la:
            np.testing.assert_allclose(np.asarray(lb[path]), np.asarray(value), rtol=0, atol=1e-6,
                                       err_msg=f"{stage} {jax.tree_util.keystr(path)}")
    # Resumed stages rewrite no duplicate metric rows.
    rows = [(r["stage"], r["step"]) for r in _metrics(pieces) if "loss" in r]
    assert len(rows) == len(set(rows))


def _fit_one_batch(st, batch, lr: float, steps: int, seed: int) -> list[float]:
    """Adam on one batch with a fixed rng (same timesteps / noise each step): the losses."""
    tx = optax.adam(lr)
    rng = jax.random.key(seed)

    @jax.jit
    def step(params, opt):
        (loss, _), g = jax.value_and_grad(st.loss_fn, has_aux=True)(params, st.frozen, batch, rng)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    params, opt, losses = st.params, tx.init(st.params), []
    for _ in range(steps):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    return losses


def test_diffusion_loss_decreases_on_a_fixed_batch(tiny_run):
    """The joint UNet + text encoder objective is trainable: 20 Adam steps on one batch (fixed
    timesteps, noise and caption dropout) must cut the loss well down."""
    config, workdir = tiny_run
    st = sd_diffusion.diffusion_stage(config, workdir)
    it = sd_data.train_iterator(config, 8, None)
    batch = jax.tree.map(np.asarray, st.host_batch({"image": next(it)["image"], "caption": [
        "a red circle on a plain background", "a blue square on a dark striped background"] * 4}))
    losses = _fit_one_batch(st, batch, lr=1e-3, steps=20, seed=3)
    assert np.all(np.isfinite(losses)), losses
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]), losses


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path)
    c = load_config(TINY, ["stages=('vae',)", "max_steps=2"])
    assert shapes_sd.run(c, workdir) is False
    c = load_config(TINY, ["stages=('vae',)", "vae.lr=1e30", "vae.grad_clip=1e30", "vae.warmup_steps=0"])
    with pytest.raises(training_state.TrainingDiverged, match="last good checkpoint: step 2"):
        shapes_sd.run(c, workdir)
    assert _restore_all(workdir, "vae")[0] == 2


def test_export_is_a_loadable_diffusers_folder(tiny_run):
    config, workdir = tiny_run
    folder = os.path.join(workdir, "model")
    for f in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
              "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
              "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
              "scheduler/scheduler_config.json"):
        assert os.path.isfile(os.path.join(folder, f)), f
    with open(os.path.join(folder, "vae", "config.json")) as f:
        assert json.load(f)["scaling_factor"] > 0
    from datasetdm_jax import pretrained

    import jax.numpy as jnp

    pipe = pretrained.load_pipeline(folder, jnp.float32)
    assert pipe is not None


def test_warm_start_from_an_exported_folder(tiny_run, tmp_path):
    """init_from: the vae stage is skipped, the diffusion stage starts from the folder's weights (not
    random ones), and the run exports a folder again."""
    config, workdir = tiny_run
    folder = os.path.join(workdir, "model")
    warm = load_config(TINY, [f"init_from={folder}", "diffusion.steps=2", "diffusion.eval_every=0"])
    stage = sd_diffusion.diffusion_stage(warm, str(tmp_path / "probe"))
    pipe = sd_models.init_pipeline(os.path.abspath(folder))
    want = jax.tree.leaves(nnx.to_pure_dict(nnx.state(pipe.module("unet"), nnx.Param)))
    got = jax.tree.leaves(stage.params["unet"])
    assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))
    assert stage.meta["scaling_factor"] == pipe.configs["vae"]["scaling_factor"]

    out = str(tmp_path / "warm")
    assert shapes_sd.run(warm, out) is True
    assert not os.path.exists(os.path.join(out, "vae"))
    with open(os.path.join(out, "model", "training.json")) as f:
        assert json.load(f)["diffusion_step"] == config.diffusion.steps + 2   # the folder's steps + this run's
    with open(os.path.join(out, "tokenizer", "vocab.json")) as f, \
            open(os.path.join(folder, "tokenizer", "vocab.json")) as g:
        assert f.read() == g.read()

    bad = load_config(TINY, [f"init_from={folder}", "unet.block_out_channels=(8, 32)"])
    with pytest.raises(ValueError, match="block_out_channels"):
        sd_diffusion.diffusion_stage(bad, str(tmp_path / "bad"))


def test_warm_start_into_a_deeper_unet(tiny_run, tmp_path):
    """init_from with a larger unet.layers_per_block grows the folder's UNet without changing its
    function: the held-out eps-MSE (same batch, timesteps and noise) is the folder's."""
    _, workdir = tiny_run
    folder = os.path.join(workdir, "model")
    same, deeper = (sd_diffusion.diffusion_stage(load_config(TINY, [f"init_from={folder}", f"unet.layers_per_block={n}"]),
                                              str(tmp_path / f"l{n}")) for n in (1, 2))
    count = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
    assert count(deeper.params["unet"]) > count(same.params["unet"])
    want, got = same.eval_fn(same.params, same.frozen), deeper.eval_fn(deeper.params, deeper.frozen)
    assert want and set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-4, atol=1e-6, err_msg=k)


def test_fidelity_curve_judges_samples_of_the_ema_weights(tiny_run, tmp_path, monkeypatch):
    """diffusion.fidelity_every: every step here, the judge scores samples of the current EMA
    weights; the last step's images and scores are those of the folder the run exports."""
    import jax.numpy as jnp

    from datasetdm_jax.research import judge as J
    from datasetdm_jax import pretrained

    _, workdir = tiny_run
    judge_file = str(tmp_path / "judge.msgpack")
    J.save_judge(nnx.split(J.JudgeNet(16, 8, rngs=nnx.Rngs(3))), judge_file)
    judged = []
    predict = J.predict
    monkeypatch.setattr(J, "predict", lambda judge, images, **kw: judged.append(np.asarray(images)) or
                        predict(judge, images, **kw))
    settings = ["diffusion.fidelity_prompts=8", "diffusion.fidelity_steps=2", "diffusion.fidelity_guidance=3.0"]
    c = load_config(TINY, [f"init_from={os.path.join(workdir, 'model')}", "stages=('diffusion',)", "diffusion.steps=2",
                           "diffusion.eval_every=0", "diffusion.fidelity_every=1",
                           f"diffusion.fidelity_judge={judge_file}", "export_dtype=float32", *settings])
    out = str(tmp_path / "run")
    assert shapes_sd.run(c, out) is True
    recs = [r for r in _metrics(out) if "eval/class_fidelity" in r]
    assert [r["step"] for r in recs] == [1, 2]
    logged = judged[-2:]  # the last eval's one- and two-object samples
    judged.clear()
    report = J.fidelity(pretrained.load_pipeline(os.path.join(out, "model"), jnp.float32), J.load_judge(judge_file),
                        num_prompts=8, steps=2, guidance=3.0, scheduler="pndm", seed=0)
    assert len(judged) == 2 and logged[0].shape == judged[0].shape == (8, 16, 16, 3)
    for a, b in zip(logged, judged):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert recs[-1]["eval/class_fidelity"] == report["single"]["class"]
    assert recs[-1]["eval/colour_fidelity"] == report["single"]["colour"]
    assert recs[-1]["eval/multi_object_presence"] == report["multi"]["classes"]
    with pytest.raises(ValueError, match="fidelity_judge"):
        shapes_sd.run(load_config(TINY, ["diffusion.fidelity_every=1"]), str(tmp_path / "nojudge"))


def _vae_weights(folder):
    from datasetdm_jax import pretrained

    return nnx.to_pure_dict(nnx.state(sd_models.init_pipeline(os.path.abspath(folder)).module("vae"), nnx.Param))


def _same(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_decoder_finetune_keeps_the_latent_space(tiny_run):
    """The shipped VAE = the vae stage's encoder (latents unchanged, so the UNet stays valid) + the
    vae_decoder stage's decoder (which did change)."""
    config, workdir = tiny_run
    shipped = _vae_weights(os.path.join(workdir, "model"))
    half = lambda t: jax.tree.map(lambda x: np.asarray(x, config.export_dtype), t)  # noqa: E731
    _, vae, _ = _restore_all(workdir, "vae")
    _, dec, _ = _restore_all(workdir, "vae_decoder")
    for k in ("encoder", "quant_conv"):
        assert _same(shipped[k], half(vae["params"][k])), k
    for k in sd_vae.DECODER_KEYS:
        assert _same(shipped[k], half(dec["params"][k])), k
        assert not _same(dec["params"][k], vae["params"][k]), k


def test_decoder_only_refresh_of_a_folder(tiny_run, tmp_path):
    """stages=('vae_decoder',) with init_from re-exports that folder with a new decoder and the
    same UNet, text encoder and encoder."""
    config, workdir = tiny_run
    folder = os.path.join(workdir, "model")
    c = load_config(TINY, [f"init_from={folder}", "stages=('vae_decoder',)"])
    out = str(tmp_path / "refresh")
    assert shapes_sd.run(c, out) is True
    new, old = sd_models.init_pipeline(os.path.abspath(os.path.join(out, "model"))), \
        sd_models.init_pipeline(os.path.abspath(folder))
    for name in ("unet", "text_encoder"):
        assert _same(nnx.state(new.module(name), nnx.Param), nnx.state(old.module(name), nnx.Param)), name
    a, b = _vae_weights(os.path.join(out, "model")), _vae_weights(folder)
    assert _same(a["encoder"], b["encoder"]) and not _same(a["decoder"], b["decoder"])
    assert new.configs["vae"]["scaling_factor"] == old.configs["vae"]["scaling_factor"]
    with open(os.path.join(out, "model", "training.json")) as f:
        assert json.load(f)["diffusion_step"] == config.diffusion.steps


def test_decoder_loss_decreases_on_a_fixed_batch(tiny_run):
    config, workdir = tiny_run
    st = sd_vae.vae_decoder_stage(config, workdir)
    losses = _fit_one_batch(st, st.host_batch(next(sd_data.train_iterator(config, 8, None))),
                            lr=3e-3, steps=50, seed=1)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_curves_png_from_metrics(tiny_run, tmp_path):
    from PIL import Image

    from datasetdm_jax.shapes_sd import curves

    _, workdir = tiny_run
    png = curves.plot_curves(curves.read_metrics(os.path.join(workdir, training_state.METRICS_FILE)),
                             tmp_path / "curves.png")
    img = np.asarray(Image.open(png).convert("L"))
    assert img.shape[0] > 200 and img.std() > 5  # drawn panels, not a blank canvas
    with pytest.raises(ValueError, match="no training metrics"):
        curves.plot_curves([{"stage": "vae", "step": 1}], tmp_path / "none.png")
