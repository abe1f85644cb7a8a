"""Generated folders read through tensorflow-datasets without TensorFlow (tfds metadata beside the
ArrayRecord shards), and through tf.data where TensorFlow is installed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from datasetdm_jax.data import records, records_tfds, shapes
from test_records import _rec


def _keyed(ex):  # comparable view of a reader's example
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in ex.items()}


def _empty(i):  # an image with no instance and no person: typed empty lists
    r = _rec(i)
    r.update(instance_masks=np.zeros((0, 32, 32), bool), instance_labels=np.zeros(0, np.int64),
             instance_scores=np.zeros(0, np.float32), keypoints=np.zeros((0, 17, 3), np.float32))
    return r


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tfds")
    recs = [{**_rec(i), "index": i, "attention_label": _rec(i)["segmentation"],
             "keypoint_scores": np.full((len(_rec(i)["keypoints"]), 17), 0.5)} for i in range(4)]
    recs.append({**_empty(4), "index": 4, "attention_label": _rec(4)["segmentation"],
                 "keypoint_scores": np.zeros((0, 17))})
    exs = [records.to_example(r, class_names=shapes.CLASSES) for r in recs]
    shards = [records.write_shard(str(out), records.shard_name(0, 2), exs[:3]),
              records.write_shard(str(out), records.shard_name(1, 2), exs[3:])]
    records.atomic_write(str(out / records.MANIFEST), json.dumps({"shards": shards}))
    return out, shards


def test_tfds_reads_generated_shards_like_grain(folder):
    import tensorflow_datasets as tfds

    out, _ = folder
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        records_tfds.tfds_source(str(out))
    records_tfds.write_metadata(str(out))
    names = sorted(os.listdir(out))
    assert "dataset_info.json" in names and "features.json" in names
    raw = tfds.builder_from_directory(str(out)).as_data_source("train")
    assert len(raw) == 5
    assert raw[1]["image"]["encoded"].shape == (32, 32, 3)                 # decoded by tfds itself
    assert raw[1]["image"]["segmentation"]["class"]["encoded"].shape == (32, 32, 1)   # Model Garden key
    grain_ds, tfds_ds = records.grain_source(str(out)), records_tfds.tfds_source(str(out))
    assert len(tfds_ds) == 5
    for i in range(5):
        g, t = grain_ds[i], tfds_ds[i]
        assert sorted(t) == sorted(g) and t["index"] == i
        assert _keyed(t) == _keyed(g), i
    assert tfds_ds[4]["instance_masks"].shape == (0, 32, 32) and tfds_ds[4]["keypoints"].shape == (0, 17, 3)
    assert tfds_ds[0]["depth"].dtype == np.float32 and tfds_ds[0]["depth"].max() > 0


def test_metadata_is_deterministic_and_cli_writes_it(folder):
    out, shards = folder
    records_tfds.write_metadata(str(out), shards)
    before = {n: (out / n).read_bytes() for n in ("dataset_info.json", "features.json")}
    for n in before:
        os.remove(out / n)
    p = subprocess.run([sys.executable, "-m", "datasetdm_jax.data.records_tfds", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert {n: (out / n).read_bytes() for n in before} == before           # same bytes: resumable runs stay equal
    assert str(out) not in before["dataset_info.json"].decode()             # no absolute path inside
    with pytest.raises(ValueError, match="no tfds feature for record keys \\['my/key'\\]"):
        records_tfds.features(["image/encoded", "my/key"])


def test_tf_data_reads_tfrecords_needs_tensorflow(folder):
    """TensorFlow's own reader (tensorflow-cpu is in requirements-ci.txt; skipped where it is not
    installed): tf.data parses the TFRecords with the TF Model Garden segmentation keys and the
    object-detection API's VarLenFeature lists."""
    tf = pytest.importorskip("tensorflow")
    out, shards = folder
    files = [str(out / s["files"]["tfrecord"]["file"]) for s in shards]
    spec = {  # as the Model Garden's segmentation decoder reads them
        "image/encoded": tf.io.FixedLenFeature([], tf.string), "image/format": tf.io.FixedLenFeature([], tf.string),
        "image/source_id": tf.io.FixedLenFeature([], tf.string), "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
        "image/segmentation/class/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/index": tf.io.FixedLenFeature([], tf.int64), "image/object/class/label": tf.io.VarLenFeature(tf.int64),
        "depth/encoded": tf.io.FixedLenFeature([], tf.string), "depth/scale": tf.io.FixedLenFeature([], tf.float32)}
    ds = tf.data.TFRecordDataset(files).map(lambda s: tf.io.parse_single_example(s, spec))
    got = list(ds.as_numpy_iterator())
    assert [int(e["image/index"]) for e in got] == [0, 1, 2, 3, 4]
    assert [e["image/source_id"] for e in got] == [b"0", b"1", b"2", b"3", b"4"]
    assert got[2]["image/format"] == b"png" and (got[2]["image/height"], got[2]["image/width"]) == (32, 32)
    image = tf.io.decode_image(got[2]["image/encoded"]).numpy()
    np.testing.assert_array_equal(image, _rec(2)["image"])
    seg = tf.io.decode_png(got[2]["image/segmentation/class/encoded"]).numpy()[..., 0]
    np.testing.assert_array_equal(seg, _rec(2)["segmentation"])
    depth = tf.io.decode_png(got[2]["depth/encoded"], dtype=tf.uint16).numpy()[..., 0] * got[2]["depth/scale"]
    np.testing.assert_allclose(depth, _rec(2)["depth"], atol=1e-3)
    labels = got[4]["image/object/class/label"]
    assert getattr(labels, "values", labels).size == 0   # a VarLenFeature: empty list, right kind


def test_readers_take_the_earlier_segmentation_keys(tmp_path):
    """Folders written before the Model Garden key names (``segmentation/class/encoded``) still read,
    through records.from_example and through tfds."""
    rec = _rec(1)
    keyed = records.parse_example(records.to_example(rec))
    old = {("segmentation/class/encoded" if k == records.SEGMENTATION_KEY else
            "segmentation/class/format" if k == "image/segmentation/class/format" else k): v
           for k, v in keyed.items() if k != "image/source_id"}
    data = records.serialize_example(old)
    np.testing.assert_array_equal(records.from_example(data)["segmentation"], rec["segmentation"])
    summary = records.write_shard(str(tmp_path), records.shard_name(0, 1), [data])
    records.atomic_write(str(tmp_path / records.MANIFEST), json.dumps({"shards": [summary]}))
    records_tfds.write_metadata(str(tmp_path))
    np.testing.assert_array_equal(records_tfds.tfds_source(str(tmp_path))[0]["segmentation"], rec["segmentation"])
