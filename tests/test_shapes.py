"""The shapes world: determinism, exact ground truth, domains, TFDS round trip and grain batches."""

import numpy as np
import pytest
from scipy import ndimage

from datasetdm_jax.data import pipeline, shapes

SIZE = 64


@pytest.fixture(scope="module")
def scenes():
    """Scenes rich in persons and occlusion (every class appears), plus the default mix."""
    mixed = shapes.ShapesConfig(classes=("person", "circle", "square", "star"), min_objects=2)
    return ([shapes.render_scene(i, mixed) for i in range(30)]
            + [shapes.render_scene(100 + i) for i in range(30)])


def test_determinism():
    a, b, c = shapes.render_scene(7), shapes.render_scene(7), shapes.render_scene(8)
    for key in ("image", "segmentation", "instances", "instance_classes", "depth", "keypoints"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["caption"] == b["caption"]
    assert not np.array_equal(a["image"], c["image"])
    split = shapes.make_split("test", 5, seed=3)
    again = shapes.make_split("test", 50, seed=3)  # item i does not depend on the split size
    np.testing.assert_array_equal(split[4]["image"], again[4]["image"])
    np.testing.assert_array_equal(split[4]["image"],
                                  shapes.render_scene((3, shapes.SPLITS["test"][1], 4), split.config)["image"])
    assert not np.array_equal(split[4]["image"], shapes.make_split("pretrain", 5, seed=3)[4]["image"])
    with pytest.raises(IndexError):
        split[5]


def test_shapes_and_dtypes():
    for size in (32, 48):
        s = shapes.render_scene(1, shapes.ShapesConfig(image_size=size))
        n = len(s["instance_classes"])
        assert s["image"].shape == (size, size, 3) and s["image"].dtype == np.uint8
        assert s["segmentation"].shape == (size, size) and s["segmentation"].dtype == np.uint8
        assert s["instances"].shape == (n, size, size) and s["instances"].dtype == bool
        assert s["depth"].dtype == np.float32 and s["keypoints"].shape[1:] == (17, 3)
        assert 1 <= n <= 3 and len(s["objects"]) == n
    assert len(shapes.CLASSES) >= 7 and shapes.CLASSES[0] == "background"
    assert len(shapes.KEYPOINT_NAMES) == 17


def test_labels_consistent(scenes):
    for s in scenes:
        inst, classes, objs = s["instances"], s["instance_classes"], s["objects"]
        assert inst.sum(0).max() <= 1, "visible masks must be disjoint"
        assert all(m.sum() > 0 for m in inst)
        # far -> near order, and each object's class is the class painted where it is visible
        depths = [o["depth"] for o in objs]
        assert depths == sorted(depths, reverse=True)
        expected = (inst * classes[:, None, None]).sum(0)
        np.testing.assert_array_equal(s["segmentation"], expected)
        np.testing.assert_array_equal(s["instance_map"] > 0, inst.any(0))
        assert [o["class_id"] for o in objs] == classes.tolist()
        # depth: exact per object, background further than every object
        for o, m in zip(objs, inst):
            np.testing.assert_array_equal(s["depth"][m], np.float32(o["depth"]))
            assert shapes.MIN_DEPTH <= o["depth"] <= shapes.MAX_DEPTH
        bg = ~inst.any(0)
        assert s["depth"][bg].min() > max(depths)
        assert s["depth"].max() <= shapes.SCENE_MAX_DEPTH
        # colours: each object's pixels are mostly its own RGB
        for o, m in zip(objs, inst):
            interior = ndimage.binary_erosion(m)
            if interior.sum() >= 4:
                err = np.abs(s["image"][interior].astype(int) - np.array(o["rgb"])).max(axis=1)
                assert np.median(err) <= 2


def test_occlusion_nearest_wins(scenes):
    """Independent check: where a pixel is fully inside some objects' redrawn amodal shapes, its
    class is the nearest one's."""
    ss = 4
    for s in scenes[:20]:
        objs = s["objects"]
        if any(o["class_name"] == "person" for o in objs):
            continue  # person joints were sampled inside render_scene; shapes suffice here
        drawn = [shapes._draw_object(o, SIZE, ss).reshape(SIZE, ss, SIZE, ss) for o in objs]
        full = [d.all(axis=(1, 3)) for d in drawn]
        touched = [d.any(axis=(1, 3)) for d in drawn]
        checked = 0
        for k in range(len(objs)):
            nearer = np.any(touched[k + 1:], axis=0) if k + 1 < len(objs) else np.zeros_like(full[k])
            owned = full[k] & ~nearer
            checked += owned.sum()
            assert np.all(s["instance_map"][owned] == k + 1)
            assert np.all(s["segmentation"][owned] == objs[k]["class_id"])
        assert checked > 0


def test_keypoints(scenes):
    flags = []
    for s in scenes:
        persons = [k for k, o in enumerate(s["objects"]) if o["class_name"] == "person"]
        assert len(s["keypoints"]) == len(persons)
        for kp, k in zip(s["keypoints"], persons):
            x, y, v = kp.T
            flags += v.tolist()
            assert set(np.unique(v)) <= {0.0, 1.0, 2.0}
            inside = v > 0
            assert np.all((x[inside] >= 0) & (x[inside] < SIZE) & (y[inside] >= 0) & (y[inside] < SIZE))
            assert np.all(x[~inside] == 0) and np.all(y[~inside] == 0)
            # visible points lie on the figure's visible mask (within a pixel and a half)
            dist = ndimage.distance_transform_edt(~s["instances"][k])
            for xi, yi in zip(x[v == 2], y[v == 2]):
                assert dist[int(yi), int(xi)] <= 1.5
            # occluded points lie under a nearer object
            nearer = s["instance_map"] > k + 1
            dist_near = ndimage.distance_transform_edt(~nearer) if nearer.any() else None
            for xi, yi in zip(x[v == 1], y[v == 1]):
                assert dist_near is not None and dist_near[int(yi), int(xi)] <= 1.5
    assert {0.0, 1.0, 2.0} <= set(flags), "all COCO visibility flags should occur"


def test_captions(scenes):
    for s in scenes:
        cap = s["caption"]
        for o in s["objects"]:
            assert f"{o['colour']} {o['class_name']}" in cap
        assert cap.count(" and ") == (len(s["objects"]) > 1)
        assert cap.endswith("background")
    objs = [{"colour": "orange", "class_name": "ring", "center": (40.0, 0)},
            {"colour": "red", "class_name": "circle", "center": (10.0, 0)}]
    assert shapes.caption_for(objs, ("stripes", "dark")) == \
        "a red circle and an orange ring on a dark striped background"


def test_domains():
    labelled, shifted = set(shapes.DOMAINS["labelled"]), set(shapes.DOMAINS["shifted"])
    assert labelled and shifted and not labelled & shifted
    assert labelled | shifted == set(shapes.DOMAINS["full"])
    seen = {name: {s["background"] for s in shapes.make_split(name, 25, seed=1, config=shapes.ShapesConfig(image_size=32))}
            for name in ("train_labelled", "test_shifted", "test")}
    assert seen["train_labelled"] <= labelled and seen["test_shifted"] <= shifted
    assert seen["test"] & labelled and seen["test"] & shifted
    with pytest.raises(ValueError):
        shapes.ShapesConfig(domain="nope")


def _check_batch(batch, b, size, m=3):
    assert batch["image"].shape == (b, size, size, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["caption"].shape == (b,) and isinstance(batch["caption"][0], str)
    assert batch["segmentation"].shape == (b, size, size) and batch["segmentation"].dtype == np.uint8
    assert batch["depth"].shape == (b, size, size) and batch["depth"].dtype == np.float32
    assert batch["instances"].shape == (b, m, size, size) and batch["instances"].dtype == bool
    assert batch["instance_classes"].shape == (b, m) and batch["instance_classes"].dtype == np.int32
    assert batch["keypoints"].shape == (b, m, 17, 3) and batch["keypoints"].dtype == np.float32
    for i in range(b):  # padding: empty masks, class 0, invisible keypoints
        n = batch["num_instances"][i]
        assert not batch["instances"][i, n:].any() and not batch["instance_classes"][i, n:].any()
        assert all(batch["instances"][i, :n].any(axis=(1, 2)))
        assert not batch["keypoints"][i, batch["num_persons"][i]:].any()
    assert set(batch) == set(pipeline.FEATURE_KEYS)


def test_grain_procedural():
    cfg = shapes.ShapesConfig(image_size=32)
    src = shapes.make_split("pretrain", 12, seed=0, config=cfg)
    batches = list(pipeline.grain_dataset(src, 4, shuffle_seed=1))
    assert len(batches) == 3
    for batch in batches:
        _check_batch(batch, 4, 32)
    again = next(iter(pipeline.grain_dataset(src, 4, shuffle_seed=1)))
    np.testing.assert_array_equal(again["image"], batches[0]["image"])
    # unshuffled batch 0 is scenes 0..3, image scaled exactly
    first = next(iter(pipeline.grain_dataset(src, 4, shuffle_seed=None)))
    np.testing.assert_allclose(first["image"][2], src[2]["image"] / 127.5 - 1.0, atol=1e-6)
    infinite = iter(pipeline.procedural_dataset("train_labelled", 2, config=cfg, num_epochs=None))
    _check_batch(next(infinite), 2, 32)


def test_tfds_round_trip(tmp_path):
    from datasetdm_jax.data import shapes_tfds

    sizes = {"train_labelled": 4, "test_shifted": 2}
    builder = shapes_tfds.prepare(str(tmp_path), split_sizes=sizes, image_size=32, seed=5)
    assert builder.info.splits["train_labelled"].num_examples == 4
    source = builder.as_data_source("train_labelled")
    reference = shapes.make_split("train_labelled", 4, seed=5, config=shapes.ShapesConfig(image_size=32))
    for i in range(4):
        rec, ref = source[i], reference[i]
        assert rec["index"] == i and rec["caption"].decode() == ref["caption"]
        for key in ("image", "segmentation", "instance_map", "instance_classes", "depth", "keypoints"):
            np.testing.assert_array_equal(rec[key], ref[key])
    batch = next(iter(pipeline.grain_dataset(source, 2, shuffle_seed=None)))
    _check_batch(batch, 2, 32)
    direct = next(iter(pipeline.grain_dataset(reference, 2, shuffle_seed=None)))
    for key in pipeline.FEATURE_KEYS:
        np.testing.assert_array_equal(batch[key], direct[key])


def test_save_preview(tmp_path):
    from PIL import Image

    path = tmp_path / "preview.png"
    shapes.save_preview(str(path), 4, config=shapes.ShapesConfig(image_size=32), scale=1)
    assert Image.open(path).size == (4 * 32, 2 * 32)


def test_depth_oracle_reads_object_depth_from_size_and_shows_what_a_cap_costs():
    from datasetdm_jax.research import shapes_depth_floor as floor

    scene = shapes.make_split("test", 1)[0]
    objects = scene["instance_map"] > 0
    ratio = floor.oracle_depth(scene)[objects] / scene["depth"][objects]
    assert np.all(np.abs(ratio - 1) <= 1 / 0.9 - 1 + 1e-6)  # only the world's +-10 % jitter is unseen
    m = floor.depth_floor(16, caps=(10.0, shapes.SCENE_MAX_DEPTH))
    assert m["uncapped"]["rel"] < 0.06 and m["uncapped"]["delta1"] == 1.0
    assert m["capped at 10"]["rel"] > m["uncapped"]["rel"] + 0.03  # background pixels beyond 10 m
    assert m[f"capped at {shapes.SCENE_MAX_DEPTH:g}"] == m["uncapped"]


def test_depth_error_regions_split_the_rel():
    from datasetdm_jax.research import shapes_depth_floor as floor

    ids = np.zeros((1, 14, 14), np.int32)
    ids[0, 3:11, 3:11] = 1                                  # an 8x8 object; the band is 2 px either side
    r = floor.regions(ids)
    assert r["object"].sum() == 16 and r["object"][0, 5:9, 5:9].all()
    # the outer 1-px ring, plus the band's 4 far corners (its dilation is 4-connected)
    assert r["background"].sum() == 14 * 14 - 12 * 12 + 4 and not r["background"][0, 2:12, 2:12].any()
    assert (r["edge"] ^ r["object"] ^ r["background"]).all()
    gt = np.where(ids > 0, 2.0, 10.0)
    pred = gt.copy()
    pred[r["edge"]] *= 1.5                                  # errors only on outlines
    out = floor.rel_by_region(pred, gt, r)
    assert out["edge"]["rel"] == pytest.approx(0.5) and out["object"]["rel"] == 0 == out["background"]["rel"]
    assert sum(v["of_total"] for v in out.values()) == pytest.approx(np.mean(np.abs(pred - gt) / gt))
