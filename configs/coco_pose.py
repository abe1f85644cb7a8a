"""P-Decoder for COCO 2017 human pose (17 keypoint heatmaps), the paper's setting.

Run: ``datasetdm train --config configs/coco_pose.py data.root=/path/to/coco`` (rerun to resume).
Values marked "official" are those of the official DatasetDM code. Shared settings:
datasetdm_jax/config_common.py.
"""

import ml_collections

from datasetdm_jax import config_common as common


def get_config(arg=None):
    common.check_variant(arg)
    c = common.sd14_pdecoder(
        "pose", "coco_pose",
        steps=320000,                # 400 epochs of 801 images at batch 1
        num_points=0,                # unused by pose
        pose_sigma=2.0,              # official: Gaussian targets, sigma 2 on the 64x64 heatmaps (JointsMSELoss)
        eval_every=20000,
        # Official few-shot selection: all annotated persons in the first 801 train images; prompt
        # "a photo of a person".
        # Whole images resized to 512x512 (the official top-down per-person crop is not done here).
        # Official augmentation: flip (left/right joints swapped).
        data=dict(source="coco_pose", root="data/coco", split="train2017", image_size=512, resize="crop",
                  num_images=801, max_objects=20, flip=True, seed=0),
        eval_split="val2017", eval_images=5000,
    )
    # Official: 17 heatmaps at 64x64 for 512 px.
    c.decoder = ml_collections.ConfigDict(dict(hidden=256, num_joints=17))
    # `datasetdm generate --config configs/coco_pose.py --num_images N --out DIR`. Official prompt: "a
    # photo of a person", CFG 5. Keypoints: heatmap peak per joint; all 17 kept, visibility 2 where the
    # peak > keypoint_threshold, else 0; the image's person is kept with >= min_keypoints visible joints
    # (datasetdm_jax/decoders/postprocess.py).
    c.generate = common.sd14_generate(guidance=5.0, prompts=dict(classes=("person",)),
                                      keypoint_threshold=0.1, min_keypoints=1, box_margin=0.25)
    return c
