"""Generated datasets on disk: sharded TFRecord (``tf.train.Example``) + ArrayRecord, no TensorFlow.

Every example is one serialized ``tf.train.Example`` (the proto copy that tensorflow-datasets ships,
wire-identical to TensorFlow's, serialized deterministically so reruns give the same bytes) with
the keys of the TF Model Garden's segmentation decoder and the TF object-detection API:

=========================================  ================================================
``image/encoded``, ``image/format``        PNG (default) or JPEG bytes, ``b"png"`` / ``b"jpeg"``
``image/height``, ``image/width``          int64
``image/source_id``                        the global example index as a decimal string
``image/prompt``, ``image/classes``        the prompt (UTF-8) and the class names it names
``image/index``, ``image/seed``            global example index and sampler seed (noise = fold_in(seed, index))
``image/segmentation/class/encoded``       8-bit PNG of class ids (+ ``.../format``, ``b"png"``)
``image/segmentation/attention/encoded``   optional second label map (e.g. the attention labeller's beside a P-Decoder's)
``depth/encoded``, ``depth/scale``         16-bit PNG; metres = value * scale
``image/object/mask``                      one 0/1 PNG per instance, image size (N entries)
``image/object/class/label``, ``.../text``  int64 class ids (0 = background, never an instance), names
``image/object/score``                     float confidence per instance
``image/object/bbox/{xmin,ymin,xmax,ymax}`` the mask's box, normalised to [0, 1]
``image/object/keypoint/{x,y,visibility}`` P persons x ``num`` joints, flat, person-major; x, y
                                           normalised; COCO visibility 0 (x = y = 0), 1, 2
``image/object/keypoint/num``              joints per person (17, COCO order)
``image/object/keypoint/score``            optional, float peak score per joint (generated pose)
``image/quality``                          float annotation confidence (see ``generate``)
=========================================  ================================================

Instances and persons are separate lists: a pose dataset has keypoints and no masks, and where
both exist ``coco_format.to_coco`` pairs each person with the person mask holding most of its joints.
An image with no instance or no person keeps the keys with empty lists of the right kind (int64,
float), so ``tf.io.parse_example`` with ``VarLenFeature`` reads every record alike. Generated
labels come from ``decoders/postprocess.py`` (score threshold, instance cap, joint threshold).

Folders written before the segmentation keys took the Model Garden names hold them as
``segmentation/class/encoded`` and ``segmentation/attention/encoded``; the readers here take both.

Files go through ``datasetdm_jax.storage`` (a local folder or ``gs://BUCKET/PREFIX``). A shard is
written to a temporary name, fsynced and renamed (into a local staging folder for a bucket, then
published with one upload per file), and its summary ``NAME.json`` written last, so a killed run
leaves either a complete shard or none; TFRecord framing uses masked CRC32C (``google-crc32c``) as ``tf.data``
expects. Shards are written as TFRecord, ArrayRecord or both (``FORMATS``). ``grain_source``
(ArrayRecord), ``read_tfrecords`` (TFRecord) and ``read_examples`` (whichever the folder has) read a
dataset back as numpy dicts.

Longer than 400 lines: one on-disk format, its writer and its readers, kept side by side.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from datasetdm_jax import storage
from datasetdm_jax.errors import UserError

__all__ = ["encode_png", "encode_jpeg", "decode_image", "to_example", "from_example", "serialize_example",
           "parse_example", "tfrecord_frame", "read_tfrecord", "write_shard", "atomic_write", "sha256_file",
           "shard_name", "read_manifest", "grain_source", "local_shards", "read_tfrecords", "read_examples", "read_array_record", "shard_records", "check_formats",
           "MANIFEST", "DEPTH_SCALE", "FORMATS", "SEGMENTATION_KEY", "ATTENTION_KEY"]

MANIFEST = "manifest.json"
DEPTH_SCALE = 1e-3   # metres per 16-bit depth unit: 0..65.5 m in millimetres
TFRECORD, ARRAY_RECORD = ".tfrecord", ".array_record"
FORMATS = {"tfrecord": TFRECORD, "array_record": ARRAY_RECORD}   # shard format -> file suffix
SEGMENTATION_KEY = "image/segmentation/class/encoded"            # TF Model Garden's name
ATTENTION_KEY = "image/segmentation/attention/encoded"
_OLD_KEYS = {SEGMENTATION_KEY: "segmentation/class/encoded", ATTENTION_KEY: "segmentation/attention/encoded"}


# -- image codecs ------------------------------------------------------------------------------

def encode_png(array: np.ndarray) -> bytes:
    """uint8 (H,W), (H,W,3) or uint16 (H,W) -> PNG bytes (deterministic)."""
    a = np.ascontiguousarray(array)
    img = Image.fromarray(a.astype("<u2") if a.dtype == np.uint16 else a)  # uint16 -> mode I;16
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> numpy (uint16 for 16-bit PNGs)."""
    img = Image.open(io.BytesIO(data))
    if img.mode in ("I;16", "I;16B", "I"):
        return np.asarray(img).astype(np.uint16)
    return np.asarray(img)


