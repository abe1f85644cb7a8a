"""Generated datasets through tensorflow-datasets, without TensorFlow.

``write_metadata(DIR)`` writes ``dataset_info.json`` + ``features.json`` beside the ArrayRecord
shards of a ``datasetdm generate`` folder (generation does it at the end), after which
``tfds.builder_from_directory(DIR).as_data_source("train")`` reads the shards in place: no copy, no
renaming (the split keeps our ``data-NNNNN-of-NNNNN.array_record`` names through a file-name
template). tfds parses the stored ``tf.train.Example`` under the stored keys, so its FeaturesDict
names those keys (nested on ``/``: ``ex["image"]["encoded"]``,
``ex["image"]["segmentation"]["class"]["encoded"]``; folders written before the Model Garden key
names have ``ex["segmentation"]["class"]["encoded"]``, and both are described and read);
images and label PNGs come back decoded by tfds. The one exception is the 16-bit depth PNG, which
tfds decodes only with OpenCV (not a dependency here), so it is declared as bytes. ``from_tfds``
turns a tfds example into the dict ``records.grain_source`` gives (same keys, depth in metres), and
``tfds_source(DIR)`` is the tfds reader with that applied.

The shapes-world builder's FeaturesDict (``shapes_tfds``) cannot be reused: it describes tfds' own
encoding (ZLIB tensors, packed instance map), whereas generated shards hold the standard
object-detection keys that ``tf.data`` pipelines expect; both readers give the same output keys.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from datasetdm_jax import storage
from datasetdm_jax.data import records

__all__ = ["DATASET_NAME", "SPLIT", "FILE_TEMPLATE", "features", "write_metadata", "from_tfds", "tfds_source"]

DATASET_NAME = "datasetdm_generated"
SPLIT = "train"
FILE_TEMPLATE = "data-{SHARD_X_OF_Y}" + records.ARRAY_RECORD   # records.shard_name + suffix


def _connectors() -> dict[str, Any]:
    """Stored key (``records.to_example``) -> tfds feature connector."""
    import tensorflow_datasets as tfds

    F = tfds.features
    i64, f32 = F.Scalar(np.int64), F.Scalar(np.float32)
    vec = lambda dtype: F.Tensor(shape=(None,), dtype=dtype)
    gray = F.Image(shape=(None, None, 1))
    table = {
        "image/encoded": F.Image(shape=(None, None, 3)), "image/format": F.Text(),
        "image/height": i64, "image/width": i64, "image/prompt": F.Text(), "image/classes": F.Sequence(F.Text()),
        "image/source_id": F.Text(), "image/index": i64, "image/seed": i64, "image/quality": f32,
        "image/segmentation/class/encoded": gray, "image/segmentation/class/format": F.Text(),
        "image/segmentation/attention/encoded": gray,
        # the same labels in folders written before the Model Garden key names
        "segmentation/class/encoded": gray, "segmentation/class/format": F.Text(),
        "segmentation/attention/encoded": gray,
        "depth/encoded": F.Tensor(shape=(), dtype=np.object_), "depth/format": F.Text(), "depth/scale": f32,
        "image/object/mask": F.Sequence(gray), "image/object/class/label": vec(np.int64),
        "image/object/class/text": F.Sequence(F.Text()), "image/object/score": vec(np.float32),
        "image/object/keypoint/x": vec(np.float32), "image/object/keypoint/y": vec(np.float32),
        "image/object/keypoint/visibility": vec(np.int64), "image/object/keypoint/num": i64,
        "image/object/keypoint/score": vec(np.float32),
    }
    table.update({f"image/object/bbox/{k}": vec(np.float32) for k in ("xmin", "ymin", "xmax", "ymax")})
    return table


def features(keys: Sequence[str]):
    """The ``tfds.features.FeaturesDict`` that parses examples holding exactly ``keys``."""
    import tensorflow_datasets as tfds

    table = _connectors()
    unknown = sorted(set(keys) - set(table))
    if unknown:
        raise ValueError(f"no tfds feature for record keys {unknown}; add them to records_tfds._connectors")
    nested: dict[str, Any] = {}
    for key in sorted(keys):
        *parents, leaf = key.split("/")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = table[key]
    return tfds.features.FeaturesDict(nested)


def write_metadata(folder: str, shards: Sequence[Mapping[str, Any]] | None = None) -> None:
    """Write tfds' ``dataset_info.json`` and ``features.json`` for a generated folder (one split,
    ``train``). ``shards``: the shard summaries (default: the manifest's). The keys come from the
    first record (a folder's records all share them: one labeller, empty lists kept typed)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import naming

    shards = list(shards if shards is not None else records.read_manifest(folder)["shards"])
    if not shards or "array_record" not in shards[0]["files"]:
        raise ValueError(f"{folder}: no ArrayRecord shards to describe for tfds")
    fmt = "tfrecord" if "tfrecord" in shards[0]["files"] else "array_record"
    first = storage.join(folder, shards[0]["files"][fmt]["file"])  # a local folder or gs:// (tfds: etils.epath)
    keys = list(records.parse_example(next(iter(records.shard_records(first)))))
    template = naming.ShardedFileTemplate(data_dir=folder, template=FILE_TEMPLATE, dataset_name=DATASET_NAME,
                                          split=SPLIT, filetype_suffix="array_record")
    split = tfds.core.SplitInfo(name=SPLIT, shard_lengths=[int(s["num_records"]) for s in shards],
                                num_bytes=0, filename_template=template)
    tfds.folder_dataset.write_metadata(
        data_dir=folder, features=features(keys), split_infos=[split], filename_template=template,
        check_data=False,  # tfds' check reads through tf.data (TensorFlow); tests read via as_data_source
        description="Annotated images written by `datasetdm generate` (see manifest.json).")


def _gray(a: np.ndarray) -> np.ndarray:
    return np.asarray(a)[..., 0]


def from_tfds(ex: Mapping[str, Any]) -> dict[str, Any]:
    """A tfds-decoded example -> the numpy dict of ``records.from_example`` / ``grain_source``."""
    im = ex["image"]
    image = np.asarray(im["encoded"])
    h, w = image.shape[:2]
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
    out: dict[str, Any] = {"image": image, "prompt": text(im["prompt"]), "classes": [text(c) for c in im["classes"]],
                           "index": int(im["index"]), "seed": int(im["seed"])}
    seg = im.get("segmentation") or ex.get("segmentation", {})   # Model Garden key names, or the earlier ones
    if "class" in seg:
        out["segmentation"] = _gray(seg["class"]["encoded"])
    if "attention" in seg:
        out["attention_label"] = _gray(seg["attention"]["encoded"])
    if "depth" in ex:  # 16-bit PNG: tfds needs OpenCV for it, so it arrives as bytes
        out["depth"] = records.decode_image(ex["depth"]["encoded"]).astype(np.float32) * np.float32(ex["depth"]["scale"])
    obj = im.get("object", {})
    if "mask" in obj:
        masks = [_gray(m).astype(bool) for m in obj["mask"]]
        out["instance_masks"] = np.stack(masks) if masks else np.zeros((0, h, w), bool)
        out["instance_labels"] = np.asarray(obj["class"]["label"], np.int64)
        out["instance_scores"] = np.asarray(obj["score"], np.float32)
    if "keypoint" in obj:
        kp, n = obj["keypoint"], int(obj["keypoint"]["num"])
        xyv = np.stack([np.asarray(kp["x"], np.float32) * w, np.asarray(kp["y"], np.float32) * h,
                        np.asarray(kp["visibility"], np.float32)], -1)
        out["keypoints"] = xyv.reshape(-1, n, 3)
        if "score" in kp:
            out["keypoint_scores"] = np.asarray(kp["score"], np.float32).reshape(-1, n)
    if "quality" in im:
        out["quality"] = float(im["quality"])
    return out


class _FromTfds:
    """Picklable grain map around ``from_tfds``."""

    def __call__(self, ex: Mapping[str, Any]) -> dict[str, Any]:
        return from_tfds(ex)


def tfds_source(folder: str):
    """``tfds.builder_from_directory(folder).as_data_source("train")`` as a ``grain.MapDataset`` of
    the dicts ``records.grain_source`` gives (random access, decoded by tfds)."""
    import grain
    import tensorflow_datasets as tfds

    if not storage.exists(storage.join(folder, "dataset_info.json")):
        raise FileNotFoundError(f"no dataset_info.json in {folder}: run "
                                f"`python -c \"from datasetdm_jax.data import records_tfds; "
                                f"records_tfds.write_metadata('{folder}')\"` first")
    source = tfds.builder_from_directory(folder).as_data_source(SPLIT)
    return grain.MapDataset.source(source).map(_FromTfds())


if __name__ == "__main__":  # python -m datasetdm_jax.data.records_tfds DIR: metadata for an existing folder
    import sys

    for path in sys.argv[1:] or sys.exit("usage: python -m datasetdm_jax.data.records_tfds DIR [DIR ...]"):
        write_metadata(path)
        print(f"tfds metadata written: {os.path.join(path, 'dataset_info.json')}, features.json")
