"""P-Decoder training for all four tasks: learns, resumes exactly, evaluates, logs, reloads.

Everything runs on the ``configs/shapes_<task>.py:tiny`` variants over one tiny random-weight SD;
one Trainer (one compilation) per task is shared by the module.
"""

import glob
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datasetdm_jax import pretrained, smoke, train
from datasetdm_jax.data import pipeline
from datasetdm_jax.decoders import tasks
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.training_state import BestCheckpoint

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
TASKS = ("semantic", "instance", "depth", "pose")


def tiny(task, *overrides):
    """configs/shapes_<task>.py:tiny (``task`` may name a variant config, e.g. 'semantic_per_pixel')."""
    return os.path.join(CONFIGS, f"shapes_{task}.py") + ":tiny", list(overrides)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    path = pretrained.save_pipeline(smoke.random_pipeline(root / "src"), root / "model")
    return str(path), pretrained.load_pipeline(path), root


@pytest.fixture(scope="module")
def trainers(sd):
    path, pipe, _ = sd
    cache = {}

    def get(task):
        if task not in cache:
            config = load_config(*tiny(task, f"pipeline={path}"))
            cache[task] = train.Trainer(config, pipe)
        return cache[task]
    return get


@pytest.mark.parametrize("task", TASKS + ("semantic_per_pixel",))
def test_loss_finite_and_decreasing_on_a_fixed_batch(trainers, task):
    tr = trainers(task)
    it = train.train_iterator(tr.config, None)
    batch = jax.device_put(tr.host_batch(next(it), 0), tr.data_sharding)
    state = jax.device_put({"step": np.zeros((), np.int32), "params": tr.init_params,
                            "opt": tr.tx.init(tr.init_params)}, tr.repl)
    losses = []
    for _ in range(6):
        state, m = tr.step_fn(state, batch, tr.frozen)
        losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses


