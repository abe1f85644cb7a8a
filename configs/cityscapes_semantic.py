"""P-Decoder for Cityscapes semantic segmentation (19 train ids), the paper's setting.

Run: ``datasetdm train --config configs/cityscapes_semantic.py data.root=/path/to/cityscapes``
(rerun to resume). Values marked "official" are those of the official DatasetDM code. Shared settings:
datasetdm_jax/config_common.py.
"""

import ml_collections

from datasetdm_jax import config_common as common
from datasetdm_jax.data.cityscapes import CLASSES  # train id -> class name


# Classes of every street scene (Cityscapes' "flat", "construction", "object", "nature" and "sky"
# groups): allowed in every generated label, whichever class the prompt names.
STUFF = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
         "terrain", "sky")


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
    # `datasetdm generate --config configs/cityscapes_semantic.py --num_images N --out DIR`. Official
    # generation: every class in turn, "a photo of {a description of it}" (GPT-written lists, not
    # shipped here), CFG 5, argmax over all classes. Here: "a photo of a {class} in an urban street" over
    # the 19 classes (the training captions' form). Labels follow the prompt for the object classes;
    # the street's "stuff", present in every frame whatever the prompt names, is always allowed.
    # No min_area: there is no background class to fold small regions (poles, lights) into.
    c.generate = common.sd14_generate(
        guidance=5.0,
        prompts=dict(classes=CLASSES, templates=("a photo of {a_class} in an urban street",)),
        grounding_always=STUFF, min_area=0,
    )
    return c
