"""Downstream semantic segmentation on Cityscapes (19 classes) with generated data.

    datasetdm downstream --config configs/downstream_cityscapes.py \
        synthetic.records=runs/generate_cityscapes/records real.root=data/cityscapes

Rows: (a) real only (the paper's few-shot selection, ``real.per_class`` frames per class), (b)
generated only, (c) both; evaluated on val. The data sources scale the short side to
``image_size`` and centre-crop a square, so evaluation sees the centre 1024x1024 of each frame.
Shared settings: datasetdm_jax/config_common.py.
"""

from datasetdm_jax import config_common as common


def get_config(arg=None):
    common.check_variant(arg)
    c = common.downstream(
        "downstream_cityscapes", ("semantic",),
        real=dict(source="cityscapes", root="data/cityscapes", split="train", per_class=5, min_pixels=10000,
                  label_kind="labelIds", seed=0, image_size=512, resize="crop"),
        test=dict(source="cityscapes", root="data/cityscapes", splits=("val",), num=0, label_kind="labelIds", seed=0,
                  image_size=512, resize="crop"),
        scale=(0.5, 2.0), crop=(512, 512), eval_batch_size=8,
    )
    c.semantic = common.downstream_task("semantic", 19, 40000, common.deeplab_v3plus())
    return c
