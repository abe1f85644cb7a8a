"""Downstream semantic segmentation on PASCAL VOC 2012 with generated data (DatasetDM Table 1).

    datasetdm downstream --config configs/downstream_voc.py synthetic.records=runs/generate_voc/records \
        real.root=data/VOCdevkit/VOC2012

Rows: (a) 100 real VOC train images, (b) the generated records, (c) both (half of each batch
synthetic); evaluated on VOC val. Images are resized and centre-cropped to ``image_size`` by the data sources. Widths are DeepLabv3+-like but trained from scratch (no ImageNet backbone), so absolute
numbers sit below the paper's; the real-vs-synthetic comparison is what it measures.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.name = "downstream_voc"
    c.workdir = "runs/downstream_voc"
    c.tasks = ("semantic",)
    c.rows = ("real", "synthetic", "real+synthetic")
    c.synthetic_fraction = 0.5
    # The paper's few-shot selection: 5 images per class (100 images), as in `datasetdm train`.
    c.real = ml_collections.ConfigDict(dict(source="voc", root="data/VOCdevkit/VOC2012", split="train_aug",
                                            per_class=5, min_pixels=18000, seed=0, image_size=512, resize="crop"))
    c.synthetic = ml_collections.ConfigDict(dict(records="", num=0, min_quality=0.0))  # min_quality 0 = no filter
    c.test = ml_collections.ConfigDict(dict(source="voc", root="data/VOCdevkit/VOC2012", splits=("val",), num=0,
                                            seed=0, image_size=512, resize="crop"))
    c.augment = ml_collections.ConfigDict(dict(enabled=True, flip=True, scale=(0.5, 2.0), crop=(512, 512),
                                               scale_depth=True))
    c.eval = ml_collections.ConfigDict(dict(batch_size=16, min_depth=1e-3, max_depth=0.0))
    c.semantic = ml_collections.ConfigDict(dict(
        task="semantic", num_classes=21, steps=20000, batch_size=16, lr=1e-3, weight_decay=1e-4,
        warmup_steps=500, grad_clip=1.0, seed=0, log_every=50, depth_loss="silog",
        model=dict(stages=((64, 2, 1), (128, 2, 1), (256, 2, 1), (512, 1, 2)), depth=3, aspp_width=256,
                   aspp_rates=(6, 12, 18), skip_stage=1, skip_width=48, decoder_width=256)))
    if arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (expected none)")
    return c