# -- tf.train.Example --------------------------------------------------------------------------

def _example_pb2():
    from tensorflow_datasets.proto import tf_example_generated_pb2
    return tf_example_generated_pb2


def serialize_example(features: Mapping[str, Any]) -> bytes:
    """{key: bytes | str | int | float | list of one kind} -> serialized tf.train.Example.

    Map entries are written in sorted key order (``deterministic=True``), so equal inputs give
    equal bytes.
    """
    ex = _example_pb2().Example()
    for key, value in features.items():
        values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
        feat = ex.features.feature[key]
        if not values:  # an empty numpy array keeps its kind (float / int64), anything else is bytes
            kind = np.asarray(value).dtype.kind if isinstance(value, np.ndarray) else "S"
            {"f": feat.float_list, "i": feat.int64_list, "u": feat.int64_list, "b": feat.int64_list}.get(
                kind, feat.bytes_list).SetInParent()
        elif isinstance(values[0], (bytes, str)):
            feat.bytes_list.value.extend(v.encode("utf-8") if isinstance(v, str) else v for v in values)
        elif isinstance(values[0], (float, np.floating)):
            feat.float_list.value.extend(float(v) for v in values)
        elif isinstance(values[0], (int, bool, np.integer, np.bool_)):
            feat.int64_list.value.extend(int(v) for v in values)
        else:
            raise TypeError(f"feature {key!r}: unsupported value type {type(values[0]).__name__}")
    return ex.SerializeToString(deterministic=True)


def parse_example(data: bytes) -> dict[str, list]:
    """Serialized tf.train.Example -> {key: list of bytes / float / int}."""
    ex = _example_pb2().Example.FromString(data)
    out = {}
    for key, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        out[key] = list(getattr(feat, kind).value) if kind else []
    return out


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0.0, 0.0, 0.0, 0.0
    return xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h


