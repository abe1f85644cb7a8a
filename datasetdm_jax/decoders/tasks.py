"""What a perception task is: its decoder, its loss on a batch, its prediction, and its scoring.

One place that both the P-Decoder trainer (`train.py`) and the scratch baselines (`research/baselines.py`)
use, so the two are trained on the same targets and scored by the same code.

Tasks (batch keys as produced by `data.pipeline`; labels at image resolution):
- ``semantic``: class map ``segmentation`` (B,H,W); Mask2Former head, one GT mask per present class,
  or (``semantic_head='per_pixel'``) a per-pixel classifier with cross-entropy.
- ``instance``: class-aware instances ``instances`` (B,M,H,W), ``instance_classes`` (B,M),
  ``num_instances`` (B,); Mask2Former head, Hungarian matching on class + mask costs. The head's
  classes are the object classes (background dropped): head class k is data class k + 1.
- ``depth``: ``depth`` (B,H,W) in metres; SILog loss.
- ``pose``: ``keypoints`` (B,P,17,3) = (x, y, v) and ``num_persons`` (B,); Gaussian heatmap
  targets (all persons of an image drawn into one map per joint, joints with v > 0 weighted),
  JointsMSE. Prediction is one person per image (the official single-person setting).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from datasetdm_jax import metrics as mt
from datasetdm_jax.decoders import get_decoder
from datasetdm_jax.decoders.inference import (class_map, grounded_class_map, instance_inference, pixel_confidence,
                                              semantic_scores)
from datasetdm_jax.decoders.losses import (heatmap_softmax_loss, joints_mse_loss, per_pixel_cross_entropy,
                                           segmentation_loss, silog_loss)
from datasetdm_jax.decoders.pixel_stem import FeatureSpec, resize
from datasetdm_jax.decoders.pose import decode_heatmaps, gaussian_heatmaps, softmax_heatmaps

TASKS: tuple[str, ...] = ("semantic", "instance", "depth", "pose")
POSE_LOSSES: tuple[str, ...] = ("mse", "softmax")
SEMANTIC_HEADS: tuple[str, ...] = ("mask2former", "per_pixel")
_DECODER = {"semantic": "segmentation", "instance": "segmentation", "depth": "depth", "pose": "pose"}
# Left/right keypoint swap for horizontal flips (COCO order).
FLIP_PAIRS: tuple[tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """The static facts a task's loss and prediction need.

    ``num_classes``: data classes including background (class 0). ``deep_supervision``: sum the
    Mask2Former loss over every decoder layer (segmentation tasks only). ``sigma``: heatmap
    Gaussian in heatmap pixels. ``top_k``: instances kept per image at inference. ``pose_loss``:
    'mse' (official JointsMSE on heatmaps) or 'softmax' (`heatmap_softmax_loss` on logits).
    ``semantic_head``: 'mask2former' (official) or 'per_pixel' (`decoders.per_pixel`).
    """

    task: str
    image_size: int
    num_classes: int
    num_points: int = 12544
    deep_supervision: bool = False
    sigma: float = 2.0
    top_k: int = 20
    num_joints: int = 17
    pose_loss: str = "mse"
    semantic_head: str = "mask2former"

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.pose_loss not in POSE_LOSSES:
            raise ValueError(f"pose_loss must be one of {POSE_LOSSES}, got {self.pose_loss!r}")
        if self.semantic_head not in SEMANTIC_HEADS:
            raise ValueError(f"semantic_head must be one of {SEMANTIC_HEADS}, got {self.semantic_head!r}")
        if self.semantic_head != "mask2former" and self.task != "semantic":
            raise ValueError(f"semantic_head={self.semantic_head!r} applies to task 'semantic', not {self.task!r}")
        if self.deep_supervision and self.decoder_name != "segmentation":
            raise ValueError(f"deep_supervision applies to the Mask2Former head (semantic, instance), "
                             f"not to {self.decoder_name!r} (task {self.task!r})")

    @property
    def decoder_name(self) -> str:
        """The registered decoder (`decoders.get_decoder`) this task trains."""
        return "per_pixel" if self.semantic_head == "per_pixel" else _DECODER[self.task]

    @property
    def head_classes(self) -> int:
        return self.num_classes - 1 if self.task == "instance" else self.num_classes


def spec_from_config(config) -> TaskSpec:
    """TaskSpec from a train/baseline config (``task``, ``data.image_size``, optional extras)."""
    from datasetdm_jax.data import shapes

    get = lambda k, d: config.get(k, d) if hasattr(config, "get") else d
    return TaskSpec(task=str(config.task), image_size=int(config.data.image_size),
                    num_classes=int(get("num_classes", len(shapes.CLASSES))),
                    num_points=int(get("num_points", 12544) or 1),
                    deep_supervision=bool(get("deep_supervision", False)),
                    sigma=float(get("pose_sigma", 2.0)), top_k=int(get("top_k", 20)),
                    pose_loss=str(get("pose_loss", "mse")),
                    semantic_head=str(get("semantic_head", "mask2former")))


def build_decoder(spec: TaskSpec, features: FeatureSpec, decoder_config: Mapping[str, Any], *,
                  rngs: nnx.Rngs) -> nnx.Module:
    """The task's registered decoder on a feature spec; fills in what the task fixes."""
    dcfg = dict(decoder_config)
    if spec.decoder_name == "per_pixel":
        dcfg["num_classes"] = spec.num_classes
        dcfg.setdefault("out_size", spec.image_size)
    elif spec.decoder_name == "segmentation":
        dcfg["num_classes"] = spec.head_classes
        queries = int(dcfg.get("num_queries", 100))
        if spec.task == "semantic" and queries < spec.num_classes:
            # Semantic targets have one slot per class; Hungarian matching needs a query for each.
            raise ValueError(f"decoder.num_queries={queries} is smaller than num_classes={spec.num_classes}; "
                             "semantic segmentation needs at least one query per class")
    elif spec.task == "depth":
        dcfg.setdefault("out_size", spec.image_size)
    return get_decoder(spec.decoder_name, features, dcfg, rngs=rngs)


