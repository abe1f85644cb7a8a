"""P-Decoder for COCO 2017 human pose (17 keypoint heatmaps), the paper's setting.

Run: ``datasetdm train --config configs/coco_pose.py data.root=/path/to/coco`` (rerun to resume).
Numbers cite ../shared/reference/datasetdm_official_code.md.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "pose"
    c.name = "coco_pose"
    c.pipeline = "models/stable-diffusion-v1-4"  # §1
    c.workdir = "runs/coco_pose"
    c.capture = "datasetdm"          # §2.2-2.3
    c.timestep = 0                   # §2.1
    c.seed = 42                      # §4
    c.batch_size = 1                 # §4
    c.lr = 1e-4                      # §4: Adam; StepLR x0.1 every 400 epochs for pose (not yet in train.py)
    c.steps = 320000                 # 400 epochs of 801 images at batch 1
    c.max_steps = 0
    c.num_points = 0                 # unused by pose
    c.pose_sigma = 2.0               # §4: Gaussian targets, sigma 2 on the 64x64 heatmaps (JointsMSELoss)
    c.log_every = 50
    c.eval_every = 20000
    c.checkpoint_every_s = 600.0
    c.keep_checkpoints = 2
    # §4 table: all annotated persons in the first 801 train images; prompt "a photo of a person".
    # Whole images resized to 512x512 (the official top-down per-person crop is not done here).
    c.data = ml_collections.ConfigDict(dict(
        source="coco_pose", root="data/coco", split="train2017", image_size=512, resize="crop",
        num_images=801, max_objects=20, flip=True, seed=0))  # §4: flip (left/right joints swapped)
    c.val = ml_collections.ConfigDict(dict(split="val2017", seed=1, num_images=100, batch_size=1))  # every eval_every
    c.eval = ml_collections.ConfigDict(dict(split="val2017", seed=0, num_images=5000, batch_size=1))  # at end
    c.decoder = ml_collections.ConfigDict(dict(hidden=256, num_joints=17))  # §3.4: 17 heatmaps at 64x64 for 512 px
    c.generate = ml_collections.ConfigDict(dict(scheduler="pndm", steps=50, guidance=5.0))  # §2.1, §5
    if arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (expected none)")
    return c
