"""Instance and pose labels for generation: jitted post-processing with fixed-size outputs, host
trimming, records round trip, COCO export and preview (no model: hand-made decoder outputs)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datasetdm_jax import coco_format, export
from datasetdm_jax.data import records, shapes
from datasetdm_jax.decoders import postprocess

S = 16          # image size
J = len(shapes.KEYPOINT_NAMES)


def _instance_outputs():
    """2 images, 5 queries, 3 head classes (+ no-object), 8x8 mask logits."""
    logits = np.full((2, 5, 4), -8.0, np.float32)
    masks = np.full((2, 5, 8, 8), -5.0, np.float32)
    logits[0, 0, 2] = 8.0; masks[0, 0, 1:4, 1:4] = 5.0          # confident, class 2 -> data class 3
    logits[0, 1, 0] = 8.0; masks[0, 1, 5:8, 4:8] = 5.0          # confident, class 0 -> data class 1
    logits[0, 2, 3] = 8.0; masks[0, 2, :4, :4] = 5.0            # "no object": low class prob
    logits[0, 3, 1] = 8.0                                       # confident class, empty mask
    logits[0, 4, 1] = 8.0; masks[0, 4, 7, 7] = 5.0              # confident, 1 mask pixel (4 px at 16)
    logits[1, :, 3] = 8.0                                       # image 1: nothing
    return jnp.asarray(logits), jnp.asarray(masks)


def test_instance_labels_threshold_cap_area_and_order():
    logits, masks = _instance_outputs()
    fn = jax.jit(lambda l, m: postprocess.instance_labels(l, m, out_size=S, score_threshold=0.4, max_instances=4,
                                                          min_area=5))
    out = jax.device_get(fn(logits, masks))
    assert out["instance_masks"].shape == (2, 4, S, S) and out["instance_masks"].dtype == bool
    assert out["instance_labels"].shape == out["instance_scores"].shape == out["instance_valid"].shape == (2, 4)
    # image 0: two kept (class 3 box at rows/cols 2..7, class 1 box), the 4-pixel one is under min_area
    np.testing.assert_array_equal(out["instance_valid"][0], [True, True, False, False])
    assert sorted(out["instance_labels"][0][:2].tolist()) == [1, 3]
    assert (out["instance_scores"][0][:2] > 0.9).all() and out["instance_scores"][0][0] >= out["instance_scores"][0][1]
    kept = {int(k): m for k, m in zip(out["instance_labels"][0][:2], out["instance_masks"][0][:2])}
    assert kept[3][2:8, 2:8].all() and kept[3].sum() == 36 and kept[1][10:16, 8:16].all()
    assert not out["instance_valid"][1].any()
    lower = jax.device_get(postprocess.instance_labels(logits, masks, out_size=S, score_threshold=0.4,
                                                       max_instances=4, min_area=0))
    assert lower["instance_valid"][0].sum() == 3                 # the 4-pixel mask now counts
    capped = jax.device_get(postprocess.instance_labels(logits, masks, out_size=S, score_threshold=0.0,
                                                        max_instances=2))
    assert capped["instance_masks"].shape[1] == 2 and capped["instance_valid"][0].all()
    rows = [postprocess.trim({k: v[i] for k, v in out.items()}) for i in range(2)]
    assert "instance_valid" not in rows[0]
    assert rows[0]["instance_masks"].shape == (2, S, S) and rows[1]["instance_masks"].shape == (0, S, S)
    assert rows[1]["instance_labels"].shape == (0,)


def test_instance_quality_is_mean_kept_score():
    logits, masks = _instance_outputs()
    lab = postprocess.task_labels("instance", {"logits": logits[None], "masks": masks[None]}, S,
                                  {**postprocess.DEFAULTS, "min_area": 5})
    q = np.asarray(lab["instance_quality"])
    assert q[0] == pytest.approx(float(np.asarray(lab["instance_scores"])[0, :2].mean()), rel=1e-6) and q[1] == 0


def _heatmaps():
    """1 image, 16x16 heatmaps (stride 2 for a 32 px image): joint j < 16 peaks at (x=j, y=3)."""
    hm = np.zeros((1, 16, 16, J), np.float32)
    for j in range(J - 1):
        hm[0, 3, j, j] = 0.8
    hm[0, 3, 15, J - 1] = 0.05                                     # the last joint: below the threshold
    return jnp.asarray(hm)


def test_pose_labels_visibility_and_coordinates():
    out = jax.device_get(jax.jit(lambda h: postprocess.pose_labels(h, image_size=32, keypoint_threshold=0.1))(
        _heatmaps()))
    kp = out["keypoints"]
    assert kp.shape == (1, 1, J, 3) and out["keypoint_scores"].shape == (1, 1, J)
    np.testing.assert_array_equal(kp[0, 0, :, 2], [2.0] * (J - 1) + [0.0])
    np.testing.assert_allclose(kp[0, 0, :J - 1, 0], [2.0 * j for j in range(J - 1)])
    np.testing.assert_allclose(kp[0, 0, :J - 1, 1], 6.0)
    np.testing.assert_array_equal(kp[0, 0, J - 1], [0, 0, 0])
    vis = kp[0, 0, kp[0, 0, :, 2] > 0]
    assert (vis[:, :2] >= 0).all() and (vis[:, :2] < 32).all()
    assert out["person_valid"].tolist() == [[True]]
    strict = jax.device_get(postprocess.pose_labels(_heatmaps(), image_size=32, min_keypoints=J))
    assert strict["person_valid"].tolist() == [[False]]
    row = postprocess.trim({**{k: v[0] for k, v in strict.items()}, "pose_quality": np.float32(0.5),
                            "quality": np.float32(0.7)})
    assert row["keypoints"].shape == (0, J, 3) and row["keypoint_scores"].shape == (0, J)
    assert row["quality"] == pytest.approx(0.6) and "pose_quality" not in row


def test_pose_per_person_decodes_inside_each_person_box():
    """Two people (left and right half of a 32 px image) and a square; every joint peaks in both halves."""
    person, square = shapes.CLASS_TO_ID["person"], shapes.CLASS_TO_ID["square"]
    masks = np.zeros((1, 4, 32, 32), bool)
    masks[0, 0, 4:28, 2:12] = masks[0, 1, 4:28, 20:30] = masks[0, 2, 0:4, 14:18] = True
    inst = {"instance_masks": jnp.asarray(masks), "instance_labels": jnp.asarray([[person, person, square, person]]),
            "instance_valid": jnp.asarray([[True, True, True, False]])}
    hm = np.zeros((1, 16, 16, J), np.float32)
    hm[0, 8, 3, :] = 0.8                                                   # left person at (6, 16)
    hm[0, 10, 12, :] = 0.6                                                 # right person at (24, 20)
    fn = jax.jit(lambda h, i: postprocess.pose_per_person(h, i, person_class=person, image_size=32))
    out = jax.device_get(fn(jnp.asarray(hm), inst))
    assert out["keypoints"].shape == (1, 5, J, 3)
    assert out["person_valid"].tolist() == [[True, True, False, False, False]]
    np.testing.assert_allclose(out["keypoints"][0, 0], np.tile([6.0, 16.0, 2.0], (J, 1)))
    np.testing.assert_allclose(out["keypoints"][0, 1], np.tile([24.0, 20.0, 2.0], (J, 1)))
    np.testing.assert_allclose(out["keypoint_scores"][0, 1], 0.6)
    q = postprocess.pose_quality(out)
    assert float(q[0]) == pytest.approx(0.7)
    # no person instance kept: the whole-image slot (strongest peak) takes over
    none = {**inst, "instance_labels": jnp.full((1, 4), square)}
    out = jax.device_get(fn(jnp.asarray(hm), none))
    assert out["person_valid"].tolist() == [[False, False, False, False, True]]
    np.testing.assert_allclose(out["keypoints"][0, 4], np.tile([6.0, 16.0, 2.0], (J, 1)))


def test_finisher_pairs_pose_with_instances_only_when_both_run():
    import ml_collections

    cfg = lambda task: ml_collections.ConfigDict(dict(name=task, task=task, data=dict(image_size=32),
                                                      generate=dict(keypoint_threshold=0.1)))
    hm = jnp.zeros((1, 16, 16, J)).at[0, 8, 3, :].set(0.8)
    alone = postprocess.finisher([("pose", cfg("pose"))], 32)({"pose_heatmaps": hm, "depth": jnp.zeros((1, 32, 32))})
    assert alone["keypoints"].shape == (1, 1, J, 3) and "pose_heatmaps" not in alone and "depth" in alone
    inst = {"instance_masks": jnp.zeros((1, 3, 32, 32), bool), "instance_labels": jnp.zeros((1, 3), jnp.int32),
            "instance_valid": jnp.zeros((1, 3), bool)}
    finish = postprocess.finisher([("pose", cfg("pose")), ("instance", cfg("instance"))], 32)
    both = finish({**inst, "pose_heatmaps": hm})
    assert both["keypoints"].shape == (1, 4, J, 3) and both["person_valid"].tolist() == [[False] * 3 + [True]]
    same = postprocess.finisher([("semantic", cfg("semantic"))], 32)({"segmentation": 1})
    assert same == {"segmentation": 1}


def test_label_settings_and_bad_values():
    import ml_collections

    c = ml_collections.ConfigDict(dict(name="x", generate=dict(score_threshold=0.2, max_instances=3)))
    s = postprocess.label_settings(c)
    assert s["score_threshold"] == 0.2 and s["max_instances"] == 3 and s["keypoint_threshold"] == 0.1
    c.generate.max_instances = 0
    with pytest.raises(ValueError, match="generate.max_instances"):
        postprocess.label_settings(c)
    with pytest.raises(ValueError, match="task must be"):
        postprocess.task_labels("depth", None, S, postprocess.DEFAULTS)


def _generated_rows():
    """Two generated-style examples: instances + a person's keypoints, and none of either."""
    img = np.zeros((S, S, 3), np.uint8)
    person = np.zeros((S, S), bool)
    person[2:14, 4:10] = True
    square = np.zeros((S, S), bool)
    square[10:15, 11:15] = True
    kp = np.zeros((1, J, 3), np.float32)
    kp[0, :, 0], kp[0, :, 1], kp[0, :, 2] = np.linspace(4.5, 9.5, J), np.linspace(2.5, 13.5, J), 2
    kp[0, 3] = 0
    full = {"image": img, "prompt": "a person and a square", "classes": ["person", "square"], "index": 0, "seed": 0,
            "instance_masks": np.stack([person, square]),
            "instance_labels": np.array([shapes.CLASS_TO_ID["person"], shapes.CLASS_TO_ID["square"]]),
            "instance_scores": np.array([0.9, 0.6], np.float32), "keypoints": kp,
            "keypoint_scores": np.linspace(0.2, 1.0, J, dtype=np.float32)[None], "quality": 0.75}
    empty = {"image": img, "prompt": "nothing", "index": 1, "seed": 0, "instance_masks": np.zeros((0, S, S), bool),
             "instance_labels": np.zeros((0,), np.int32), "instance_scores": np.zeros((0,), np.float32),
             "keypoints": np.zeros((0, J, 3), np.float32), "keypoint_scores": np.zeros((0, J), np.float32)}
    return full, empty


