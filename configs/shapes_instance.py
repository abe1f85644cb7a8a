"""P-Decoder training for class-aware instance segmentation on the shapes world.

Mask2Former-style head with Hungarian matching on class + mask costs; unlike the official code
(class-agnostic, every label 1) each query predicts the object's class. Scored with COCO mask AP
(class-aware, plus the class-agnostic AP of the official protocol).

Run: ``datasetdm train --config configs/shapes_instance.py`` (rerun to resume). The frozen model is
the shipped shapes-world SD (made by ``datasetdm pretrain --config configs/shapes_sd.py``);
``pipeline=PATH`` picks another diffusers-format folder. Variant ``:tiny`` is for tests. Shared
settings: datasetdm_jax/config_common.py.
"""

import ml_collections

from datasetdm_jax import config_common as common


def get_config(arg=None):
    common.check_variant(arg, "tiny")
    c = common.shapes_pdecoder(
        "instance",
        deep_supervision=True,       # Mask2Former aux losses on every decoder layer (official: off);
                                     # semantic, 3,000 steps: test mIoU 0.362 with, 0.335 without
        num_points=12544 // 16,      # loss point samples per mask; 64 px images have 4096 pixels
        top_k=20,                    # (query, class) pairs kept per image at inference
    )
    # Instance masks want less noise than semantic's timestep 400 (precise edges) but not none (the
    # class): 1,500 steps, 128 test images, mask AP 13.1 / 15.4 / 17.3% at timestep 400 / 0 / 100
    # (AP75 11.5 / 16.6 / 16.9, AP50 28.1 / 25.6 / 30.6; validation AP 23.0 / 30.5 / 34.1). Generation
    # re-noises to it (generate.feature_pass=renoise).
    c.timestep = 100
    # The UNet's finest map is the latent's 16 px: masks upsampled from it are blunt (proof, timestep
    # 400: class-agnostic AP 20.6 vs the scratch CNN's 51.3). The frozen VAE decoder's 32 and 64 px maps
    # add the geometry (not in the paper; free in generation, where the decoder runs anyway): 3,000
    # steps, 25,500-step model, 256 test images: mask AP 30.1% (AP50 48.2, AP75 30.3, class-agnostic
    # 34.4) against the scratch model's 21.6% (docs/experiments/p_decoder_vs_scratch.md). Mask
    # features are then 160 px (2.5 x 64), as the scratch model's; ~1 step/s here instead of ~7.
    c.vae_features = (32, 64)
    # At most 3 objects per scene: 10 queries are plenty.
    c.decoder = ml_collections.ConfigDict(dict(hidden=64, num_queries=10, num_layers=6, heads=4, ffn=256))
    # `datasetdm generate --config configs/shapes_instance.py --num_images N --out DIR`. Instances: one
    # per decoder query (its best class), score = class prob x mean in-mask sigmoid, kept if >=
    # score_threshold (official 0.4), at most max_instances (official 20) of at least min_area pixels
    # (datasetdm_jax/decoders/postprocess.py).
    c.generate = common.shapes_generate(score_threshold=0.4, max_instances=20, min_area=16)
    if arg == "tiny":
        common.shapes_tiny(c)
        c.vae_features = (32,)  # the tiny test SD's VAE decoder map above its latent
        c.num_points, c.top_k = 64, 5
        c.decoder = ml_collections.ConfigDict(dict(hidden=32, num_queries=6, num_layers=2, heads=4, ffn=64))
        c.generate.max_instances, c.generate.min_area = 4, 1
    return c
