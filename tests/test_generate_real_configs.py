"""The five paper-scale configs end to end on fake datasets in their real layouts, with the tiny
random SD: ``datasetdm train`` (a few steps) -> ``datasetdm generate`` -> ``datasetdm export`` ->
``datasetdm downstream`` (VOC, Cityscapes, NYU; COCO has no downstream config, so its records are read
with the downstream reader and its COCO file with pycocotools). Every command goes through
``datasetdm_jax.cli.main``, with the configs' own ``generate`` sections: only sizes are overridden.

One tiny SD for the session (conftest ``tiny_dir``); 32 px images, 2 sampler steps, 3 images.
"""

import json
import os

import numpy as np
import pytest

from datasetdm_jax import cli
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.data import cityscapes, records, voc
from fake_datasets import write_fake_cityscapes, write_fake_coco, write_fake_nyu
from fake_voc import write_fake_voc

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
NUM = 3  # images generated per dataset: shards of 2 + 1

# Sizes only: the tiny SD's 32 px images, two training steps, a small decoder.
TINY_TRAIN = ["data.image_size=32", "steps=2", "batch_size=1", "log_every=1", "eval_every=1000",
              "val.num_images=1", "eval.num_images=1", "capture=lean"]
TINY_GENERATE = ["generate.steps=2", "generate.batch_size=2", "generate.shard_size=2"]
MASK_DECODER = ["decoder.hidden=16", "decoder.num_layers=1", "decoder.heads=2", "decoder.ffn=32", "num_points=64"]
TINY_SEGMENTER = ["semantic.model.stages=((8, 1, 1), (16, 1, 2))", "semantic.model.depth=1", "semantic.model.aspp_width=8",
                  "semantic.model.aspp_rates=(2,)", "semantic.model.skip_stage=0", "semantic.model.skip_width=4",
                  "semantic.model.decoder_width=8"]
# the synthetic row alone: the generated folder is what is under test (rows real and real+synthetic
# are the same trainer on other data, tested in test_downstream.py)
TINY_DOWNSTREAM = ["rows=('synthetic',)", "augment.crop=(32, 32)", "eval.batch_size=2", "test.num=2"]