def test_records_round_trip_instances_and_keypoints():
    full, empty = _generated_rows()
    back = records.from_example(records.to_example(full, class_names=shapes.CLASSES))
    np.testing.assert_array_equal(back["instance_masks"], full["instance_masks"])
    np.testing.assert_array_equal(back["instance_labels"], full["instance_labels"])
    np.testing.assert_allclose(back["instance_scores"], full["instance_scores"])
    np.testing.assert_allclose(back["keypoints"], full["keypoints"], atol=1e-5)
    np.testing.assert_allclose(back["keypoint_scores"], full["keypoint_scores"])
    data = records.to_example(empty, class_names=shapes.CLASSES)
    back = records.from_example(data)
    assert back["instance_masks"].shape == (0, S, S) and back["instance_labels"].shape == (0,)
    assert back["keypoints"].shape == (0, J, 3) and back["keypoint_scores"].shape == (0, J)
    # empty lists keep their kind, so tf.io VarLenFeature parsing treats every record alike
    ex = records._example_pb2().Example.FromString(data)
    kind = lambda k: ex.features.feature[k].WhichOneof("kind")
    assert kind("image/object/class/label") == "int64_list" and kind("image/object/score") == "float_list"
    assert kind("image/object/keypoint/x") == "float_list" and kind("image/object/keypoint/visibility") == "int64_list"
    assert kind("image/object/bbox/xmin") == "float_list" and kind("image/object/mask") == "bytes_list"
    with pytest.raises(ValueError, match="without instance_labels"):
        records.to_example({**full, "instance_labels": None})
    with pytest.raises(ValueError, match="object class ids"):
        records.to_example({**full, "instance_labels": np.array([0, 2])})
    with pytest.raises(ValueError, match=r"instance_masks must be \(N, 16, 16\)"):
        records.to_example({**full, "instance_masks": full["instance_masks"][:, :8]})