def _flip_keypoints(kp: np.ndarray, width: int) -> np.ndarray:
    """(..., 17, 3) keypoints mirrored left-right: x -> W - x (continuous coords), L/R joints swapped."""
    out = kp.copy()
    out[..., 0] = np.where(kp[..., 2] > 0, width - kp[..., 0], 0.0)
    perm = np.arange(kp.shape[-2])
    for a, b in FLIP_PAIRS:
        perm[a], perm[b] = b, a
    return out[..., perm, :]


def flip_batch(batch: dict[str, np.ndarray], flip: np.ndarray) -> dict[str, np.ndarray]:
    """Horizontal flip of the examples where ``flip`` (B,) is True, for every label key present."""
    out = dict(batch)
    for k in ("image", "segmentation", "depth", "instance_map"):
        if k in out:
            out[k] = np.where(flip.reshape((-1,) + (1,) * (out[k].ndim - 1)), out[k][:, :, ::-1], out[k])
    if "instances" in out:
        m = out["instances"]
        out["instances"] = np.where(flip.reshape((-1,) + (1,) * (m.ndim - 1)), m[..., ::-1], m)
    if "keypoints" in out:
        kp = out["keypoints"]
        out["keypoints"] = np.where(flip.reshape((-1,) + (1,) * (kp.ndim - 1)),
                                    _flip_keypoints(kp, batch["image"].shape[2]), kp)
    return out


def _segmentation_targets(spec: TaskSpec, batch):
    if spec.task == "semantic":
        k = spec.num_classes
        masks = (batch["segmentation"][:, None].astype(jnp.int32) == jnp.arange(k)[None, :, None, None])
        valid = masks.sum((2, 3)) > 0
        return jnp.broadcast_to(jnp.arange(k), valid.shape), masks.astype(jnp.float32), valid
    m = batch["instances"].shape[1]
    valid = jnp.arange(m)[None] < batch["num_instances"][:, None]
    classes = jnp.clip(batch["instance_classes"].astype(jnp.int32) - 1, 0, spec.head_classes - 1)
    return classes, batch["instances"].astype(jnp.float32), valid


def pose_targets(spec: TaskSpec, keypoints: jax.Array, num_persons: jax.Array,
                 size: int) -> tuple[jax.Array, jax.Array]:
    """Heatmap targets (B,S,S,J) and joint weights (B,J): max over the image's persons."""
    b, p = keypoints.shape[:2]
    stride = spec.image_size / size
    valid = (jnp.arange(p)[None] < num_persons[:, None])[..., None]
    vis = keypoints[..., 2] * valid                                                  # (B, P, J)
    g, w = gaussian_heatmaps(keypoints.reshape(b * p, -1, 3)[..., :2], vis.reshape(b * p, -1), size,
                             stride=stride, sigma=spec.sigma)
    g = g.reshape((b, p) + g.shape[1:]).max(1)
    return g, w.reshape(b, p, -1).max(1)