def to_example(rec: Mapping[str, Any], image_format: str = "png", class_names: Sequence[str] | None = None) -> bytes:
    """One generated example (numpy arrays) -> serialized tf.train.Example with the standard keys.

    ``rec``: ``image`` uint8 (H,W,3), ``prompt``, ``index``, ``seed``; optional ``classes``,
    ``segmentation`` (H,W) ints, ``depth`` (H,W) metres, ``instance_masks`` (N,H,W) bool with
    ``instance_labels`` (N,) and ``instance_scores`` (N,), ``keypoints`` (P,17,3) x, y, visibility
    in pixels with optional ``keypoint_scores`` (P,17), ``quality`` float.
    """
    image = np.asarray(rec["image"])
    h, w = image.shape[:2]
    fmt = image_format.lower()
    if fmt not in ("png", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    f: dict[str, Any] = {
        "image/encoded": encode_png(image) if fmt == "png" else encode_jpeg(image),
        "image/format": fmt, "image/height": h, "image/width": w,
        "image/source_id": str(int(rec.get("index", 0))),
        "image/prompt": str(rec.get("prompt", "")), "image/classes": list(rec.get("classes", ())),
        "image/index": int(rec.get("index", 0)), "image/seed": int(rec.get("seed", 0)),
    }
    if rec.get("segmentation") is not None:
        seg = np.asarray(rec["segmentation"])
        if seg.min(initial=0) < 0 or seg.max(initial=0) > 255:
            raise ValueError("segmentation class ids must be in [0, 255]")
        f[SEGMENTATION_KEY] = encode_png(seg.astype(np.uint8))
        f["image/segmentation/class/format"] = "png"
    if rec.get("attention_label") is not None:  # labels of the same image by a second labeller (255 = ignore)
        f[ATTENTION_KEY] = encode_png(np.asarray(rec["attention_label"]).astype(np.uint8))
    if rec.get("depth") is not None:
        scale = float(rec.get("depth_scale", DEPTH_SCALE))
        d = np.clip(np.round(np.asarray(rec["depth"], np.float64) / scale), 0, 65535).astype(np.uint16)
        f["depth/encoded"] = encode_png(d)
        f["depth/format"] = "png"
        f["depth/scale"] = scale
    masks = rec.get("instance_masks")
    if masks is not None:
        masks = np.asarray(masks, bool)
        if rec.get("instance_labels") is None:
            raise ValueError("instance_masks given without instance_labels (one class id per mask)")
        labels = np.asarray(rec["instance_labels"], np.int64).reshape(-1)
        if masks.ndim != 3 or masks.shape[1:] != (h, w) or len(labels) != len(masks):
            raise ValueError(f"instance_masks must be (N, {h}, {w}) with N labels, got {masks.shape} and "
                             f"{len(labels)} labels")
        if len(labels) and (labels.min() < 1 or (class_names is not None and labels.max() >= len(class_names))):
            raise ValueError(f"instance_labels must be object class ids (>= 1, < {len(class_names or ()) or 'inf'}), "
                             f"got {labels.tolist()}")
        boxes = np.asarray([_bbox(m) for m in masks], np.float32).reshape(-1, 4)
        f["image/object/mask"] = [encode_png(m.astype(np.uint8)) for m in masks]
        f["image/object/class/label"] = labels
        if class_names is not None:
            f["image/object/class/text"] = [class_names[int(k)] for k in labels]
        f["image/object/score"] = np.asarray(rec.get("instance_scores", np.ones(len(masks))), np.float32)
        for j, name in enumerate(("xmin", "ymin", "xmax", "ymax")):
            f[f"image/object/bbox/{name}"] = boxes[:, j]
    if rec.get("keypoints") is not None:
        kp3 = np.asarray(rec["keypoints"], np.float32)
        kp = kp3.reshape(-1, 3)
        f["image/object/keypoint/x"] = kp[:, 0] / w
        f["image/object/keypoint/y"] = kp[:, 1] / h
        f["image/object/keypoint/visibility"] = kp[:, 2].astype(np.int64)
        f["image/object/keypoint/num"] = int(kp3.shape[-2]) if kp3.ndim == 3 else 17
        if rec.get("keypoint_scores") is not None:
            f["image/object/keypoint/score"] = np.asarray(rec["keypoint_scores"], np.float32).reshape(-1)
    if rec.get("quality") is not None:
        f["image/quality"] = float(rec["quality"])
    return serialize_example(f)


def from_example(data: bytes) -> dict[str, Any]:
    """Serialized example -> numpy dict (``image``, ``prompt``, ``segmentation``, ``depth`` in metres,
    ``instance_masks`` (N,H,W) bool / ``instance_labels`` / ``instance_scores``, ``keypoints``
    (P,17,3) in pixels, ``keypoint_scores`` (P,17) when stored, ...)."""
    f = parse_example(data)
    for new, old in _OLD_KEYS.items():  # folders written before the Model Garden names
        if old in f and new not in f:
            f[new] = f.pop(old)
    image = decode_image(f["image/encoded"][0])
    h, w = image.shape[:2]
    out: dict[str, Any] = {"image": image, "prompt": f["image/prompt"][0].decode("utf-8"),
                           "classes": [c.decode("utf-8") for c in f.get("image/classes", [])],
                           "index": int(f["image/index"][0]), "seed": int(f["image/seed"][0])}
    if SEGMENTATION_KEY in f:
        out["segmentation"] = decode_image(f[SEGMENTATION_KEY][0])
    if ATTENTION_KEY in f:
        out["attention_label"] = decode_image(f[ATTENTION_KEY][0])
    if "depth/encoded" in f:
        out["depth"] = decode_image(f["depth/encoded"][0]).astype(np.float32) * np.float32(f["depth/scale"][0])
    if "image/object/mask" in f:
        masks = [decode_image(m).astype(bool) for m in f["image/object/mask"]]
        out["instance_masks"] = np.stack(masks) if masks else np.zeros((0, h, w), bool)
        out["instance_labels"] = np.asarray(f["image/object/class/label"], np.int64)
        out["instance_scores"] = np.asarray(f["image/object/score"], np.float32)
    if "image/object/keypoint/x" in f:
        n = int(f["image/object/keypoint/num"][0])
        kp = np.stack([np.asarray(f["image/object/keypoint/x"], np.float32) * w,
                       np.asarray(f["image/object/keypoint/y"], np.float32) * h,
                       np.asarray(f["image/object/keypoint/visibility"], np.float32)], -1)
        out["keypoints"] = kp.reshape(-1, n, 3)
        if "image/object/keypoint/score" in f:
            out["keypoint_scores"] = np.asarray(f["image/object/keypoint/score"], np.float32).reshape(-1, n)
    if "image/quality" in f:
        out["quality"] = float(f["image/quality"][0])
    return out


# -- TFRecord framing --------------------------------------------------------------------------

def _masked_crc(data: bytes) -> int:
    import google_crc32c
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked CRC32C of the length, data, masked CRC32C of the data."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def read_tfrecord(path: str) -> Iterator[bytes]:
    """Records of a TFRecord file (local or gs://), CRC-checked; a truncated or corrupt file is a
    one-line error."""
    with storage.open_file(path, "rb") as f:
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise _damaged(path, "truncated TFRecord header")
            (n,), (hcrc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if _masked_crc(header[:8]) != hcrc:
                raise _damaged(path, "corrupt TFRecord length CRC")
            body = f.read(n + 4)
            if len(body) < n + 4:
                raise _damaged(path, "truncated TFRecord")
            if _masked_crc(body[:n]) != struct.unpack("<I", body[n:])[0]:
                raise _damaged(path, "corrupt TFRecord data CRC")
            yield body[:n]


def _damaged(path: str, what: str) -> UserError:
    """A damaged shard file: one line naming it, and how to make it again."""
    stem = re.sub(r"\.(tfrecord|array_record)$", "", storage.basename(path))
    return UserError(f"{path}: {what}; the file is damaged: delete it and {stem}.json, then rerun the "
                     "`datasetdm generate` command that made the dataset to write that shard again")


# -- atomic shard and manifest writes ----------------------------------------------------------

def _tmp(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def atomic_write(path: str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` whole (``storage.write_bytes``: temp file + fsync + rename, or one
    upload to a bucket); readers never see a partial file."""
    storage.write_bytes(path, data)


def sha256_file(path: str) -> str:
    return storage.sha256(path)


def shard_name(shard: int, num_shards: int) -> str:
    return f"data-{shard:05d}-of-{num_shards:05d}"


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """Shard formats, validated: a non-empty selection of ``FORMATS`` (one-line error), in given order."""
    fmts = tuple(dict.fromkeys(str(f) for f in ((formats,) if isinstance(formats, str) else formats)))
    bad = [f for f in fmts if f not in FORMATS]
    if not fmts or bad:
        raise ValueError(f"generate.formats must name one or more of {sorted(FORMATS)}, got {list(fmts)}")
    return fmts


def write_shard(folder: str, name: str, examples: Sequence[bytes], formats: Sequence[str] = ("tfrecord", "array_record"),
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write one shard in each format atomically, then a ``NAME.json`` summary (the completion mark).

    ``folder`` local: each file is written to a temp name, fsynced and renamed. ``folder`` in a bucket:
    each file is finished in a local staging folder, then published with one upload; the summary is
    uploaded last, so a shard whose ``NAME.json`` exists is complete.
    Returns the summary: name, number of records, per file its name and sha256, and ``extra``.
    """
    files = {}
    with storage.staging_dir(folder) as stage:
        for fmt in check_formats(formats):
            local = os.path.join(stage, name + FORMATS[fmt])
            tmp = _tmp(local)
            if fmt == "tfrecord":
                with open(tmp, "wb") as f:
                    for ex in examples:
                        f.write(tfrecord_frame(ex))
                    f.flush()
                    os.fsync(f.fileno())
            else:
                from array_record.python.array_record_module import ArrayRecordWriter
                w = ArrayRecordWriter(tmp, "group_size:1")
                for ex in examples:
                    w.write(ex)
                w.close()
                storage.fsync(tmp)
            os.replace(tmp, local)
            files[fmt] = {"file": os.path.basename(local), "sha256": sha256_file(local)}
            if storage.is_remote(folder):
                storage.upload(local, storage.join(folder, name + FORMATS[fmt]))
    summary = {"name": name, "num_records": len(examples), "files": files, **dict(extra or {})}
    atomic_write(storage.join(folder, name + ".json"), json.dumps(summary, indent=1, sort_keys=True))
    return summary


def read_manifest(folder: str) -> dict[str, Any]:
    path = storage.join(folder, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(path))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FileNotFoundError(f"no {MANIFEST} in {folder}: not a finished generated dataset "
                                "(rerun the `datasetdm generate` command that made it to finish it)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}): delete it and rerun the `datasetdm generate` command that "
                        "made the dataset (it rewrites the manifest from the finished shards)") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise UserError(f"{path} has no list of shards: not a manifest of `datasetdm generate`")
    return manifest


def _shard_paths(folder: str, fmt: str) -> list[str]:
    manifest = read_manifest(folder)
    shards = manifest["shards"]
    if any(fmt not in s["files"] for s in shards):
        have = sorted({f for s in shards for f in s["files"]})
        raise ValueError(f"{folder}: no {fmt} shards (generate.formats of this folder: {have})")
    return [storage.join(folder, s["files"][fmt]["file"]) for s in shards]


def read_tfrecords(folder: str) -> Iterator[dict[str, Any]]:
    """Every example of a finished dataset in index order, decoded to numpy (no TensorFlow)."""
    for path in _shard_paths(folder, "tfrecord"):
        for data in read_tfrecord(path):
            yield from_example(data)


def read_array_record(path: str) -> Iterator[bytes]:
    """Records of one ArrayRecord file, in order, read a block at a time (constant memory; a gs://
    file is first downloaded to a temporary file: the reader opens local files only)."""
    from array_record.python.array_record_module import ArrayRecordReader

    with storage.local_copy(path) as local:
        try:
            reader = ArrayRecordReader(local)
        except (RuntimeError, ValueError) as e:  # the C++ reader's errors (bad header, not a Riegeli file)
            raise _damaged(path, f"unreadable ArrayRecord ({' '.join(str(e).split())[:200]})") from None
        try:
            n, step = reader.num_records(), 64
            for lo in range(0, n, step):
                try:
                    block = reader.read(list(range(lo, min(lo + step, n))))
                except (RuntimeError, ValueError) as e:  # e.g. "chunk data hash mismatch"
                    raise _damaged(path, f"corrupt ArrayRecord ({' '.join(str(e).split())[:200]})") from None
                yield from block
        finally:
            reader.close()


def shard_records(path: str) -> Iterator[bytes]:
    """Serialized examples of one shard file, TFRecord or ArrayRecord (by its suffix)."""
    return read_array_record(path) if path.endswith(ARRAY_RECORD) else read_tfrecord(path)


def read_examples(folder: str) -> Iterator[dict[str, Any]]:
    """Every example of a finished dataset in index order, decoded to numpy, one at a time, from its
    TFRecord shards or, in a folder written with ``generate.formats=("array_record",)``, its ArrayRecord
    shards."""
    shards = read_manifest(folder)["shards"]
    fmt = "tfrecord" if all("tfrecord" in s["files"] for s in shards) else "array_record"
    for path in _shard_paths(folder, fmt):
        for data in shard_records(path):
            yield from_example(data)


class _Decode:
    """Picklable grain map: serialized example -> numpy dict."""

    def __call__(self, data: bytes) -> dict[str, Any]:
        return from_example(data)


def local_shards(folder: str, fmt: str = "array_record", cache: str | None = None) -> list[str]:
    """Local paths of a finished dataset's ``fmt`` shards: the files themselves for a local folder;
    for a gs:// one, copies in ``cache`` (default ``$DATASETDM_DATA_CACHE`` or
    ``~/.cache/datasetdm_jax/data``, under BUCKET/PREFIX), downloaded once and checked against the
    manifest's sha256."""
    paths = _shard_paths(folder, fmt)
    if not storage.is_remote(folder):
        return paths
    cache = cache or os.environ.get("DATASETDM_DATA_CACHE", os.path.expanduser("~/.cache/datasetdm_jax/data"))
    local_dir = os.path.join(cache, storage.scheme(folder), folder.split("://", 1)[1].strip("/"))
    os.makedirs(local_dir, exist_ok=True)
    want = {s["files"][fmt]["file"]: s["files"][fmt]["sha256"] for s in read_manifest(folder)["shards"]}
    out = []
    for p in paths:
        local = os.path.join(local_dir, storage.basename(p))
        if not os.path.isfile(local) or sha256_file(local) != want[os.path.basename(local)]:
            storage.download(p, local + ".part")
            os.replace(local + ".part", local)
            if sha256_file(local) != want[os.path.basename(local)]:
                raise ValueError(f"{p}: sha256 differs from the manifest's")
        out.append(local)
    return out


def grain_source(folder: str):
    """A ``grain.MapDataset`` over the ArrayRecord shards (random access), decoded to numpy dicts.

    e.g. ``grain_source(out).shuffle(seed=0).batch(8)``; ragged keys (instances) need a custom batch fn.
    A gs:// folder's shards are read from a local copy (``local_shards``): the reader opens local files.
    """
    import grain

    src = grain.sources.ArrayRecordDataSource(local_shards(folder, "array_record"))
    return grain.MapDataset.source(src).map(_Decode())