def test_coco_export_pairs_keypoints_with_person_masks(tmp_path):
    from pycocotools.coco import COCO

    full, empty = _generated_rows()
    pose_only = {k: v for k, v in full.items() if not k.startswith("instance_")}
    pose_only["index"] = 2
    off_grid = full["keypoints"].copy()                    # sub-pixel joints, as DARK decoding makes
    off_grid[..., :2] += np.float32(0.10517)
    pose_only["keypoints"] = off_grid
    coco = coco_format.to_coco([full, empty, pose_only])
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    api = COCO(str(path))
    anns = api.loadAnns(api.getAnnIds())
    assert len({a["id"] for a in anns}) == len(anns) == 3
    by_img = {i: [a for a in anns if a["image_id"] == i] for i in (0, 1, 2)}
    assert by_img[1] == []
    person = shapes.CLASS_TO_ID["person"]
    p0 = next(a for a in by_img[0] if a["category_id"] == person)
    sq = next(a for a in by_img[0] if a["category_id"] == shapes.CLASS_TO_ID["square"])
    assert len(p0["keypoints"]) == 3 * J and p0["num_keypoints"] == J - 1 and "keypoints" not in sq
    for a in (p0, sq):
        m = api.annToMask(a).astype(bool)
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert a["area"] == m.sum()
    (p2,) = by_img[2]                                      # keypoints alone: their own person annotation
    assert p2["category_id"] == person and p2["segmentation"] == [] and len(p2["keypoints"]) == 3 * J
    kp = np.asarray(p2["keypoints"]).reshape(J, 3)
    x, y, w, h = p2["bbox"]
    lab = kp[kp[:, 2] > 0]
    assert (lab[:, 0] >= x).all() and (lab[:, 0] <= x + w).all()
    assert (lab[:, 1] >= y).all() and (lab[:, 1] <= y + h).all()
    assert [x, y, x + w, y + h] == pytest.approx([*lab[:, :2].min(0), *lab[:, :2].max(0)])  # tight on the written joints
    vis = full["keypoint_scores"][0][full["keypoints"][0, :, 2] > 0]
    assert p2["score"] == pytest.approx(float(vis.mean()), rel=1e-5)
    assert [c["keypoints"] for c in coco["categories"] if c["id"] == person] == [list(shapes.KEYPOINT_NAMES)]


def test_preview_draws_instances_and_skeleton():
    full, _ = _generated_rows()
    no_kp = {k: v for k, v in full.items() if not k.startswith("keypoint")}
    with_kp, without = export.overlay(full), export.overlay(no_kp)
    assert (without[full["instance_masks"][1]] != 0).any()                 # the square is coloured in
    assert (with_kp != without).any(-1).sum() >= 10                       # joints and limbs
    a, b = shapes.SKELETON[0]
    kp = np.zeros((1, J, 3), np.float32)
    kp[0, a], kp[0, b] = (1.5, 1.5, 2), (13.5, 1.5, 2)                      # one limb across row 1
    limb = export.overlay({**no_kp, "keypoints": kp}) != without
    assert limb[1, 3:12].any(-1).all() and limb.any(-1).sum() <= 14
    assert export.preview_grid([full, full], scale=1).size == (2 * S, 2 * S)
