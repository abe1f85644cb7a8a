"""P-Decoder for Cityscapes semantic segmentation (19 train ids), the paper's setting.

Run: ``datasetdm train --config configs/cityscapes_semantic.py data.root=/path/to/cityscapes``
(rerun to resume). Values marked "official" are those of the official DatasetDM code. Shared settings:
datasetdm_jax/config_common.py.
"""

import ml_collections

from datasetdm_jax import config_common as common


def get_config(arg=None):
    common.check_variant(arg)
    c = common.sd14_pdecoder(
        "semantic", "cityscapes_semantic",
        steps=40000,
        num_classes=19,              # train ids 0..18 (no background class), 255 ignore
        deep_supervision=False,      # official: no auxiliary losses
        num_points=12544,            # official: point samples for matching and mask losses
        eval_every=5000,
        # Official few-shot selection: per class up to `limit` frames whose class covers > 10000 px
        # (script limit 10, cap 19 x limit); labels resized with nearest here (official: bilinear,
        # which corrupts boundaries); 512x512.
        data=dict(source="cityscapes", root="data/cityscapes", split="train", image_size=512, resize="crop",
                  label_kind="labelIds", num_images=190, per_class=10, min_pixels=10000, max_objects=1, flip=True,
                  seed=0),
        eval_split="val", eval_images=500,
    )
    # Official decoder: hidden 256, 10 layers, 8 heads, FFN 2048, 100 queries (Cityscapes/COCO).
    c.decoder = ml_collections.ConfigDict(dict(hidden=256, num_queries=100, num_layers=10, heads=8, ffn=2048))
    c.generate = common.sd14_generate(guidance=5.0)
    return c