def task_loss(spec: TaskSpec, out: Any, batch: Mapping[str, jax.Array],
              key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, named parts) of the decoder output ``out`` on ``batch``."""
    if spec.decoder_name == "per_pixel":
        ce = per_pixel_cross_entropy(out["logits"], batch["segmentation"])
        return ce, {"ce": ce}
    if spec.task in ("semantic", "instance"):
        classes, masks, valid = _segmentation_targets(spec, batch)
        total, parts = segmentation_loss(out, classes, masks, valid, key, num_classes=spec.head_classes,
                                         aux=spec.deep_supervision, num_points=spec.num_points)
        return total, {n: parts[n] for n in ("ce", "bce", "dice")}
    if spec.task == "depth":
        return silog_loss(out, batch["depth"]), {}
    target, weight = pose_targets(spec, batch["keypoints"], batch["num_persons"], out.shape[1])
    loss = heatmap_softmax_loss if spec.pose_loss == "softmax" else joints_mse_loss
    return loss(out, target, weight), {}


def semantic_class_scores(spec: TaskSpec, out: Any, size: int | tuple[int, int] | None = None) -> jax.Array:
    """A semantic decoder's output -> (B, K, H, W) per-class scores at ``size`` (default: the image
    size): Mask2Former `semantic_scores`, or the per-pixel head's softmax."""
    size = size or spec.image_size
    if spec.decoder_name == "per_pixel":
        return jnp.moveaxis(jax.nn.softmax(resize(out["logits"].astype(jnp.float32), size), axis=-1), -1, 1)
    return semantic_scores(out["logits"][-1], out["masks"][-1], size)


def pose_heatmaps(spec: TaskSpec, out: jax.Array) -> jax.Array:
    """A pose decoder's output as heatmaps peaking near 1 at a joint, whichever loss trained it."""
    return softmax_heatmaps(out, spec.sigma) if spec.pose_loss == "softmax" else out.astype(jnp.float32)


def task_predict(spec: TaskSpec, out: Any, truth: jax.Array | None = None) -> dict[str, jax.Array]:
    """Decoder output -> labels at image resolution (jittable).

    semantic: see `semantic_predictions` (``truth``: the batch's label maps, for the grounded labels);
    depth: {'depth' (B,H,W)}; instance: {'masks' (B,k,H,W) bool, 'scores' (B,k), 'labels' (B,k) data
    class ids}; pose: {'keypoints' (B,1,17,3) as (x, y, score) in image pixels, 'scores' (B,1) mean
    joint score}.
    """
    if spec.task == "semantic":
        return semantic_predictions(spec, semantic_class_scores(spec, out), truth)
    if spec.task == "instance":
        r = instance_inference(out["logits"][-1], out["masks"][-1], top_k=spec.top_k, out_size=spec.image_size)
        return {"masks": r["masks"], "scores": r["scores"], "labels": r["labels"] + 1}
    if spec.task == "depth":
        return {"depth": out}
    kp, _ = decode_heatmaps(pose_heatmaps(spec, out), stride=spec.image_size / out.shape[1])
    return {"keypoints": kp[:, None], "scores": kp[:, None, :, 2].mean(-1)}


def semantic_predictions(spec: TaskSpec, scores: jax.Array, truth: jax.Array | None = None) -> dict[str, jax.Array]:
    """(B,K,H,W) class scores -> {'segmentation' (B,H,W) int32 argmax over all classes, 'confidence'
    (B,H,W) (`pixel_confidence`)}; with the true label maps ``truth`` (B,H,W) also
    'segmentation_grounded': the labels restricted to background + the classes each image holds, as
    generation restricts them to the prompt's classes (jittable: scored on the device, only label maps
    come back)."""
    pred = {"segmentation": class_map(scores), "confidence": pixel_confidence(scores)}
    if truth is not None:
        pred["segmentation_grounded"], _ = grounded_class_map(scores, classes_present(truth, spec.num_classes))
    return pred


