"""`datasetdm generate` with instance and pose P-Decoders (alone, and together through `also`):
records that read back with consistent shapes, and a COCO export that validates.

One tiny random SD and randomly initialised tiny decoders saved the way `datasetdm train` saves
them (as in test_generate_dataset.py); the score threshold is lowered so that a random decoder's
instances are kept, and the joint threshold so that every joint of a kept person is visible.
"""

import json
import os

import jax
import numpy as np
from tiny_sd import save_random_decoder
import pytest

from datasetdm_jax import dataset_writer, export, pretrained, prompts, smoke, train
from datasetdm_jax.labelers.decoder import DecoderLabeler
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.data import records, shapes

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
INSTANCE = os.path.join(CONFIGS, "shapes_instance.py") + ":tiny"
POSE = os.path.join(CONFIGS, "shapes_pose.py") + ":tiny"
NUM = 3   # tiny: shard_size 3, batch 2 -> one shard, a padded second batch
SIZE = 32
J = len(shapes.KEYPOINT_NAMES)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_ip")
    model = pretrained.save_pipeline(smoke.random_pipeline(root / "src"), root / "model")
    over = {"instance": [f"pipeline={model}", f"workdir={root / 'wd_inst'}", "generate.score_threshold=0.0"],
            # Pose on a re-noised pass (the shipped config reads the last step) so one labeller mixes both.
            "pose": [f"pipeline={model}", f"workdir={root / 'wd_pose'}", "generate.keypoint_threshold=-1e9",
                     "timestep=400", "generate.feature_pass=renoise"]}
    configs = {"instance": load_config(INSTANCE, over["instance"]), "pose": load_config(POSE, over["pose"])}
    pipe = None
    for task, cfg in configs.items():
        trainer = train.Trainer(cfg, pipe)
        pipe = trainer.pipe
        save_random_decoder(cfg, trainer)
    return root, over, configs, pipe


def _check_instances(e, max_instances):
    m, k, s = e["instance_masks"], e["instance_labels"], e["instance_scores"]
    assert m.dtype == bool and m.ndim == 3 and m.shape[1:] == (SIZE, SIZE)
    assert len(m) == len(k) == len(s) <= max_instances
    assert ((k >= 1) & (k < len(shapes.CLASSES))).all()
    assert (m.sum((1, 2)) >= 1).all() and (s >= 0).all() and (np.diff(s) <= 0).all()


def _check_keypoints(e, max_persons=1):
    kp = e["keypoints"]
    assert kp.ndim == 3 and kp.shape[1:] == (J, 3) and e["keypoint_scores"].shape == (len(kp), J)
    assert len(kp) <= max_persons
    v = kp[..., 2]
    assert set(np.unique(v).tolist()) <= {0.0, 2.0}
    vis = kp[v > 0]
    assert (vis[:, :2] >= 0).all() and (vis[:, :2] < SIZE).all()
    np.testing.assert_array_equal(kp[v == 0][:, :2], 0)


def test_instance_config_through_cli_body(setup):
    root, over, configs, _ = setup
    out = root / "inst"
    dataset_writer.main_generate(INSTANCE, NUM, str(out), over["instance"])
    manifest = records.read_manifest(str(out))
    assert manifest["counts"]["images"] == NUM and manifest["labeler"]["task"] == "instance"
    exs = list(records.read_tfrecords(str(out)))
    assert [e["index"] for e in exs] == list(range(NUM))
    for e in exs:
        assert e["image"].shape == (SIZE, SIZE, 3) and "segmentation" not in e and "keypoints" not in e
        _check_instances(e, int(configs["instance"].generate.max_instances))
        assert e["quality"] == pytest.approx(float(e["instance_scores"].mean()) if len(e["instance_scores"]) else 0.0,
                                             rel=1e-5, abs=1e-7)
    assert sum(len(e["instance_labels"]) for e in exs) > 0           # threshold 0: the random decoder's masks
    per_class = manifest["counts"]["images_with_class"]
    assert sum(per_class.values()) == sum(len(set(e["instance_labels"].tolist())) for e in exs)
    g = records.grain_source(str(out))[1]                             # ArrayRecord reader, same decoding
    np.testing.assert_array_equal(g["instance_masks"], exs[1]["instance_masks"])
    assert (out / "preview.png").is_file()


def test_pose_config_through_cli_body(setup):
    root, over, _, _ = setup
    out = root / "pose"
    dataset_writer.main_generate(POSE, NUM, str(out), over["pose"])
    exs = list(records.read_tfrecords(str(out)))
    assert len(exs) == NUM
    for e in exs:
        assert "person" in e["prompt"] and e["classes"] == ["person"]
        _check_keypoints(e)
        assert len(e["keypoints"]) == 1 and (e["keypoints"][0, :, 2] == 2).all()   # every joint over -1e9
        assert 0 <= e["quality"] <= 1


