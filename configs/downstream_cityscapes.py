"""Downstream semantic segmentation on Cityscapes (19 classes) with generated data.

    datasetdm downstream --config configs/downstream_cityscapes.py \
        synthetic.records=runs/generate_cityscapes/records real.root=data/cityscapes

Rows: (a) real only (the paper's few-shot selection, ``real.per_class`` frames per class), (b)
generated only, (c) both; evaluated on val. The data sources scale the short side to
``image_size`` and centre-crop a square, so evaluation sees the centre 1024x1024 of each frame.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.name = "downstream_cityscapes"
    c.workdir = "runs/downstream_cityscapes"
    c.tasks = ("semantic",)
    c.rows = ("real", "synthetic", "real+synthetic")
    c.synthetic_fraction = 0.5
    c.real = ml_collections.ConfigDict(dict(source="cityscapes", root="data/cityscapes", split="train", per_class=5,
                                            min_pixels=10000, label_kind="labelIds", seed=0, image_size=512,
                                            resize="crop"))
    c.synthetic = ml_collections.ConfigDict(dict(records="", num=0, min_quality=0.0))  # min_quality 0 = no filter
    c.test = ml_collections.ConfigDict(dict(source="cityscapes", root="data/cityscapes", splits=("val",), num=0,
                                            label_kind="labelIds", seed=0, image_size=512, resize="crop"))
    c.augment = ml_collections.ConfigDict(dict(enabled=True, flip=True, scale=(0.5, 2.0), crop=(512, 512),
                                               scale_depth=True))
    c.eval = ml_collections.ConfigDict(dict(batch_size=8, min_depth=1e-3, max_depth=0.0))
    c.semantic = ml_collections.ConfigDict(dict(
        task="semantic", num_classes=19, steps=40000, batch_size=16, lr=1e-3, weight_decay=1e-4,
        warmup_steps=500, grad_clip=1.0, seed=0, log_every=50, depth_loss="silog",
        model=dict(stages=((64, 2, 1), (128, 2, 1), (256, 2, 1), (512, 1, 2)), depth=3, aspp_width=256,
                   aspp_rates=(6, 12, 18), skip_stage=1, skip_width=48, decoder_width=256)))
    if arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (expected none)")
    return c