class Evaluator:
    """Accumulates host-side predictions and labels; ``compute()`` gives the task's metrics.

    semantic: miou (argmax over all classes), and when the predictions hold ``segmentation_grounded``
    (`semantic_predictions`) miou_grounded: the labeller scored as generation uses it (`labelers.grounding`);
    instance: COCO mask AP/AP50/AP75 class-aware, plus ap_agnostic (the official class-agnostic
    protocol); depth: rel/rmse/delta1; pose: COCO keypoint AP/AP50/AP75 (OKS, object area = the
    person's visible mask area when instance masks are given).
    """

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self.miou = mt.MeanIoU(spec.num_classes) if spec.task == "semantic" else None
        self.miou_grounded: mt.MeanIoU | None = None  # made by the first predictions with segmentation_grounded
        self.preds: list = []
        self.gts: list = []

    def update(self, pred: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray]) -> None:
        pred = {k: np.asarray(v) for k, v in pred.items()}
        task = self.spec.task
        if task == "semantic":
            self.miou.update(pred["segmentation"], batch["segmentation"])
            if "segmentation_grounded" in pred:
                if self.miou_grounded is None:
                    self.miou_grounded = mt.MeanIoU(self.spec.num_classes)
                self.miou_grounded.update(pred["segmentation_grounded"], batch["segmentation"])
        elif task == "depth":
            self.preds.append(pred["depth"])
            self.gts.append(np.asarray(batch["depth"]))
        elif task == "instance":
            for i in range(len(pred["scores"])):
                n = int(batch["num_instances"][i])
                self.gts.append({"masks": np.asarray(batch["instances"][i][:n]),
                                 "labels": np.asarray(batch["instance_classes"][i][:n])})
                self.preds.append({"masks": pred["masks"][i], "labels": pred["labels"][i],
                                   "scores": pred["scores"][i]})
        else:
            for i in range(len(pred["scores"])):
                n = int(batch["num_persons"][i])
                gt = {"keypoints": np.asarray(batch["keypoints"][i][:n])}
                if "instances" in batch and "instance_classes" in batch:
                    gt["areas"] = _person_areas(batch, i, n)
                self.gts.append(gt)
                self.preds.append({"keypoints": pred["keypoints"][i], "scores": pred["scores"][i]})

    def compute(self, per_class: bool = False) -> dict[str, Any]:
        """The metrics; ``per_class`` adds semantic ``per_class_iou`` (a list, NaN for absent classes)."""
        task = self.spec.task
        if task == "semantic":
            miou, iou = self.miou.compute()
            out = {"miou": float(miou), **({"per_class_iou": [float(v) for v in iou]} if per_class else {})}
            if self.miou_grounded is not None:
                out["miou_grounded"] = float(self.miou_grounded.compute()[0])
            return out
        if task == "depth":
            return {k: float(v) for k, v in mt.depth_metrics(np.concatenate(self.preds),
                                                             np.concatenate(self.gts)).items()}
        if task == "instance":
            ap = mt.coco_mask_ap(self.gts, self.preds)
            return {**ap, "ap_agnostic": mt.coco_mask_ap(self.gts, self.preds, class_agnostic=True)["AP"]}
        return mt.coco_keypoint_ap(self.gts, self.preds)


def classes_present(segmentation: jax.Array, num_classes: int) -> jax.Array:
    """(B, H, W) label maps -> (B, K) bool: background and every class the image holds (255 ignored;
    jittable)."""
    seg = jnp.asarray(segmentation).astype(jnp.int32)
    present = (seg[:, None] == jnp.arange(num_classes)[None, :, None, None]).any((2, 3))
    return present.at[:, 0].set(True)


def _person_areas(batch: Mapping[str, np.ndarray], i: int, n: int) -> np.ndarray:
    """Visible-mask areas of image i's persons, in the keypoints' (far -> near) order."""
    from datasetdm_jax.data import shapes

    person = shapes.CLASS_TO_ID["person"]
    cls = np.asarray(batch["instance_classes"][i])[: int(batch["num_instances"][i])]
    areas = np.asarray(batch["instances"][i])[: len(cls)][cls == person].sum((-2, -1)).astype(np.float64)
    if len(areas) != n:  # labels disagree (e.g. a real dataset without person masks): bbox fallback
        return None
    return np.maximum(areas, 1.0)