def test_pose_and_instance_in_one_pass_and_coco_export(setup):
    from pycocotools.coco import COCO

    root, _, configs, pipe = setup
    labeler = DecoderLabeler(configs["pose"], pipe=pipe, also=[configs["instance"]])
    assert [p["task"] for p in [labeler.describe()] + labeler.describe()["also"]] == ["pose", "instance"]
    out = root / "both"
    manifest = dataset_writer.generate_dataset(configs["pose"], NUM, str(out), labeler=labeler, progress=False)
    assert manifest["labeler"]["also"][0]["task"] == "instance"
    exs = list(records.read_tfrecords(str(out)))
    person = shapes.CLASS_TO_ID["person"]
    for e in exs:
        _check_instances(e, int(configs["instance"].generate.max_instances))
        persons = int((e["instance_labels"] == person).sum())
        _check_keypoints(e, max(persons, 1))
        assert len(e["keypoints"]) == max(persons, 1)   # one per person instance, else one per image
        assert 0 <= e["quality"] <= 1
    coco_dir = root / "both_coco"
    stats = export.export_folder(str(out), str(coco_dir))
    assert stats["images"] == NUM
    api = COCO(str(coco_dir / "annotations.json"))
    anns = api.loadAnns(api.getAnnIds())
    assert len({a["id"] for a in anns}) == len(anns) == stats["annotations"]
    n_masks = sum(len(e["instance_masks"]) for e in exs)
    assert sum(1 for a in anns if a["segmentation"]) == n_masks > 0
    for a in anns:
        assert a["image_id"] in {e["index"] for e in exs} and a["category_id"] in api.getCatIds()
        x, y, w, h = a["bbox"]
        if a["segmentation"]:
            m = api.annToMask(a).astype(bool)
            ys, xs = np.nonzero(m)
            assert [x, y, w, h] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert a["area"] == m.sum()
        if "keypoints" in a:
            kp = np.asarray(a["keypoints"], np.float32).reshape(-1, 3)
            assert kp.shape == (J, 3) and a["num_keypoints"] == int((kp[:, 2] > 0).sum())
            if not a["segmentation"]:
                lab = kp[kp[:, 2] > 0]
                assert (lab[:, 0] >= x).all() and (lab[:, 0] <= x + w + 1e-3).all()
                assert (lab[:, 1] >= y).all() and (lab[:, 1] <= y + h + 1e-3).all()
    assert sum(1 for a in anns if "keypoints" in a) == sum(
        1 for e in exs for kp in e["keypoints"] if (kp[:, 2] > 0).any())
    assert json.loads((coco_dir / "prompts.jsonl").read_text().splitlines()[0])["index"] == 0


def test_decoders_read_their_own_feature_pass(setup):
    """Pose re-noised to its timestep, instance at the last sampler step, one sampler pass: each
    decoder's labels equal those of a labeller running it alone."""
    root, over, configs, pipe = setup
    inst_last = load_config(INSTANCE, over["instance"] + ["generate.feature_pass=last_step"])
    both = DecoderLabeler(configs["pose"], pipe=pipe, also=[inst_last])
    t = int(configs["pose"].timestep)
    assert both.feature_passes == (t, None)
    desc = both.describe()
    assert (desc["feature_pass"], desc["also"][0]["feature_pass"]) == (f"renoise t={t}", "last_step")
    ps = prompts.from_config(configs["pose"].generate.prompts).batch(np.arange(2))
    res = both(ps, np.arange(2), 0)
    inst_alone = DecoderLabeler(inst_last, pipe=pipe)(ps, np.arange(2), 0)
    np.testing.assert_array_equal(res.images, inst_alone.images)
    for a, b in zip(res.labels, inst_alone.labels):
        for k in ("instance_masks", "instance_labels", "instance_scores"):
            np.testing.assert_array_equal(a[k], b[k])
    pose_last = load_config(POSE, over["pose"] + ["generate.feature_pass=last_step"])
    all_last = DecoderLabeler(pose_last, pipe=pipe, also=[inst_last])
    assert all_last.feature_passes == (None,)
    ref = all_last(ps, np.arange(2), 0)
    for a, b in zip(res.labels, ref.labels):      # same instances, pose read from another pass
        np.testing.assert_array_equal(a["instance_masks"], b["instance_masks"])
        assert np.abs(a["keypoint_scores"] - b["keypoint_scores"]).max() > 1e-4


def test_vae_decoder_levels_in_training_and_generation(setup):
    """``vae_features=(32,)``: the trainer adds the VAE decoder's 32 px maps (above the UNet's 16 and
    8) to the features, the decoder reads them, and the labeller's sampler adds the same level."""
    root, over, configs, pipe = setup
    cfg = load_config(POSE, over["pose"][:-2] + [f"workdir={root / 'wd_pose_vae'}", "vae_features=(32,)"])
    trainer = train.Trainer(cfg, pipe)
    assert trainer.vae_features == (32,)
    batch = trainer.host_batch(next(train.train_iterator(cfg, None)), 0)
    feats = trainer.features_fn(trainer.frozen, batch["image"], batch["input_ids"], jax.random.key(0))
    assert sorted(feats.maps) == [8, 16, 32] and feats.maps[32].shape[:3] == (len(batch["image"]), 32, 32)
    assert 32 not in feats.cross_attention
    out = trainer.decode_fn(trainer.init_params, feats)
    blank = feats.replace(maps={**feats.maps, 32: feats.maps[32] * 0})
    assert not np.allclose(jax.device_get(trainer.apply(trainer.init_params, feats)),
                           jax.device_get(trainer.apply(trainer.init_params, blank)))
    assert set(out) >= {"keypoints"}
    save_random_decoder(cfg, trainer)
    labeller = DecoderLabeler(cfg, pipe=pipe)
    assert labeller.vae_features == (32,)
    ps = prompts.from_config(cfg.generate.prompts).batch(np.arange(2))
    res = labeller(ps, np.arange(2), 0)
    plain = DecoderLabeler(configs["instance"], pipe=pipe)(ps, np.arange(2), 0)
    np.testing.assert_array_equal(res.images, plain.images)   # the extra maps leave the images alone
    for e in res.labels:
        kp = e["keypoints"]
        assert kp.ndim == 3 and kp.shape[1:] == (J, 3) and len(kp) <= 1