CASES = {
    "voc_semantic": dict(
        data=lambda r: [f"data.root={r['voc']}", "data.min_pixels=100", "data.per_class=1"],
        train=MASK_DECODER + ["decoder.num_queries=21"],
        downstream=("downstream_voc", lambda r: [
            f"real.root={r['voc']}", f"test.root={r['voc']}", "real.image_size=32", "test.image_size=32",
            "real.per_class=1", "real.min_pixels=100", *TINY_SEGMENTER, "semantic.steps=2", "semantic.batch_size=2",
            "semantic.warmup_steps=0", "semantic.log_every=1"])),
    "cityscapes_semantic": dict(
        data=lambda r: [f"data.root={r['city']}", "data.min_pixels=10", "data.per_class=1", "val.split=train",
                        "eval.split=train"],
        train=MASK_DECODER + ["decoder.num_queries=19"],
        downstream=("downstream_cityscapes", lambda r: [
            f"real.root={r['city']}", f"test.root={r['city']}", "test.splits=('train',)", "real.image_size=32",
            "test.image_size=32", "real.per_class=1", "real.min_pixels=10", *TINY_SEGMENTER, "semantic.steps=2",
            "semantic.batch_size=2", "semantic.warmup_steps=0", "semantic.log_every=1"])),
    "coco_instance": dict(
        data=lambda r: [f"data.root={r['coco']}", "data.split=val2017", "data.min_area=100.", "data.per_class=1",
                        "num_classes=4"],   # the fake's background + person, car, dog
        train=MASK_DECODER + ["decoder.num_queries=6", "data.max_objects=4", "top_k=5", "generate.max_instances=4"],
        downstream=None),
    "coco_pose": dict(
        data=lambda r: [f"data.root={r['coco']}", "data.split=val2017", "data.num_images=2"],
        train=["decoder.hidden=16"],
        downstream=None),
    "nyu_depth": dict(
        data=lambda r: [f"data.root={r['nyu']}", "data.num_images=2"],
        train=["decoder.hidden=16", "decoder.head_channels=8"],
        downstream=("downstream_nyu", lambda r: [
            f"real.root={r['nyu']}", f"test.root={r['nyu']}", "real.image_size=32", "test.image_size=32",
            "real.num_images=2", "depth.model.widths=(8, 8, 16)", "depth.model.depth=1", "depth.steps=2",
            "depth.batch_size=2", "depth.warmup_steps=0", "depth.log_every=1"])),
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("real_layouts")
    return {"voc": write_fake_voc(str(base / "VOCdevkit" / "VOC2012")),
            "city": write_fake_cityscapes(str(base / "cityscapes")),
            "coco": write_fake_coco(str(base / "coco")),
            "nyu": write_fake_nyu(str(base / "nyu"))}


def _run(name, roots, tiny_dir, base):
    """train -> generate -> export for one config; returns (config, generated folder, export folder)."""
    case = CASES[name]
    config_path = os.path.join(CONFIGS, f"{name}.py")
    overrides = [f"pipeline={tiny_dir}", f"workdir={base / 'run'}", *TINY_TRAIN, *case["data"](roots),
                 *case["train"], *TINY_GENERATE]
    cli.main(["train", "--config", config_path, *overrides])
    gen, exp = base / "generated", base / "exported"
    cli.main(["generate", "--config", config_path, "--num_images", str(NUM), "--out", str(gen), *overrides])
    cli.main(["export", "--data", str(gen), "--out", str(exp)])
    return load_config(config_path, overrides), gen, exp


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_trains_generates_exports_and_is_read(name, roots, tiny_dir, tmp_path):
    from pycocotools.coco import COCO

    config, gen, exp = _run(name, roots, tiny_dir, tmp_path)
    manifest = records.read_manifest(str(gen))
    task = config.task
    # the config's own generation settings, the dataset's own classes
    assert manifest["counts"]["images"] == NUM and manifest["num_shards"] == 2
    assert manifest["prompts"]["kind"] == "templates" and manifest["labeler"]["name"] == "decoder"
    assert manifest["config"]["generate"]["guidance"] == config.generate.guidance
    expected_classes = {"voc_semantic": list(voc.CLASSES), "cityscapes_semantic": list(cityscapes.CLASSES),
                        "coco_instance": ["background", "person", "car", "dog"],
                        "coco_pose": ["background", "person"], "nyu_depth": []}[name]
    assert manifest["class_names"] == expected_classes
    files = sorted(os.listdir(gen))
    assert sum(f.endswith(".tfrecord") for f in files) == 2 and sum(f.endswith(".array_record") for f in files) == 2
    exs = list(records.read_examples(str(gen)))
    assert [e["index"] for e in exs] == list(range(NUM))
    for e in exs:
        assert e["image"].shape == (32, 32, 3) and e["prompt"].startswith("a photo of")
        if task == "semantic":
            named = {expected_classes.index(c) for c in e["classes"]}
            always = {expected_classes.index(c) for c in config.generate.grounding_always}
            assert set(np.unique(e["segmentation"]).tolist()) <= {0} | named | always   # labels follow the prompt
        elif task == "instance":
            assert set(e["instance_labels"].tolist()) <= {expected_classes.index(c) for c in e["classes"]}
        elif task == "pose":
            assert e["keypoints"].shape[1:] == (17, 3) and e["prompt"] == "a photo of a person"
        else:
            assert e["depth"].shape == (32, 32) and (e["depth"] >= 0).all()
    # export: the dataset's categories, one image file per record
    api = COCO(str(exp / "annotations.json"))
    assert sorted(api.getImgIds()) == list(range(NUM)) and len(os.listdir(exp / "images")) == NUM
    names = {c["id"]: c["name"] for c in api.loadCats(api.getCatIds())}
    if expected_classes:
        assert set(names.values()) <= set(expected_classes) and "circle" not in names.values()
        first = 0 if expected_classes[0] == "background" else -1
        assert names == {k: n for k, n in enumerate(expected_classes) if k != first}
    else:
        assert names == {} and len(os.listdir(exp / "depth")) == NUM
    for a in api.loadAnns(api.getAnnIds()):
        assert a["category_id"] in names
    # downstream reads the generated folder
    if CASES[name]["downstream"] is None:
        from datasetdm_jax.downstream import records_arrays
        arrays = records_arrays(str(gen), progress=False)
        assert arrays["image"].shape == (NUM, 32, 32, 3)
        return
    ds_name, ds_overrides = CASES[name]["downstream"]
    wd = tmp_path / "downstream"
    cli.main(["downstream", "--config", os.path.join(CONFIGS, f"{ds_name}.py"), "--workdir", str(wd),
              f"synthetic.records={gen}", *TINY_DOWNSTREAM, *ds_overrides(roots)])
    report = json.loads((wd / "report.json").read_text())
    assert report["rows"] == ["synthetic"]
    scores = report["semantic" if task == "semantic" else "depth"]["synthetic"]
    assert set(scores) == {"voc_semantic": {"val"}, "cityscapes_semantic": {"train"}, "nyu_depth": {"test"}}[name]


def _semantic_folder(folder, n, class_names, formats):
    """A finished generated folder of ``n`` 16 px semantic records (no SD), as generate writes it."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    exs = [records.to_example({"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                               "segmentation": np.repeat(np.arange(4, dtype=np.uint8), 64).reshape(16, 16),
                               "prompt": f"p{i}", "index": i, "quality": 0.5}) for i in range(n)]
    shards = [records.write_shard(str(folder), records.shard_name(s, 2), exs[s::2], formats=formats) for s in (0, 1)]
    records.atomic_write(str(folder / records.MANIFEST), json.dumps({"shards": shards, "class_names": class_names}))


def test_export_streams_in_constant_memory_with_the_datasets_classes(tmp_path):
    import tracemalloc

    from pycocotools.coco import COCO

    from datasetdm_jax import export

    peaks = {}
    for n in (160, 640):   # both past the ArrayRecord reader's block of 64 records per shard
        data = tmp_path / f"data{n}"
        _semantic_folder(data, n, list(cityscapes.CLASSES), ("array_record",))   # ArrayRecord shards only
        tracemalloc.start()
        stats = export.export_folder(str(data), str(tmp_path / f"out{n}"))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert stats == {"images": n, "dropped": 0, "annotations": 4 * n}
    assert peaks[640] < 1.25 * peaks[160], peaks        # four times the images, not four times the memory
    api = COCO(str(tmp_path / "out160" / "annotations.json"))
    # Cityscapes has no background: label 0 (road) is a category like the others
    assert [c["name"] for c in api.loadCats(api.getCatIds())] == list(cityscapes.CLASSES)
    assert {a["category_id"] for a in api.loadAnns(api.getAnnIds())} == {0, 1, 2, 3}
    assert sorted(api.getImgIds()) == list(range(160)) and not list(tmp_path.glob("out160/*.tmp-*"))
    lines = (tmp_path / "out160" / "prompts.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines][:3] == [0, 2, 4]   # shard order, as stored
    with pytest.raises(ValueError, match=r"no tfrecord shards"):
        next(records.read_tfrecords(str(tmp_path / "data160")))
    with pytest.raises(ValueError, match=r"generate.formats must name one or more of"):
        records.check_formats(("parquet",))
