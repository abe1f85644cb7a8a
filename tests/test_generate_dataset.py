"""`datasetdm generate`: records + manifest, refusal of mixed configs, kill -9 + resume and a 2-process
run give byte-identical datasets, export to folder + COCO.

One tiny random SD and a randomly initialised decoder saved the way `datasetdm train` saves it;
the in-process run is the reference every subprocess run is compared with.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from tiny_sd import save_random_decoder
import pytest

from datasetdm_jax import dataset_writer, export, generate, labelers, pretrained, prompts, smoke, train
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.data import records, records_tfds, shapes

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
TINY = os.path.join(CONFIGS, "shapes_semantic.py") + ":tiny"
NUM = 8  # 3 shards of 3, 3, 2 (tiny: shard_size 3, batch 2)
CACHE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = pretrained.save_pipeline(smoke.random_pipeline(root / "src"), root / "model")
    overrides = [f"pipeline={model}", f"workdir={root / 'wd'}"]
    config = load_config(TINY, overrides)
    with pytest.raises(FileNotFoundError, match="datasetdm train --config"):
        dataset_writer.generate_dataset(config, NUM, str(root / "never"), progress=False)
    trainer = train.Trainer(config)
    save_random_decoder(config, trainer)
    labeler = labelers.make_labeler(config)
    ref = root / "ref"
    manifest = dataset_writer.generate_dataset(config, NUM, str(ref), labeler=labeler, progress=False)
    return root, overrides, config, labeler, ref, manifest


def _files(folder):
    """The dataset's files (``logs/``, each process's progress, is not part of its bytes)."""
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder)) if n != dataset_writer.LOG_DIR}


def _cli(root, args, extra_env=None):
    env = {**os.environ, "DATASETDM_JAX_CACHE": CACHE, **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "datasetdm_jax.cli", "generate", "--config", TINY, *args],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_records_manifest_and_preview(setup):
    root, _, config, _, ref, manifest = setup
    names = sorted(os.listdir(ref))
    assert names == sorted([records.MANIFEST, dataset_writer.SPEC_FILE, "preview.png", "dataset_info.json", "features.json",
                            dataset_writer.LOG_DIR] + [
        f"data-0000{s}-of-00003{ext}" for s in range(3) for ext in (".tfrecord", ".array_record", ".json")])
    assert manifest["counts"]["images"] == NUM and manifest["num_shards"] == 3
    assert [s["num_records"] for s in manifest["shards"]] == [3, 3, 2]
    assert manifest["prompts"]["kind"] == "shapes" and manifest["labeler"]["name"] == "decoder"
    assert manifest["model"]["dtype"] == "float32" and manifest["config"]["dtype"] == "auto"  # "auto" on CPU
    assert manifest["labeler"]["grounding"] == "prompt" and manifest["labeler"]["grounding_threshold"] == 0.0
    assert sum(manifest["counts"]["images_with_class"].values()) >= NUM
    for s in manifest["shards"]:
        for f in s["files"].values():
            assert records.sha256_file(str(ref / f["file"])) == f["sha256"]
    exs = list(records.read_tfrecords(str(ref)))
    src = prompts.from_config(config.generate.prompts)
    assert [e["index"] for e in exs] == list(range(NUM))
    assert [e["prompt"] for e in exs] == [src[i].text for i in range(NUM)]
    for e in exs:
        assert e["image"].shape == (32, 32, 3) and e["image"].dtype == np.uint8
        assert e["segmentation"].shape == (32, 32) and e["segmentation"].max() < len(shapes.CLASSES)
        assert 0 <= e["quality"] <= 1
    grain_ds = records.grain_source(str(ref))
    np.testing.assert_array_equal(grain_ds[5]["image"], exs[5]["image"])
    tfds_ds = records_tfds.tfds_source(str(ref))                      # tfds metadata written by generate
    assert len(tfds_ds) == NUM
    np.testing.assert_array_equal(tfds_ds[5]["segmentation"], exs[5]["segmentation"])
    assert len({e["image"].tobytes() for e in exs}) == NUM      # distinct noise per index
    # the same indices through the plain sampler give the same images (one sampler, index-keyed noise)
    plain = generate.sample(config_pipe(setup), [src[i].text for i in (4, 5)], steps=2, scheduler="pndm",
                            seed=0, height=32, width=32, start_index=4)
    assert np.abs(np.round(plain * 255) - np.stack([exs[4]["image"], exs[5]["image"]])).max() <= 1


def config_pipe(setup):
    return setup[3].pipe


def test_rerun_is_a_no_op_and_other_configs_are_refused(setup):
    root, overrides, config, labeler, ref, manifest = setup
    before = _files(ref)
    again = dataset_writer.generate_dataset(config, NUM, str(ref), labeler=labeler, progress=False)
    assert again == manifest and _files(ref) == before
    other = load_config(TINY, overrides + ["generate.guidance=3.0"])
    with pytest.raises(ValueError, match=r"different setting \(config.generate.guidance"):
        dataset_writer.generate_dataset(other, NUM, str(ref), labeler=labeler, progress=False)
    # a training-only setting cannot change the labels (the decoder's weights are pinned): resumes
    assert dataset_writer.generate_dataset(load_config(TINY, overrides + ["lr=0.5", "baseline.width=3"]), NUM, str(ref),
                                     labeler=labeler, progress=False) == manifest
    with pytest.raises(ValueError, match=r"different setting \(num_images"):
        dataset_writer.generate_dataset(config, NUM + 1, str(ref), labeler=labeler, progress=False)
    stray = root / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        dataset_writer.generate_dataset(config, NUM, str(stray), labeler=labeler, progress=False)
    assert _files(ref) == before


def test_kill_9_then_rerun_is_byte_identical(setup):
    root, overrides, _, _, ref, _ = setup
    out = root / "killed"
    args = ["--num_images", str(NUM), "--out", str(out), *overrides]
    p = _cli(root, args)
    first = out / "data-00000-of-00003.json"
    deadline = time.time() + 900  # generous: CI machines can be very busy
    while not first.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    log = p.communicate()[0]
    assert first.exists(), log
    assert not (out / records.MANIFEST).exists()                   # killed mid-run
    p = _cli(root, args)
    log = p.communicate(timeout=900)[0]
    assert p.returncode == 0, log
    assert "img/s" in log and "generate: 8 images in 3 shard(s)" in log
    assert _files(out) == _files(ref)


def test_two_processes_equal_one(setup):
    root, overrides, _, _, ref, _ = setup
    out = root / "multi"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_cli(root, ["--num_images", str(NUM), "--out", str(out), "--coordinator", f"127.0.0.1:{port}",
                         "--num_processes", "2", "--process_id", str(k), *overrides]) for k in (0, 1)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "process 1 wrote 1 shard(s)" in logs[1]
    assert _files(out) == _files(ref)


def test_export_folder_and_coco(setup):
    from pycocotools.coco import COCO

    root, _, _, _, ref, _ = setup
    out = root / "export"
    stats = export.export_folder(str(ref), str(out))
    assert stats["images"] == NUM
    assert len(os.listdir(out / "images")) == NUM and len(os.listdir(out / "segmentation")) == NUM
    coco = COCO(str(out / "annotations.json"))
    assert len(coco.getImgIds()) == NUM and len(coco.getAnnIds()) == stats["annotations"]
    exs = {e["index"]: e for e in records.read_tfrecords(str(ref))}
    assert (out / "depth").exists() == ("depth" in exs[0])  # no empty folder for a label the set lacks
    for ann in coco.loadAnns(coco.getAnnIds()):
        seg = exs[ann["image_id"]]["segmentation"]
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), seg == ann["category_id"])
    prompts_lines = (out / "prompts.jsonl").read_text().splitlines()
    assert json.loads(prompts_lines[3])["prompt"] == exs[3]["prompt"]
    with pytest.raises(ValueError, match=r"--min_quality=1.1: expected a number in \[0, 1\]"):
        export.export_folder(str(ref), str(root / "export_q"), min_quality=1.1)


def test_preview_has_depth_colour_rows():
    scene = shapes.render_scene(0, shapes.ShapesConfig(image_size=16))
    ex = {"image": scene["image"], "segmentation": scene["segmentation"], "depth": scene["depth"],
          "keypoints": scene["keypoints"]}
    grid = export.preview_grid([ex, ex], scale=1)
    assert grid.size == (32, 48)
    depth_tile = np.asarray(grid)[32:48, :16]
    np.testing.assert_array_equal(depth_tile, export.colorize_depth(scene["depth"]))
    assert len(np.unique(depth_tile.reshape(-1, 3), axis=0)) > 2


def test_attention_labeler_through_generate(setup):
    """`generate.labeler=attention`: the training-free labeller writes the same record format."""
    import ml_collections

    root, overrides, _, _, _, _ = setup
    config = load_config(TINY, overrides + ["generate.labeler=attention"])
    # The tiny UNet attends at feature heights 16 (level 0) and 8 (mid block) for a 32 px image.
    config.generate.labeler_config = ml_collections.ConfigDict(dict(self_res=16, cross_res=8))
    out = root / "attn"
    manifest = dataset_writer.generate_dataset(config, 3, str(out), progress=False)
    assert manifest["labeler"]["name"] == "attention" and manifest["counts"]["images"] == 3
    exs = list(records.read_tfrecords(str(out)))
    assert [e["index"] for e in exs] == [0, 1, 2]
    for e in exs:
        seg = e["segmentation"]
        assert seg.shape == e["image"].shape[:2]
        allowed = {0, 255} | {shapes.CLASSES.index(c) for c in e["classes"]}
        assert set(np.unique(seg).tolist()) <= allowed
        assert "; " in e["prompt"]  # class names appended to the caption
