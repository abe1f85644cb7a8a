"""Records: tf.train.Example round trip, TFRecord framing (CRC32C), atomic shards, grain reader."""

import json
import os

import numpy as np
import pytest

from datasetdm_jax.data import records, shapes


def _rec(i=3):
    scene = shapes.render_scene(i, shapes.ShapesConfig(image_size=32))
    return {"image": scene["image"], "prompt": scene["caption"] + " \u00e9", "classes": ["person"], "index": i,
            "seed": 7, "segmentation": scene["segmentation"], "depth": scene["depth"],
            "instance_masks": scene["instances"], "instance_labels": scene["instance_classes"],
            "instance_scores": np.linspace(0.5, 0.9, len(scene["instances"])), "keypoints": scene["keypoints"],
            "quality": 0.75}


def test_example_round_trip_keeps_every_label():
    rec = _rec()
    data = records.to_example(rec, class_names=shapes.CLASSES)
    assert data == records.to_example(rec, class_names=shapes.CLASSES)            # deterministic bytes
    back = records.from_example(data)
    np.testing.assert_array_equal(back["image"], rec["image"])
    np.testing.assert_array_equal(back["segmentation"], rec["segmentation"])
    np.testing.assert_allclose(back["depth"], rec["depth"], atol=records.DEPTH_SCALE / 2 + 1e-6)
    np.testing.assert_array_equal(back["instance_masks"], rec["instance_masks"])
    np.testing.assert_array_equal(back["instance_labels"], rec["instance_labels"])
    np.testing.assert_allclose(back["instance_scores"], rec["instance_scores"], rtol=1e-6)
    np.testing.assert_allclose(back["keypoints"], rec["keypoints"], atol=1e-4)
    assert (back["prompt"], back["classes"], back["index"], back["seed"]) == (rec["prompt"], ["person"], 3, 7)
    assert back["quality"] == pytest.approx(0.75)
    raw = records.parse_example(data)
    assert raw["image/format"] == [b"png"] and raw["image/height"] == [32]
    assert records.decode_image(raw["depth/encoded"][0]).dtype == np.uint16        # 16-bit depth
    n = len(rec["instance_masks"])
    assert len(raw["image/object/bbox/xmin"]) == n and len(raw["image/object/class/text"]) == n
    assert all(0 <= x <= 1 for x in raw["image/object/bbox/xmax"])


def test_jpeg_images_and_bad_format():
    rec = _rec()
    back = records.from_example(records.to_example(rec, image_format="jpeg"))
    assert back["image"].shape == rec["image"].shape
    assert np.abs(back["image"].astype(int) - rec["image"]).mean() < 12
    with pytest.raises(ValueError, match="image_format"):
        records.to_example(rec, image_format="gif")


def test_tfrecord_framing_uses_masked_crc32c(tmp_path):
    import google_crc32c
    assert google_crc32c.value(b"123456789") == 0xE3069283       # the CRC-32C check value
    frame = records.tfrecord_frame(b"hello")
    assert frame[:8] == (5).to_bytes(8, "little") and frame[12:17] == b"hello" and len(frame) == 21
    path = tmp_path / "x.tfrecord"
    path.write_bytes(frame + records.tfrecord_frame(b""))
    assert list(records.read_tfrecord(str(path))) == [b"hello", b""]
    path.write_bytes(frame[:-1])
    with pytest.raises(ValueError, match="truncated"):
        list(records.read_tfrecord(str(path)))
    path.write_bytes(frame[:12] + b"jello" + frame[17:])
    with pytest.raises(ValueError, match="corrupt"):
        list(records.read_tfrecord(str(path)))


def test_shards_manifest_and_readers(tmp_path):
    exs = [records.to_example({**_rec(i), "index": i}) for i in range(5)]
    s0 = records.write_shard(str(tmp_path), records.shard_name(0, 2), exs[:3])
    s1 = records.write_shard(str(tmp_path), records.shard_name(1, 2), exs[3:])
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"data-0000{k}-of-00002{ext}" for k in (0, 1) for ext in (".tfrecord", ".array_record", ".json"))
    assert s0["files"]["tfrecord"]["sha256"] == records.sha256_file(str(tmp_path / "data-00000-of-00002.tfrecord"))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        records.read_manifest(str(tmp_path))
    records.atomic_write(str(tmp_path / records.MANIFEST), json.dumps({"shards": [s0, s1]}))
    assert [r["index"] for r in records.read_tfrecords(str(tmp_path))] == [0, 1, 2, 3, 4]
    ds = records.grain_source(str(tmp_path))
    assert len(ds) == 5 and ds[4]["index"] == 4
    np.testing.assert_array_equal(ds[2]["segmentation"], _rec(2)["segmentation"])
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
