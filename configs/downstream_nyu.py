"""Downstream depth estimation on NYU Depth V2 with generated data (DatasetDM Table 1: 50 real images).

    datasetdm downstream --config configs/downstream_nyu.py synthetic.records=runs/generate_nyu/records \
        real.root=data/nyu_depth_v2

Rows: (a) 50 real train images, (b) generated only, (c) both; evaluated on the 654 test images
(REL, RMSE, delta1 over 1e-3 < depth <= 10 m) on the centre 480x480 square of each frame.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.name = "downstream_nyu"
    c.workdir = "runs/downstream_nyu"
    c.tasks = ("depth",)
    c.rows = ("real", "synthetic", "real+synthetic")
    c.synthetic_fraction = 0.5
    c.real = ml_collections.ConfigDict(dict(source="nyu", root="data/nyu_depth_v2", split="train", num_images=50,
                                            seed=0, image_size=480, resize="crop"))
    c.synthetic = ml_collections.ConfigDict(dict(records="", num=0, min_quality=0.0))  # min_quality 0 = no filter
    c.test = ml_collections.ConfigDict(dict(source="nyu", root="data/nyu_depth_v2", splits=("test",), num=0,
                                            seed=0, image_size=480, resize="crop"))
    c.augment = ml_collections.ConfigDict(dict(enabled=True, flip=True, scale=(1.0, 1.25), crop=(416, 416),
                                               scale_depth=True))
    c.eval = ml_collections.ConfigDict(dict(batch_size=8, min_depth=1e-3, max_depth=10.0))
    c.depth = ml_collections.ConfigDict(dict(
        task="depth", num_classes=1, steps=20000, batch_size=16, lr=1e-3, weight_decay=1e-4,
        warmup_steps=500, grad_clip=1.0, seed=0, log_every=50, depth_loss="silog",
        model=dict(widths=(32, 64, 128, 256, 512), depth=3, init_depth=3.0, stem_stride=2)))
    if arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (expected none)")
    return c
