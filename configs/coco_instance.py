"""P-Decoder for COCO 2017 instance segmentation, class-aware (the official code is
class-agnostic: every instance labelled 1), otherwise the paper's setting.

Run: ``datasetdm train --config configs/coco_instance.py data.root=/path/to/coco`` (rerun to
resume). Values marked "official" are those of the official DatasetDM code. Shared settings:
datasetdm_jax/config_common.py.
"""

import ml_collections

from datasetdm_jax import config_common as common


def get_config(arg=None):
    common.check_variant(arg)
    c = common.sd14_pdecoder(
        "instance", "coco_instance",
        steps=140000,                # 350 epochs of 400 images at batch 1
        num_classes=81,              # background + 80 COCO categories (contiguous ids 1..80)
        deep_supervision=False,      # official: no auxiliary losses
        top_k=20,                    # official: top-20 instances kept per image
        num_points=12544,            # official: point samples for matching and mask losses
        eval_every=10000,
        # Official few-shot selection: 5 images per class with an instance > 10000 px -> 400; instances
        # < 500 px dropped; 512x512. At most max_objects GT instances per image (largest first).
        data=dict(source="coco_instance", root="data/coco", split="train2017", image_size=512, resize="crop",
                  num_images=400, per_class=5, min_area=10000.0, min_instance_area=500.0, max_objects=20, flip=True,
                  seed=0),
        eval_split="val2017", eval_images=5000,
    )
    # Official decoder: hidden 256, 10 layers, 8 heads, FFN 2048, 100 queries.
    c.decoder = ml_collections.ConfigDict(dict(hidden=256, num_queries=100, num_layers=10, heads=8, ffn=2048))
    # `datasetdm generate --config configs/coco_instance.py --num_images N --out DIR`. Official
    # generation: "a photo of a {class}" over the 80 categories (each with GPT-written sub-types), CFG 5.
    # Here the prompt classes are the dataset's own (from the annotation file of `data.split`, so
    # `data.root` must point at COCO when generating). Instances: one per decoder query under its best
    # class named by the prompt, score = class prob x mean in-mask sigmoid, kept if >= score_threshold
    # (official 0.4), at most max_instances (official 20) (datasetdm_jax/decoders/postprocess.py).
    c.generate = common.sd14_generate(guidance=5.0, score_threshold=0.4, max_instances=20, min_area=0)
    return c
