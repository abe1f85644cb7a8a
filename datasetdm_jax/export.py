"""Generated datasets to the formats downstream toolkits take, and a preview grid.

``datasetdm export --data DIR --out OUT``: a plain folder (``images/*.jpg``, ``segmentation/*.png``
class ids, ``depth/*.png`` 16-bit millimetres, ``prompts.jsonl``) and ``annotations.json`` in COCO
format (instances with RLE masks, boxes, scores and person keypoints; a semantic-only dataset gets
one annotation per class region, as COCO-stuff does; a pose-only dataset one keypoint annotation
per person). Categories are the dataset's own classes (the manifest's ``class_names``), with their
label values as ids. The export streams: memory stays constant in the number of images.
``OUT/INCOMPLETE`` exists while an export runs (and after one that failed or was stopped);
``OUT/export.json``, written last, records which dataset (its manifest's sha256) the folder is an
export of. A non-empty ``--out`` is refused unless it is an export of the same data, which is then
replaced whole (never mixed with the new files). Not a temporary folder swapped in at the end: a
bucket has no rename, and a swap would need twice the disk space of a large export.
``--data`` and ``--out`` are local folders or ``gs://BUCKET/PREFIX`` (``datasetdm_jax.storage``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from datasetdm_jax import errors, storage
from datasetdm_jax.coco_format import CocoWriter
from datasetdm_jax.data import records, shapes
from datasetdm_jax.errors import UserError

__all__ = ["colorize_depth", "overlay", "preview_grid", "write_preview", "dataset_class_names",
           "export_folder", "main_export", "EXPORT_FILE", "INCOMPLETE_FILE"]

# A perceptually ordered colour ramp (dark purple -> blue -> green -> yellow) for depth maps.
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32)


def colorize_depth(depth: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """(H,W) depth -> (H,W,3) uint8; near is yellow, far is purple."""
    d = np.asarray(depth, np.float32)
    lo = float(d.min()) if lo is None else lo
    hi = float(d.max()) if hi is None else hi
    t = 1.0 - np.clip((d - lo) / max(hi - lo, 1e-6), 0, 1)
    pos = t * (len(_RAMP) - 1)
    i = np.minimum(pos.astype(int), len(_RAMP) - 2)
    f = (pos - i)[..., None]
    return np.round(_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).astype(np.uint8)


def _palette(n: int = 256) -> np.ndarray:
    lut = np.random.default_rng(1).integers(40, 256, size=(n, 3)).astype(np.float32)
    lut[0] = 0
    return lut


def overlay(ex: dict[str, Any]) -> np.ndarray:
    """Image with its masks (semantic or instance) blended in colour and keypoints drawn."""
    img = ex["image"].astype(np.float32)
    lut = _palette()
    if "instance_masks" in ex and len(ex["instance_masks"]):
        ids = np.zeros(img.shape[:2], np.int64)
        for k, m in enumerate(ex["instance_masks"]):
            ids[m] = k + 1
    elif "segmentation" in ex:
        ids = np.asarray(ex["segmentation"], np.int64)
    else:
        ids = np.zeros(img.shape[:2], np.int64)
    ids = np.where(ids == 255, 0, ids) % 256
    out = np.where(ids[..., None] > 0, 0.4 * img + 0.6 * lut[ids], 0.6 * img)
    pil = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    if "keypoints" in ex:
        draw = ImageDraw.Draw(pil)
        for kp in np.asarray(ex["keypoints"], np.float32).reshape(-1, len(shapes.KEYPOINT_NAMES), 3):
            for a, b in shapes.SKELETON:  # limbs between labelled joints, then the joints on top
                if kp[a, 2] > 0 and kp[b, 2] > 0:
                    draw.line([(kp[a, 0] - 0.5, kp[a, 1] - 0.5), (kp[b, 0] - 0.5, kp[b, 1] - 0.5)], fill=(0, 255, 255))
            for x, y, v in kp:
                if v > 0:
                    draw.point((x - 0.5, y - 0.5), fill=(255, 255, 255) if v == 2 else (255, 0, 0))
    return np.asarray(pil)


def preview_grid(examples: Sequence[dict[str, Any]], cols: int = 8, scale: int = 3) -> Image.Image:
    """Per example a column: the image, its mask overlay, and its depth colour map when present."""
    if not examples:
        raise ValueError("preview: no examples")
    h, w = examples[0]["image"].shape[:2]
    rows_per = 2 + int(any("depth" in e for e in examples))
    cols = min(cols, len(examples))
    rows = -(-len(examples) // cols)
    grid = np.zeros((rows * rows_per * h, cols * w, 3), np.uint8)
    for n, ex in enumerate(examples):
        y, x = (n // cols) * rows_per * h, (n % cols) * w
        tiles = [ex["image"], overlay(ex)] + ([colorize_depth(ex["depth"])] if "depth" in ex else [])
        for r, tile in enumerate(tiles):
            grid[y + r * h: y + (r + 1) * h, x: x + w] = tile[..., :3]
    img = Image.fromarray(grid)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def write_preview(folder: str, tfrecord_paths: Iterable[str], path: str, n: int = 16) -> None:
    """The preview grid of the first ``n`` examples of the given shards (TFRecord or ArrayRecord
    files), written atomically."""
    exs = []
    for p in tfrecord_paths:
        for data in records.shard_records(p):
            exs.append(records.from_example(data))
            if len(exs) >= n:
                break
        if len(exs) >= n:
            break
    import io
    buf = io.BytesIO()
    preview_grid(exs).save(buf, format="PNG")
    records.atomic_write(path, buf.getvalue())


def dataset_class_names(data: str) -> tuple[str, ...]:
    """A generated folder's class names (label value -> name): the manifest's ``class_names``; for
    folders written before the manifest held them, the class list of the config it records."""
    manifest = records.read_manifest(data)
    if "class_names" in manifest:
        return tuple(manifest["class_names"])
    data_cfg = manifest.get("config", {}).get("data")
    if data_cfg is not None:
        import ml_collections

        from datasetdm_jax.data import sources
        try:
            return tuple(sources.class_names(ml_collections.ConfigDict(data_cfg)))
        except Exception as e:  # noqa: BLE001 - e.g. a COCO annotation file no longer where it was
            print(f"export: {data}: class names of its config unavailable ({type(e).__name__}: {e}); "
                  "categories are named class_K")
    return ()


EXPORT_FILE = "export.json"    # written last: what this folder is an export of (--data's manifest hash)
INCOMPLETE_FILE = "INCOMPLETE"  # written first, removed last: present = the export did not finish
_SUBDIRS = ("images", "segmentation", "depth")
_OWN_FILES = ("annotations.json", "prompts.jsonl", EXPORT_FILE, INCOMPLETE_FILE)
_OWN_NAME = re.compile(r"^\d{8,}\.(jpg|png)(\.tmp-\d+)?$")
_OWN_TEMP = re.compile(r"^(annotations\.json|prompts\.jsonl)\.(tmp|annotations)-\d+$")  # of a killed run


def _data_id(data: str) -> dict[str, str]:
    """What identifies a generated dataset: its manifest's sha256 (which lists every shard's), and
    where it was read from (for messages only)."""
    manifest = storage.read_bytes(storage.join(data, records.MANIFEST))
    return {"data": data if storage.is_remote(data) else os.path.abspath(data),
            "manifest_sha256": hashlib.sha256(manifest).hexdigest()}


def _prepare_out(data_id: dict[str, str], out: str) -> None:
    """``out`` may be new, empty, or an earlier export of the same data (its ``export.json`` or
    ``INCOMPLETE`` records the data's manifest hash), whose files are then removed so that nothing of
    it stays beside the new export. Anything else is refused: exports are never mixed."""
    names = [n for n in storage.listdir(out) if not n.startswith(".")]
    if not names:
        return
    mark = next((n for n in (INCOMPLETE_FILE, EXPORT_FILE) if n in names), None)
    if mark is None:
        raise UserError(f"--out {out} is not empty and holds no export ({EXPORT_FILE} missing): choose a new or "
                        "empty folder (an export is never written beside other files)")
    try:
        old = json.loads(storage.read_bytes(storage.join(out, mark)))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{storage.join(out, mark)} is corrupt ({e}); choose a new --out or delete {out}") from None
    if old.get("manifest_sha256") != data_id["manifest_sha256"]:
        raise UserError(f"--out {out} holds an export of another dataset ({old.get('data')}), not of "
                        f"{data_id['data']}: choose a new --out, or delete {out} first")
    stale = []
    for sub in _SUBDIRS:
        for n in storage.listdir(storage.join(out, sub)):
            if not _OWN_NAME.match(n):
                raise UserError(f"--out {out}: {storage.join(out, sub, n)} was not written by `datasetdm export`; "
                                "choose a new --out, or remove that file")
            stale.append(storage.join(out, sub, n))
    stale += [storage.join(out, n) for n in names
              if (n in _OWN_FILES and n != INCOMPLETE_FILE) or _OWN_TEMP.match(n)]
    for p in stale:  # the earlier export of the same data: replaced whole, never mixed
        storage.remove(p)


def export_folder(data: str, out: str, min_quality: float | None = None, jpeg_quality: int = 95) -> dict[str, int]:
    """Write the plain folder and ``annotations.json``; examples below ``min_quality`` are left out.

    Streams: one record is decoded, written and dropped at a time (records.read_examples); the COCO
    file is written incrementally (``CocoWriter``), so memory does not grow with the dataset. COCO
    categories are the dataset's own classes (the manifest's ``class_names``).

    ``out`` must be new, empty or an earlier export of the same ``data`` (replaced whole); an
    ``INCOMPLETE`` file marks it until the export finishes, ``export.json`` (written last) records
    what it is an export of. ``min_quality``: a number in [0, 1].
    """
    data = storage.check(data)  # any other scheme: one line, nothing written
    out = errors.check_output_dir(out)  # not a file, not below one, writable; before any work
    if min_quality is not None:
        min_quality = errors.check_number("--min_quality", min_quality, low=0.0, high=1.0)
    class_names = dataset_class_names(data)  # also a one-line error for an unfinished or foreign folder
    data_id = _data_id(data)
    _prepare_out(data_id, out)
    storage.makedirs(out)
    records.atomic_write(storage.join(out, INCOMPLETE_FILE), json.dumps(
        {**data_id, "note": f"this export did not finish: rerun `datasetdm export --data {data} --out {out}` "
                            "to redo it"}, indent=1))
    best = None  # the highest quality seen, for the message when nothing reaches min_quality
    made: set[str] = set()  # sub-folders are made on their first file: no empty depth/ for a mask-only set

    def put(sub: str, name: str, data: bytes) -> None:
        if sub not in made:
            storage.makedirs(storage.join(out, sub))
            made.add(sub)
        records.atomic_write(storage.join(out, sub, name), data)

    kept = dropped = 0
    coco = CocoWriter(storage.join(out, "annotations.json"), class_names)
    prompts_path = storage.join(out, "prompts.jsonl")
    prompts_tmp = (f"{prompts_path}.tmp-{os.getpid()}" if not storage.is_remote(out)
                   else os.path.join(coco._stage, "prompts.jsonl"))
    try:
        with open(prompts_tmp, "w", encoding="utf-8") as prompts_file:
            for ex in records.read_examples(data):
                if min_quality is not None and ex.get("quality", 1.0) < min_quality:
                    dropped += 1
                    q = float(ex.get("quality", 1.0))
                    best = q if best is None or q > best else best
                    continue
                stem = f"{ex['index']:08d}"
                put("images", stem + ".jpg", records.encode_jpeg(ex["image"], jpeg_quality))
                if "segmentation" in ex:
                    put("segmentation", stem + ".png", records.encode_png(ex["segmentation"].astype(np.uint8)))
                if "depth" in ex:
                    mm = np.clip(np.round(ex["depth"] / records.DEPTH_SCALE), 0, 65535).astype(np.uint16)
                    put("depth", stem + ".png", records.encode_png(mm))
                prompts_file.write(json.dumps({"file_name": stem + ".jpg", "prompt": ex["prompt"],
                                               "index": ex["index"]}) + "\n")
                coco.add(ex, f"images/{stem}.jpg")
                kept += 1
            prompts_file.flush()
            os.fsync(prompts_file.fileno())
        if not kept and dropped:
            raise UserError(f"--min_quality {min_quality:g} leaves out all {dropped} examples of {data} (the highest "
                            f"quality is {best:.3g}): nothing exported; choose a lower --min_quality")
    except BaseException:
        coco.abort()
        if os.path.exists(prompts_tmp):
            os.remove(prompts_tmp)
        raise
    if storage.is_remote(out):
        storage.upload(prompts_tmp, prompts_path)  # before close() removes the staging folder
    coco.close()
    if not storage.is_remote(out):
        os.replace(prompts_tmp, prompts_path)
    stats = {"images": kept, "dropped": dropped, "annotations": coco.num_annotations}
    records.atomic_write(storage.join(out, EXPORT_FILE), json.dumps(
        {**data_id, "min_quality": min_quality, **stats}, indent=1, sort_keys=True))
    storage.remove(storage.join(out, INCOMPLETE_FILE))  # last: the export is complete
    return stats


def main_export(data: str, out: str, min_quality: float | None = None) -> None:
    """CLI body of ``datasetdm export --data DIR --out OUT [--min_quality Q]``."""
    stats = export_folder(data, out, min_quality)
    print(f"export: {stats['images']} images, {stats['annotations']} COCO annotations -> {out}"
          + (f" ({stats['dropped']} below quality {min_quality} left out)" if min_quality is not None else ""))