def _read_tb_tags(folder):
    """Scalar tags in TensorBoard event files (TFRecord frames of Event protos)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            tags |= {v.tag for v in ev.summary.value}
    return tags


EXPECTED = {"semantic": ("miou",), "instance": ("AP", "AP50", "ap_agnostic"), "depth": ("rel", "rmse", "delta1"),
            "pose": ("AP", "AP50")}


@pytest.mark.parametrize("task", TASKS)
def test_resume_equals_uninterrupted(trainers, sd, task):
    tr, root = trainers(task), sd[2] / task
    config = tr.config
    done, _, full = train.run(config, str(root / "full"), trainer=tr)
    assert done
    stopped, _, _ = train.run(config, str(root / "resumed"), trainer=tr, max_steps=2)
    assert not stopped
    assert not os.path.exists(root / "resumed" / train.RESULTS_FILE)
    done2, _, resumed = train.run(config, str(root / "resumed"), trainer=tr)
    assert done2
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with open(root / "resumed" / train.METRICS_FILE) as f:
        recs = [json.loads(line) for line in f]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in recs if any(k.startswith("val/") for k in r)] == [2, 4]
    res = json.load(open(root / "resumed" / train.RESULTS_FILE))
    assert res == {**json.load(open(root / "full" / train.RESULTS_FILE))}
    for k in EXPECTED[task]:
        assert np.isfinite(res[k]) and (res[k] >= -1.0 if task != "depth" else res[k] >= 0.0), (k, res)
    tags = _read_tb_tags(root / "resumed" / "tb")
    assert {"train/loss", "train/grad_norm", f"val/{EXPECTED[task][0]}", f"test/{EXPECTED[task][0]}"} <= tags


def test_load_trained_decoder_gives_the_trained_params_and_decodes_features(trainers, sd):
    tr, root = trainers("instance"), sd[2] / "instance"
    # Trains to the end unless the resume test (maybe on another xdist worker) already did.
    _, _, full = train.run(tr.config, str(root / "full"), trainer=tr)
    loaded, params, step = train.load_trained_decoder(str(root / "full"), pipe=tr.pipe)
    assert step == 4 and loaded.task == "instance"
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    b = tr.host_batch(next(train.train_iterator(tr.config, None)), 0, augment=False)
    feats = tr.features(tr.frozen, b["image"], b["input_ids"], jax.random.key(0))
    out = loaded.decode_fn(params, feats)
    size = tr.config.data.image_size
    assert out["masks"].shape == (2, tr.config.top_k, size, size) and out["scores"].shape == (2, tr.config.top_k)
    assert int(out["labels"].min()) >= 1                                    # data class ids, background excluded


def test_missing_checkpoint_names_the_train_command(tmp_path, sd):
    config = load_config(*tiny("pose", f"pipeline={sd[0]}", f"workdir={tmp_path / 'w'}"))
    with pytest.raises(FileNotFoundError, match=r"datasetdm train --config configs/shapes_pose.py"):
        train.load_trained_decoder(config)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(trainers, sd, monkeypatch):
    tr, root = trainers("semantic"), sd[2]
    workdir = str(root / "nan")
    train.run(tr.config, workdir, trainer=tr, max_steps=2)
    clean = tr.host_batch

    def poisoned(b, step, augment=True):
        out = clean(b, step, augment)
        return {**out, "image": np.full_like(out["image"], np.nan)}

    monkeypatch.setattr(tr, "host_batch", poisoned)
    with pytest.raises(train.TrainingDiverged, match="last good checkpoint: step 2"):
        train.run(tr.config, workdir, trainer=tr)
    assert sorted(int(n) for n in os.listdir(os.path.join(workdir, train.STAGE)) if n.isdigit()) == [2]


def test_sigterm_and_ctrl_c_checkpoint_on_the_way_out(trainers, sd, monkeypatch, capsys):
    """SIGTERM: the step in flight finishes, is checkpointed, and run returns unfinished. Ctrl-C: the
    last finished step is checkpointed, a line says how to resume, and the interrupt goes on."""
    import signal

    tr, workdir = trainers("semantic"), str(sd[2] / "stop")
    config = tr.config.copy_and_resolve_references()
    config.eval_every = 0
    clean = tr.host_batch

    def sigterm_at_first_batch(b, step, augment=True):
        if step == 0 and augment:  # a training batch, not the feature bank's (unaugmented) pass
            signal.raise_signal(signal.SIGTERM)
        return clean(b, step, augment)

    monkeypatch.setattr(tr, "host_batch", sigterm_at_first_batch)
    finished, _, _ = train.run(config, workdir, trainer=tr)
    steps = lambda: sorted(int(n) for n in os.listdir(os.path.join(workdir, train.STAGE)) if n.isdigit())  # noqa: E731
    assert finished is False and steps() == [1]

    def ctrl_c_at_third_batch(b, step, augment=True):
        if step == 2 and augment:
            raise KeyboardInterrupt
        return clean(b, step, augment)

    monkeypatch.setattr(tr, "host_batch", ctrl_c_at_third_batch)
    with pytest.raises(KeyboardInterrupt):
        train.run(config, workdir, trainer=tr)
    assert steps() == [1, 2]
    assert "train: interrupted at step 2 (checkpointed); rerun the same command to resume" in capsys.readouterr().err


def test_select_metric_keeps_the_best_validation_decoder_across_a_resume(trainers, sd, monkeypatch):
    """Val AP 0.5 at step 2, 0.2 at step 4: the step-2 decoder is tested, returned and loaded, also when
    the run is stopped at step 2 and resumed (the kept decoder travels in the checkpoint)."""
    tr, root = trainers("pose"), sd[2] / "select"
    config = tr.config.copy_and_resolve_references()
    config.select_metric = "AP"
    real_evaluate, scripted = train.evaluate, iter([0.5, 0.2])

    def evaluate(trainer, params, split=None, num=None, seed=None, which="eval", per_class=False):
        if which == "val":
            return {"AP": next(scripted), "AP50": 0.0}
        return real_evaluate(trainer, params, split, num, seed, which, per_class)

    monkeypatch.setattr(train, "evaluate", evaluate)
    stopped, _, at_2 = train.run(config, str(root), trainer=tr, max_steps=2)
    assert not stopped
    done, _, final = train.run(config, str(root), trainer=tr)
    assert done
    for a, b in zip(jax.tree.leaves(at_2), jax.tree.leaves(final)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    res = json.load(open(root / train.RESULTS_FILE))
    assert (res["selected_step"], res["select_metric"], res["selected_val"]) == (2, "AP", 0.5)
    assert res["AP"] == real_evaluate(tr, final)["AP"]
    _, loaded, step = train.load_trained_decoder(str(root), pipe=tr.pipe)
    assert step == 2
    for a, b in zip(jax.tree.leaves(at_2), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_select_metric_minimises_errors_and_names_unknown_metrics():
    best = BestCheckpoint("rel", train.LOWER_IS_BETTER)
    assert best.update(2, {"rel": 0.3}, {"w": np.ones(1)}) and not best.update(4, {"rel": 0.4}, {"w": np.zeros(1)})
    assert best.update(6, {"rel": 0.1}, {"w": np.zeros(1)}) and best.step == 6
    assert not BestCheckpoint("", train.LOWER_IS_BETTER).update(2, {"rel": 0.3}, {})
    with pytest.raises(KeyError, match="select_metric='miou' is not a validation metric.*'rel'"):
        BestCheckpoint("miou", train.LOWER_IS_BETTER).update(2, {"rel": 0.3}, {})


def test_deep_supervision_trains(sd):
    path, pipe, _ = sd
    config = load_config(*tiny("semantic", f"pipeline={path}", "deep_supervision=True"))
    tr = train.Trainer(config, pipe)
    assert tr.spec.deep_supervision
    batch = jax.device_put(tr.host_batch(next(train.train_iterator(config, None)), 0), tr.data_sharding)
    state = jax.device_put({"step": np.zeros((), np.int32), "params": tr.init_params,
                            "opt": tr.tx.init(tr.init_params)}, tr.repl)
    state, m = tr.step_fn(state, batch, tr.frozen)
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0


def test_per_pixel_semantic_decoder_scores_and_labels_grounded_in_the_prompt(trainers, sd):
    """configs/shapes_semantic_per_pixel.py (the demo's labeller; that it learns: the fixed-batch test):
    `results.json` holds both semantic scores, and generation's labels carry only background and the
    classes each prompt names."""
    from datasetdm_jax import prompts
    from datasetdm_jax.data import shapes
    from datasetdm_jax.labelers.decoder import DecoderLabeler

    path, pipe, root = sd
    tr = trainers("semantic_per_pixel")
    assert tr.spec.decoder_name == "per_pixel" and not tr.spec.deep_supervision
    config = load_config(*tiny("semantic_per_pixel", f"pipeline={path}", f"workdir={root / 'per_pixel'}"))
    done, _, _ = train.run(config, str(config.workdir), trainer=tr)
    res = json.load(open(root / "per_pixel" / train.RESULTS_FILE))
    assert done and 0.0 <= res["miou"] <= 1.0 and 0.0 <= res["miou_grounded"] <= 1.0, res
    indices = np.arange(4)
    ps = prompts.from_config(config.generate.prompts).batch(indices)
    out = DecoderLabeler(config, pipe=pipe)(ps, indices, 0)
    for p, lab in zip(ps, out.labels):
        named = {0} | {shapes.CLASS_TO_ID[c] for c in p.classes}
        assert lab["segmentation"].shape == (config.data.image_size,) * 2
        assert set(np.unique(lab["segmentation"]).tolist()) <= named, (p.text, np.unique(lab["segmentation"]))


def test_bfloat16_frozen_sd_trains_a_float32_decoder(sd):
    """``dtype=bfloat16``: the frozen SD loads and runs in bf16, the decoder's weights and Adam state
    stay fp32, and its loss is finite; "auto" is float32 on this CPU; a bad value is one line."""
    path, _, _ = sd
    config = load_config(*tiny("semantic", f"pipeline={path}", "dtype=bfloat16"))
    tr = train.Trainer(config)
    assert tr.pipe.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(tr.frozen["unet"])} == {jnp.dtype(jnp.bfloat16)}
    batch = jax.device_put(tr.host_batch(next(train.train_iterator(config, None)), 0), tr.data_sharding)
    state = jax.device_put({"step": np.zeros((), np.int32), "params": tr.init_params,
                            "opt": tr.tx.init(tr.init_params)}, tr.repl)
    state, m = tr.step_fn(state, batch, tr.frozen)
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
    assert pretrained.resolve_dtype("auto") == (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    with pytest.raises(ValueError, match=r"dtype='fp8': expected one of auto, float32, bfloat16, float16"):
        train.load_frozen_pipeline(path, "fp8")


def test_pose_data_holds_exactly_one_person(trainers):
    b = next(train.train_iterator(trainers("pose").config, None))
    assert list(b["num_persons"]) == [1, 1]


def test_missing_model_names_the_pretrain_command(tmp_path):
    config = load_config(*tiny("semantic", f"pipeline={tmp_path / 'nope'}"))
    with pytest.raises(FileNotFoundError, match="datasetdm pretrain --config configs/shapes_sd.py"):
        train.Trainer(config)


def test_feature_bank_row_2i_plus_f_holds_image_i_mirrored_when_f(trainers):
    """Each bank row is closest to the features of its own image (mirrored on odd rows) among all
    images and mirrors; at timestep 0 the bank's fixed noise only perturbs it."""
    base = trainers("semantic")
    config = base.config.copy_and_resolve_references()
    config.timestep = 0
    tr = train.Trainer(config, base.pipe)
    source = train.data_source(tr.config, str(tr.config.data.split), 3, int(tr.config.data.seed))
    bank = tr.feature_bank(source)                              # 3 images, batch 2: a padded chunk
    assert jax.tree.leaves(bank)[0].shape[0] == 6
    refs = []
    for one in pipeline.grain_dataset(source, 1, None):
        b = {k: np.repeat(v, 2, 0) for k, v in tr.host_batch(one, 0, augment=False).items()}
        for f in (False, True):
            x = tasks.flip_batch(b, np.full(2, f))
            refs.append(jax.device_get(tr.features_fn(tr.frozen, x["image"], x["input_ids"], jax.random.key(9)))
                        .maps)
    for row in range(6):
        dist = [sum(float(np.abs(bank.maps[r][row] - ref[r][0]).mean()) for r in ref) for ref in refs]
        assert int(np.argmin(dist)) == row, (row, dist)


def test_uncached_training_resumes_exactly(trainers, sd):
    """The SD pass inside every step (``cache_features=False``, the paper-scale default)."""
    tr, root = trainers("depth"), sd[2] / "uncached"
    config = tr.config.copy_and_resolve_references()
    config.cache_features = False
    done, _, full = train.run(config, str(root / "full"), trainer=tr)
    train.run(config, str(root / "resumed"), trainer=tr, max_steps=3)
    done2, _, resumed = train.run(config, str(root / "resumed"), trainer=tr)
    assert done and done2
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_batches_name_their_bank_rows_across_epochs(trainers):
    """``entry`` = 2 * source position + mirrored, for every example of several shuffled epochs."""
    tr = trainers("instance")                                   # a tiny config that flips
    src, it = train.train_source(tr.config), train.train_iterator(tr.config, None)
    seen = set()
    for step in range(3 * len(src) // int(tr.config.batch_size)):
        hb = tr.host_batch(next(it), step)
        for image, entry in zip(hb["image"], hb["entry"]):
            i, mirrored = divmod(int(entry), 2)
            want = pipeline.standardize(src[i])["image"]
            np.testing.assert_array_equal(image, want[:, ::-1] if mirrored else want)
            seen.add(int(entry))
    assert len({e // 2 for e in seen}) == len(src) and any(e % 2 for e in seen)
