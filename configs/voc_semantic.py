"""P-Decoder for PASCAL VOC 2012 semantic segmentation, the paper's setting.

Run: ``datasetdm train --config configs/voc_semantic.py data.root=/path/to/VOCdevkit/VOC2012``
(rerun to resume). Values marked "official" are those of the official DatasetDM code. The frozen
model is SD 1.4 in diffusers format (safetensors), as in the official code. Shared settings:
datasetdm_jax/config_common.py.
"""

import ml_collections

from datasetdm_jax import config_common as common
from datasetdm_jax.data.voc import CLASSES, PROMPT_NAMES  # label value -> class name; its words in prompts


def get_config(arg=None):
    common.check_variant(arg)
    c = common.sd14_pdecoder(
        "semantic", "voc_semantic",
        # Official: StepLR x0.1 every 350 epochs, 5000 epochs nominal ("train until stopped"); 100 images
        # at batch 1 -> 350 epochs = 35000 steps. train.py uses a constant lr for now.
        steps=40000,
        num_classes=21,              # background + 20 VOC classes (label values 0..20, 255 ignore)
        deep_supervision=False,      # official: no auxiliary losses
        num_points=12544,            # official: point samples for matching and mask losses
        eval_every=5000,
        # Official few-shot selection: 512x512 inputs; 5 images per class -> 100, single-class label
        # maps whose class covers > 18000 px (list file Selected_File/VOC/100.txt); prompt "a photo of a {class}".
        data=dict(source="voc", root="data/VOCdevkit/VOC2012", split="train_aug", image_size=512, resize="crop",
                  num_images=100, per_class=5, min_pixels=18000, max_objects=1, flip=True, seed=0),
        eval_split="val", eval_images=1449,
    )
    # Official decoder: Mask2Former-style head, hidden 256, 10 layers, 8 heads, FFN 2048, 20 queries (VOC).
    # 21 queries: the official code uses 20, but our semantic targets have one slot per class (21 with
    # background) and Hungarian matching needs a query for each.
    c.decoder = ml_collections.ConfigDict(dict(hidden=256, num_queries=21, num_layers=10, heads=8, ffn=2048))
    # `datasetdm generate --config configs/voc_semantic.py --num_images N --out DIR` labels with the
    # decoder trained in `workdir`. Official generation: CFG 7 for VOC, one prompt per image naming one
    # class, "a photo of a {class}" over the 20 classes; the label keeps that class (and background).
    c.generate = common.sd14_generate(
        guidance=7.0,
        prompts=dict(classes=CLASSES[1:], words=dict(PROMPT_NAMES)),
        min_area=256,                # classes covering fewer pixels of a 512 x 512 image become background
    )
    return c
