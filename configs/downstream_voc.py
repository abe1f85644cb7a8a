"""Downstream semantic segmentation on PASCAL VOC 2012 with generated data (DatasetDM Table 1).

    datasetdm downstream --config configs/downstream_voc.py synthetic.records=runs/generate_voc/records \
        real.root=data/VOCdevkit/VOC2012

Rows: (a) 100 real VOC train images, (b) the generated records, (c) both (half of each batch
synthetic); evaluated on VOC val. Images are resized and centre-cropped to ``image_size`` by the
data sources. Widths are DeepLabv3+-like but trained from scratch (no ImageNet backbone), so
absolute numbers sit below the paper's; the real-vs-synthetic comparison is what it measures.
Shared settings: datasetdm_jax/config_common.py.
"""

from datasetdm_jax import config_common as common


def get_config(arg=None):
    common.check_variant(arg)
    c = common.downstream(
        "downstream_voc", ("semantic",),
        # The paper's few-shot selection: 5 images per class (100 images), as in `datasetdm train`.
        real=dict(source="voc", root="data/VOCdevkit/VOC2012", split="train_aug", per_class=5, min_pixels=18000,
                  seed=0, image_size=512, resize="crop"),
        test=dict(source="voc", root="data/VOCdevkit/VOC2012", splits=("val",), num=0, seed=0, image_size=512,
                  resize="crop"),
        scale=(0.5, 2.0), crop=(512, 512), eval_batch_size=16,
    )
    c.semantic = common.downstream_task("semantic", 21, 20000, common.deeplab_v3plus())
    return c
