"""Generated datasets to the formats downstream toolkits take, and a preview grid.

``datasetdm export --data DIR --out OUT``: a plain folder (``images/*.jpg``, ``segmentation/*.png``
class ids, ``depth/*.png`` 16-bit millimetres, ``prompts.jsonl``) and ``annotations.json`` in COCO
format (instances with RLE masks, boxes, scores and person keypoints; a semantic-only dataset gets
one annotation per class region, as COCO-stuff does; a pose-only dataset one keypoint annotation
per person). Categories use the dataset's class ids.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from datasetdm_jax.data import records, shapes

__all__ = ["colorize_depth", "overlay", "preview_grid", "write_preview", "to_coco", "export_folder", "main_export"]

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
    """The preview grid of the first ``n`` examples of the given shards, written atomically."""
    exs = []
    for p in tfrecord_paths:
        for data in records.read_tfrecord(p):
            exs.append(records.from_example(data))
            if len(exs) >= n:
                break
        if len(exs) >= n:
            break
    import io
    buf = io.BytesIO()
    preview_grid(exs).save(buf, format="PNG")
    records.atomic_write(path, buf.getvalue())


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_util
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def _categories(class_names: Sequence[str]) -> list[dict[str, Any]]:
    cats = []
    for k, name in enumerate(class_names):
        if k == 0:
            continue
        c = {"id": k, "name": name, "supercategory": "shape" if name != "person" else "person"}
        if name == "person":
            c["keypoints"] = list(shapes.KEYPOINT_NAMES)
            c["skeleton"] = [[a + 1, b + 1] for a, b in shapes.SKELETON]
        cats.append(c)
    return cats


def _keypoint_fields(kp: np.ndarray) -> dict[str, Any]:
    """COCO keypoint fields: [x1, y1, v1, ...] (x, y in pixels, v an int flag) and the labelled count."""
    flat: list[float | int] = []
    for x, y, v in np.asarray(kp, np.float32):
        flat += [round(float(x), 3), round(float(y), 3), int(v)]
    return {"keypoints": flat, "num_keypoints": int((np.asarray(kp)[:, 2] > 0).sum())}


def _pair_persons(regions: Sequence[tuple[np.ndarray, int, float]], kps: Sequence[np.ndarray],
                  person: int) -> list[int | None]:
    """For each person's keypoints, the unused person-class region holding most of its labelled
    joints (None if no region holds any): keypoints and masks are separate lists in the records."""
    used: set[int] = set()
    out: list[int | None] = []
    for kp in kps:
        kp = np.asarray(kp, np.float32)
        best, hits = None, 0
        for r, (m, k, _) in enumerate(regions):
            if k != person or r in used:
                continue
            h, w = m.shape
            lab = kp[kp[:, 2] > 0]
            xs, ys = np.clip(lab[:, 0].astype(int), 0, w - 1), np.clip(lab[:, 1].astype(int), 0, h - 1)
            n = int(m[ys, xs].sum())
            if n > hits:
                best, hits = r, n
        if best is not None:
            used.add(best)
        out.append(best)
    return out


def to_coco(examples: Iterable[dict[str, Any]], file_name=lambda ex: f"{ex['index']:08d}.jpg",
            class_names: Sequence[str] = shapes.CLASSES) -> dict[str, Any]:
    """COCO dict: images, categories, annotations (instances or per-class regions, keypoints).

    Every mask region is an annotation with an RLE ``segmentation`` (pycocotools), its ``bbox`` and
    ``score``; a person's keypoints join the person region that holds most of its labelled joints,
    or else form their own ``person`` annotation (empty ``segmentation``, ``bbox`` around the
    labelled joints, ``score`` their mean peak score when stored), as in a COCO keypoints file.
    """
    images, anns = [], []
    person = class_names.index("person") if "person" in class_names else -1
    for ex in examples:
        h, w = ex["image"].shape[:2]
        image_id = int(ex["index"])
        images.append({"id": image_id, "file_name": file_name(ex), "height": h, "width": w, "prompt": ex["prompt"]})
        if "instance_masks" in ex:
            regions = [(m, int(k), float(s)) for m, k, s in
                       zip(ex["instance_masks"], ex["instance_labels"], ex["instance_scores"])]
        elif "segmentation" in ex:
            seg = ex["segmentation"]
            regions = [(seg == k, int(k), 1.0) for k in np.unique(seg) if 0 < k < 255]
        else:
            regions = []
        kps = [np.asarray(kp, np.float32) for kp in ex.get("keypoints", [])]
        kp_scores = ex.get("keypoint_scores")
        pairs = _pair_persons(regions, kps, person) if person >= 0 else [None] * len(kps)
        joined = {r: p for p, r in enumerate(pairs) if r is not None}
        for r, (m, k, score) in enumerate(regions):
            a = {"id": len(anns) + 1, "image_id": image_id, "category_id": k, "segmentation": _rle(m),
                 "area": int(m.sum()), "bbox": _bbox(m), "iscrowd": 0, "score": score}
            if r in joined:
                a.update(_keypoint_fields(kps[joined[r]]))
            anns.append(a)
        for p, kp in enumerate(kps):
            if pairs[p] is not None or person < 0 or not (kp[:, 2] > 0).any():
                continue
            fields = _keypoint_fields(kp)
            # The box spans the joints as written (rounded), so every written joint lies inside it.
            written = np.asarray(fields["keypoints"], np.float64).reshape(-1, 3)
            lab = written[written[:, 2] > 0]
            x0, y0 = float(lab[:, 0].min()), float(lab[:, 1].min())
            bw, bh = float(lab[:, 0].max()) - x0, float(lab[:, 1].max()) - y0
            score = float(np.mean(np.asarray(kp_scores[p])[kp[:, 2] > 0])) if kp_scores is not None else 1.0
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": person, "segmentation": [],
                         "area": bw * bh, "bbox": [x0, y0, bw, bh], "iscrowd": 0, "score": score, **fields})
    return {"info": {"description": "datasetdm-jax generated dataset"}, "images": images,
            "annotations": anns, "categories": _categories(class_names)}


def export_folder(data: str, out: str, min_quality: float | None = None, jpeg_quality: int = 95) -> dict[str, int]:
    """Write the plain folder and ``annotations.json``; examples below ``min_quality`` are left out."""
    records.read_manifest(data)  # a one-line error for an unfinished or foreign folder, before writing
    for sub in ("images", "segmentation", "depth"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    kept, dropped = [], 0
    prompts_lines = []
    for ex in records.read_tfrecords(data):
        if min_quality is not None and ex.get("quality", 1.0) < min_quality:
            dropped += 1
            continue
        stem = f"{ex['index']:08d}"
        records.atomic_write(os.path.join(out, "images", stem + ".jpg"), records.encode_jpeg(ex["image"], jpeg_quality))
        if "segmentation" in ex:
            records.atomic_write(os.path.join(out, "segmentation", stem + ".png"),
                                 records.encode_png(ex["segmentation"].astype(np.uint8)))
        if "depth" in ex:
            mm = np.clip(np.round(ex["depth"] / records.DEPTH_SCALE), 0, 65535).astype(np.uint16)
            records.atomic_write(os.path.join(out, "depth", stem + ".png"), records.encode_png(mm))
        prompts_lines.append(json.dumps({"file_name": stem + ".jpg", "prompt": ex["prompt"], "index": ex["index"]}))
        kept.append(ex)
    coco = to_coco(kept, file_name=lambda ex: f"images/{ex['index']:08d}.jpg")
    records.atomic_write(os.path.join(out, "annotations.json"), json.dumps(coco))
    records.atomic_write(os.path.join(out, "prompts.jsonl"), "\n".join(prompts_lines) + "\n")
    return {"images": len(kept), "dropped": dropped, "annotations": len(coco["annotations"])}


def main_export(data: str, out: str, min_quality: float | None = None) -> None:
    """CLI body of ``datasetdm export --data DIR --out OUT [--min_quality Q]``."""
    stats = export_folder(data, out, min_quality)
    print(f"export: {stats['images']} images, {stats['annotations']} COCO annotations -> {out}"
          + (f" ({stats['dropped']} below quality {min_quality} left out)" if min_quality is not None else ""))
