"""Decoder outputs -> dataset labels for generation: fixed-size inside jit, trimmed on the host.

A jitted program needs static shapes, so the instance and pose labels of a batch leave the device
padded to a fixed count with a validity flag per slot (``instance_valid``, ``person_valid``);
``trim`` drops the padding of one example on the host, giving the keys ``records.to_example``
takes. Settings come from a config's ``generate`` section (``label_settings``).

Instances (COCO instance): the official code scores (query, class) pairs as class
probability x mean in-mask sigmoid (mask = logit > 0), takes the top 100 and keeps at most 20 with
score >= 0.4. Its decoder is class-agnostic (one class), so every query yields one instance; we keep
that with class-aware heads by giving each query its best class, so one mask is never written
twice under two classes. The mask score is taken at the decoder's mask resolution and only the
kept masks are resized to the image (the official code resizes all 100 first: same ranking, far
more memory at 512 px).

Pose: the official code takes the heatmap argmax per joint with the quarter-pixel shift. The heatmaps
hold one map per joint, so on their own they give one person per image (the official
single-person setting). When an instance decoder labels the same images (``also``), each kept
person instance gets its own keypoints, decoded inside its box (``pose_per_person``, top-down
style). Unlike the official code every joint is kept: a joint whose peak is below
``keypoint_threshold`` gets COCO visibility 0 (and x = y = 0), the others 2.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from datasetdm_jax.decoders.inference import resize_masks
from datasetdm_jax.decoders.pose import decode_heatmaps

__all__ = ["DEFAULTS", "label_settings", "instance_labels", "pose_labels", "pose_per_person", "instance_quality",
           "pose_quality", "task_labels", "finisher", "trim"]

# Official: top-20 instances with score >= 0.4. Joints: the official code writes every peak; 0.1 is
# decode_heatmaps' visibility threshold.
DEFAULTS: dict[str, Any] = {"score_threshold": 0.4, "max_instances": 20, "min_area": 0,
                            "keypoint_threshold": 0.1, "min_keypoints": 1, "box_margin": 0.25}


def label_settings(config) -> dict[str, Any]:
    """The post-processing settings of a task config: its ``generate`` section over ``DEFAULTS``."""
    g = config.get("generate", None) if hasattr(config, "get") else None
    out = dict(DEFAULTS)
    if g is not None:
        for k in DEFAULTS:
            if k in g:
                out[k] = type(DEFAULTS[k])(g[k])
    if out["max_instances"] < 1:
        raise ValueError(f"{config.get('name', 'config')}: generate.max_instances must be >= 1, "
                         f"got {out['max_instances']}")
    return out


def instance_labels(logits: jax.Array, masks: jax.Array, *, out_size: int, score_threshold: float = 0.4,
                    max_instances: int = 20, min_area: int = 0,
                    allowed: jax.Array | None = None) -> dict[str, jax.Array]:
    """(B,Q,K+1) class logits, (B,Q,h,w) mask logits -> N = min(max_instances, Q) slots per image.

    Returns ``instance_masks`` (B,N,H,W) bool, ``instance_labels`` (B,N) int32 data class ids (head
    class + 1; 0 is background), ``instance_scores`` (B,N) float32 and ``instance_valid`` (B,N) bool
    (score >= ``score_threshold`` and at least max(1, ``min_area``) pixels at image size), ordered
    valid first, then by score. ``allowed`` (B, K+1) bool over data class ids (0 = background)
    grounds the labels in the prompt (`labelers.grounding`): each query takes its best *allowed*
    class, so an instance of a class the prompt does not name is relabelled, or dropped when its
    allowed score falls below the threshold.
    """
    prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :-1]            # (B, Q, K)
    if allowed is not None:
        prob = jnp.where(allowed[:, None, 1:], prob, 0.0)
    cls_score, cls = prob.max(-1), prob.argmax(-1).astype(jnp.int32)
    ml = masks.astype(jnp.float32)
    binary = ml > 0
    mask_score = (jax.nn.sigmoid(ml) * binary).sum((-2, -1)) / (binary.sum((-2, -1)) + 1e-6)
    score = cls_score * mask_score
    n = min(int(max_instances), score.shape[1])
    top, query = jax.lax.top_k(score, n)
    picked = jnp.take_along_axis(ml, query[:, :, None, None], axis=1)
    full = resize_masks(picked, out_size) > 0                                        # (B, N, H, W)
    valid = (top >= score_threshold) & (full.sum((-2, -1)) >= max(1, int(min_area)))
    order = jnp.argsort(jnp.where(valid, top, top - 2.0), axis=1, descending=True)
    take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
    return {"instance_masks": take(full), "instance_labels": take(jnp.take_along_axis(cls, query, 1) + 1),
            "instance_scores": take(top), "instance_valid": take(valid)}


def pose_labels(heatmaps: jax.Array, *, image_size: int, keypoint_threshold: float = 0.1,
                min_keypoints: int = 1) -> dict[str, jax.Array]:
    """(B,S,S,J) heatmaps -> one person slot per image.

    Returns ``keypoints`` (B,1,J,3) = (x, y, v) in image pixels with COCO visibility v in {0, 2}
    (x = y = 0 where v = 0; visible joints lie inside [0, image_size)), ``keypoint_scores``
    (B,1,J) heatmap peaks, and ``person_valid`` (B,1): at least ``min_keypoints`` visible joints.
    """
    s = heatmaps.shape[1]
    kp, vis = decode_heatmaps(heatmaps, stride=image_size / s, threshold=keypoint_threshold)
    xy = jnp.clip(kp[..., :2], 0.0, image_size - 1e-3)
    xy = jnp.where(vis[..., None], xy, 0.0)
    v = jnp.where(vis, 2.0, 0.0)
    keypoints = jnp.concatenate([xy, v[..., None]], -1)[:, None]
    return {"keypoints": keypoints, "keypoint_scores": kp[:, None, :, 2],
            "person_valid": (vis.sum(-1) >= int(min_keypoints))[:, None]}


def instance_quality(labels: Mapping[str, jax.Array]) -> jax.Array:
    """(B,) mean score of the kept instances (0 when none is kept)."""
    v = labels["instance_valid"]
    return (labels["instance_scores"] * v).sum(-1) / jnp.maximum(v.sum(-1), 1)


def pose_per_person(heatmaps: jax.Array, instances: Mapping[str, jax.Array], *, person_class: int, image_size: int,
                    keypoint_threshold: float = 0.1, min_keypoints: int = 1,
                    box_margin: float = 0.25) -> dict[str, jax.Array]:
    """Keypoints per kept person instance: the heatmaps decoded inside the instance's box, grown by
    ``box_margin`` of its size on each side (joints hidden by a nearer object lie outside the
    visible mask), as a top-down pose model would see a crop. N instance slots + 1 whole-image
    slot, used only when no person instance is kept (so a person the instance decoder missed still
    gets keypoints). Same keys and conventions as ``pose_labels``, with N + 1 slots.
    """
    b, s, _, j = heatmaps.shape
    m = instances["instance_masks"]                                                   # (B, N, H, W)
    n, h, w = m.shape[1:]
    is_person = instances["instance_valid"] & (instances["instance_labels"] == person_class)

    def extent(any_, size):                                   # [lo, hi) of the True entries, grown
        ar = jnp.arange(size)
        lo, hi = jnp.where(any_, ar, size).min(-1), jnp.where(any_, ar, -1).max(-1) + 1
        pad = box_margin * jnp.maximum(hi - lo, 0)
        return lo - pad, hi + pad

    y0, y1 = extent(m.any(-1), h)
    x0, x1 = extent(m.any(-2), w)
    stride = image_size / s
    lo, hi = jnp.arange(s) * stride - stride / 2, jnp.arange(s) * stride + stride / 2   # heatmap cells, pixels
    inside = ((hi[:, None] > y0[..., None, None]) & (lo[:, None] < y1[..., None, None])
              & (hi[None, :] > x0[..., None, None]) & (lo[None, :] < x1[..., None, None]))  # cells meeting the box
    hm = jnp.where(inside[..., None], heatmaps[:, None], -1e4).reshape(b * n, s, s, j)
    per = pose_labels(hm, image_size=image_size, keypoint_threshold=keypoint_threshold, min_keypoints=min_keypoints)
    whole = pose_labels(heatmaps, image_size=image_size, keypoint_threshold=keypoint_threshold,
                        min_keypoints=min_keypoints)
    per = {k: v.reshape((b, n) + v.shape[2:]) for k, v in per.items()}
    per["person_valid"] = per["person_valid"] & is_person
    whole["person_valid"] = whole["person_valid"] & ~is_person.any(1, keepdims=True)
    return {k: jnp.concatenate([per[k], whole[k]], 1) for k in per}


def pose_quality(labels: Mapping[str, jax.Array]) -> jax.Array:
    """(B,) mean joint peak (clipped to [0, 1]; a perfect heatmap peaks at 1) over the kept persons
    (0 when none is kept)."""
    v = labels["person_valid"]
    per = jnp.clip(labels["keypoint_scores"], 0.0, 1.0).mean(-1)
    return (per * v).sum(-1) / jnp.maximum(v.sum(-1), 1)


def finisher(parts: Sequence[tuple[str, Any]], image_size: int) -> Callable[[dict], dict]:
    """The last jitted step over the merged labels of one labeller's decoders ``parts`` = [(task,
    config)]: decodes the pose heatmaps that ``task_labels`` defers, per kept person instance when
    an instance decoder labels the same images (``pose_per_person``), else one person per image."""
    pose = next((label_settings(c) for task, c in parts if task == "pose"), None)
    inst = next((c for task, c in parts if task == "instance"), None)
    person = -1
    if inst is not None:
        from datasetdm_jax.data import sources
        names = list(sources.class_names(inst.data))
        person = names.index("person") if "person" in names else -1

    def finish(labels: dict[str, jax.Array]) -> dict[str, jax.Array]:
        if pose is None or "pose_heatmaps" not in labels:
            return labels
        out = {k: v for k, v in labels.items() if k != "pose_heatmaps"}
        kw = dict(image_size=image_size, keypoint_threshold=pose["keypoint_threshold"],
                  min_keypoints=pose["min_keypoints"])
        if person >= 0 and "instance_valid" in out:
            lab = pose_per_person(labels["pose_heatmaps"], out, person_class=person, box_margin=pose["box_margin"],
                                  **kw)
        else:
            lab = pose_labels(labels["pose_heatmaps"], **kw)
        return {**out, **lab, "pose_quality": pose_quality(lab)}

    return finish


def task_labels(task: str, out: Any, image_size: int, settings: Mapping[str, Any],
                allowed: jax.Array | None = None) -> dict[str, jax.Array]:
    """Padded labels of an ``instance`` decoder output (jittable), with the task's annotation
    confidence as ``instance_quality`` (B,) (``trim`` folds it into ``quality``); ``allowed``: see
    `instance_labels`. A ``pose`` output is kept as ``pose_heatmaps`` for ``finisher``, which may
    pair it with instances."""
    if task == "instance":
        lab = instance_labels(out["logits"][-1], out["masks"][-1], out_size=image_size,
                              score_threshold=settings["score_threshold"], max_instances=settings["max_instances"],
                              min_area=settings["min_area"], allowed=allowed)
        return {**lab, "instance_quality": instance_quality(lab)}
    if task == "pose":
        return {"pose_heatmaps": out.astype(jnp.float32)}
    raise ValueError(f"postprocess: task must be 'instance' or 'pose', got {task!r}")


def trim(row: Mapping[str, Any]) -> dict[str, Any]:
    """One example's padded labels (numpy) -> the record keys of ``records.to_example``: padding and
    rejected slots dropped, validity flags removed."""
    out = dict(row)
    if "instance_valid" in out:
        keep = np.asarray(out.pop("instance_valid"), bool)
        for k in ("instance_masks", "instance_labels", "instance_scores"):
            out[k] = np.asarray(out[k])[keep]
    if "person_valid" in out:
        keep = np.asarray(out.pop("person_valid"), bool)
        out["keypoints"] = np.asarray(out["keypoints"])[keep]
        out["keypoint_scores"] = np.asarray(out["keypoint_scores"])[keep]
    qs = [out.pop(k) for k in ("quality", "instance_quality", "pose_quality") if k in out]
    if qs:  # one confidence per image: the mean over its tasks
        out["quality"] = qs[0] if len(qs) == 1 else np.float32(np.mean(np.asarray(qs, np.float32)))
    return out
