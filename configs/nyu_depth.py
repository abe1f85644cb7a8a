"""P-Decoder for NYU Depth v2 (labelled, 795 train / 654 test), the paper's setting.

Run: ``datasetdm train --config configs/nyu_depth.py data.root=/path/to/nyu`` where the folder
holds nyu_depth_v2_labeled.mat + splits.mat, or the extracted train/ and test/ folders (see
datasetdm_jax/data/nyu.py). Numbers cite ../shared/reference/datasetdm_official_code.md.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "depth"
    c.name = "nyu_depth"
    c.pipeline = "models/stable-diffusion-v1-4"  # §1
    c.workdir = "runs/nyu_depth"
    c.capture = "datasetdm"          # §2.2-2.3
    c.timestep = 0                   # §2.1
    c.seed = 42                      # §4
    c.batch_size = 1                 # §4
    c.lr = 1e-4                      # §4: Adam; StepLR x0.1 every 400 epochs for NYU (not yet in train.py)
    c.steps = 100000                 # 400 epochs of 250 images at batch 1
    c.max_steps = 0
    c.num_points = 0                 # unused by depth
    c.log_every = 50
    c.eval_every = 10000
    c.checkpoint_every_s = 600.0
    c.keep_checkpoints = 2
    # §4 table: 250 random train frames (official list Selected_File/NYU/250.txt; here a seeded
    # random subset of the 795); 512x512; depth in metres ([-1, 1] images, not [0, 1], §8.5).
    c.data = ml_collections.ConfigDict(dict(
        source="nyu", root="data/nyu", split="train", image_size=512, resize="crop", num_images=250,
        max_objects=1, flip=True, seed=0))
    c.val = ml_collections.ConfigDict(dict(split="test", seed=1, num_images=100, batch_size=1))  # every eval_every
    c.eval = ml_collections.ConfigDict(dict(split="test", seed=0, num_images=654, batch_size=1))  # at end
    # §3.3: sigmoid x max depth 10 m; the official head is 1024-channel 3x3 convs at 512x512.
    c.decoder = ml_collections.ConfigDict(dict(hidden=256, max_depth=10.0, head_channels=1024))
    c.generate = ml_collections.ConfigDict(dict(scheduler="pndm", steps=50, guidance=5.0))  # §2.1, §5
    if arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (expected none)")
    return c
