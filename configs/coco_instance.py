"""P-Decoder for COCO 2017 instance segmentation, class-aware (the official code is
class-agnostic, §8.2), otherwise the paper's setting.

Run: ``datasetdm train --config configs/coco_instance.py data.root=/path/to/coco`` (rerun to
resume). Numbers cite ../shared/reference/datasetdm_official_code.md.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "instance"
    c.name = "coco_instance"
    c.pipeline = "models/stable-diffusion-v1-4"  # §1
    c.workdir = "runs/coco_instance"
    c.capture = "datasetdm"          # §2.2-2.3
    c.timestep = 0                   # §2.1
    c.seed = 42                      # §4
    c.batch_size = 1                 # §4
    c.lr = 1e-4                      # §4: Adam, no weight decay; StepLR x0.1 every 350 epochs (not yet in train.py)
    c.steps = 140000                 # 350 epochs of 400 images at batch 1
    c.max_steps = 0
    c.num_classes = 81               # background + 80 COCO categories (contiguous ids 1..80)
    c.deep_supervision = False       # §3.1
    c.top_k = 20                     # §5: top-20 instances kept per image
    c.num_points = 12544             # §4
    c.log_every = 50
    c.eval_every = 10000
    c.checkpoint_every_s = 600.0
    c.keep_checkpoints = 2
    # §4 table: 5 images per class with an instance > 10000 px -> 400 (README weights); instances
    # < 500 px dropped; 512x512. At most max_objects GT instances per image (largest first).
    c.data = ml_collections.ConfigDict(dict(
        source="coco_instance", root="data/coco", split="train2017", image_size=512, resize="crop",
        num_images=400, per_class=5, min_area=10000.0, min_instance_area=500.0, max_objects=20, flip=True, seed=0))
    c.val = ml_collections.ConfigDict(dict(split="val2017", seed=1, num_images=100, batch_size=1))  # every eval_every
    c.eval = ml_collections.ConfigDict(dict(split="val2017", seed=0, num_images=5000, batch_size=1))  # at end
    # §3.1: hidden 256, 10 layers, 8 heads, FFN 2048, 100 queries.
    c.decoder = ml_collections.ConfigDict(dict(hidden=256, num_queries=100, num_layers=10, heads=8, ffn=2048))
    c.generate = ml_collections.ConfigDict(dict(scheduler="pndm", steps=50, guidance=5.0))  # §2.1, §5
    if arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (expected none)")
    return c
