"""COCO annotations of generated examples: instances with RLE masks, per-class regions, keypoints.

``to_coco`` builds the dict in memory; ``CocoWriter`` writes the same file one image at a time in
constant memory (what ``datasetdm export`` uses). Categories are the dataset's own classes with
their label values as ids.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Iterable, Sequence

import numpy as np

from datasetdm_jax import storage
from datasetdm_jax.data import shapes

__all__ = ["to_coco", "CocoWriter"]


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_util
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def _categories(class_names: Sequence[str], ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """COCO categories: id = label value, name = the dataset's class name. Label 0 is left out when
    it is ``background`` (VOC, COCO, the shapes world), kept when it is a class (Cityscapes' road).
    ``ids``: label values to describe beyond ``class_names`` (named ``class_K``)."""
    names = dict(enumerate(class_names))
    for k in ids or ():
        names.setdefault(int(k), f"class_{int(k)}")
    cats = []
    for k, name in sorted(names.items()):
        if k == 0 and name == "background":
            continue
        c = {"id": k, "name": name, "supercategory": "person" if name == "person" else "object"}
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


def _image_entry(ex: dict[str, Any], file_name: str) -> dict[str, Any]:
    h, w = ex["image"].shape[:2]
    return {"id": int(ex["index"]), "file_name": file_name, "height": h, "width": w, "prompt": ex["prompt"]}


def _annotations(ex: dict[str, Any], class_names: Sequence[str], first_id: int) -> list[dict[str, Any]]:
    """One example's COCO annotations (ids from ``first_id``): instances or per-class regions, keypoints."""
    image_id = int(ex["index"])
    person = class_names.index("person") if "person" in class_names else -1
    no_region = {255} | ({0} if class_names[:1] in (("background",), ["background"]) else set())
    if "instance_masks" in ex:
        regions = [(m, int(k), float(s)) for m, k, s in
                   zip(ex["instance_masks"], ex["instance_labels"], ex["instance_scores"])]
    elif "segmentation" in ex:
        seg = ex["segmentation"]
        regions = [(seg == k, int(k), 1.0) for k in np.unique(seg) if int(k) not in no_region]
    else:
        regions = []
    kps = [np.asarray(kp, np.float32) for kp in ex.get("keypoints", [])]
    kp_scores = ex.get("keypoint_scores")
    pairs = _pair_persons(regions, kps, person) if person >= 0 else [None] * len(kps)
    joined = {r: p for p, r in enumerate(pairs) if r is not None}
    anns: list[dict[str, Any]] = []
    for r, (m, k, score) in enumerate(regions):
        a = {"id": first_id + len(anns), "image_id": image_id, "category_id": k, "segmentation": _rle(m),
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
        anns.append({"id": first_id + len(anns), "image_id": image_id, "category_id": person, "segmentation": [],
                     "area": bw * bh, "bbox": [x0, y0, bw, bh], "iscrowd": 0, "score": score, **fields})
    return anns


_INFO = {"description": "datasetdm-jax generated dataset"}


def to_coco(examples: Iterable[dict[str, Any]], file_name=lambda ex: f"{ex['index']:08d}.jpg",
            class_names: Sequence[str] = shapes.CLASSES) -> dict[str, Any]:
    """COCO dict (in memory; ``export_folder`` streams the same to a file): images, categories,
    annotations (instances or per-class regions, keypoints).

    Every mask region is an annotation with an RLE ``segmentation`` (pycocotools), its ``bbox`` and
    ``score``; a person's keypoints join the person region that holds most of its labelled joints,
    or else form their own ``person`` annotation (empty ``segmentation``, ``bbox`` around the
    labelled joints, ``score`` their mean peak score when stored), as in a COCO keypoints file.
    """
    images, anns = [], []
    for ex in examples:
        images.append(_image_entry(ex, file_name(ex)))
        anns += _annotations(ex, class_names, len(anns) + 1)
    return {"info": _INFO, "images": images, "annotations": anns,
            "categories": _categories(class_names, {a["category_id"] for a in anns})}


class CocoWriter:
    """Writes a COCO ``annotations.json`` one image at a time, in constant memory.

    Image entries go straight into the output (a temporary name until ``close``), annotations into a
    spool file beside it, one JSON line each; ``close`` appends the spooled annotations and the
    categories (label values seen beyond the class list get ``class_K`` names), then renames the file
    into place (for a gs:// ``path``, both files are local temporaries and ``close`` uploads the
    result once). Nothing grows with the number of images but the files on disk.
    """

    def __init__(self, path: str, class_names: Sequence[str]):
        self.path, self.class_names = storage.check(path), tuple(class_names)
        self._stage = tempfile.mkdtemp(prefix="datasetdm-coco-") if storage.is_remote(path) else None
        base = os.path.join(self._stage, "annotations.json") if self._stage else path
        self._tmp, self._spool_path = f"{base}.tmp-{os.getpid()}", f"{base}.annotations-{os.getpid()}"
        self._out = open(self._tmp, "w", encoding="utf-8")
        self._spool = open(self._spool_path, "w+", encoding="utf-8")
        self._out.write('{"info": ' + json.dumps(_INFO) + ', "images": [')
        self.num_images = self.num_annotations = 0
        self._seen: set[int] = set()

    def add(self, ex: dict[str, Any], file_name: str) -> int:
        """Write one example's image entry and annotations; returns how many annotations it has."""
        self._out.write((", " if self.num_images else "") + json.dumps(_image_entry(ex, file_name)))
        self.num_images += 1
        anns = _annotations(ex, self.class_names, self.num_annotations + 1)
        for a in anns:
            self._spool.write(json.dumps(a) + "\n")
            self._seen.add(int(a["category_id"]))
        self.num_annotations += len(anns)
        return len(anns)

    def close(self) -> None:
        self._out.write('], "annotations": [')
        self._spool.seek(0)
        for n, line in enumerate(self._spool):
            self._out.write((", " if n else "") + line.rstrip("\n"))
        self._out.write('], "categories": ' + json.dumps(_categories(self.class_names, self._seen)) + "}")
        self._spool.close()
        os.remove(self._spool_path)
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        if self._stage:
            storage.upload(self._tmp, self.path)
            shutil.rmtree(self._stage, ignore_errors=True)
        else:
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        for f, p in ((self._spool, self._spool_path), (self._out, self._tmp)):
            f.close()
            if os.path.exists(p):
                os.remove(p)
        if self._stage:
            shutil.rmtree(self._stage, ignore_errors=True)
