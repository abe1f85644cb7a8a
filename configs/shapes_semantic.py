"""P-Decoder training for semantic segmentation on the shapes world (the official recipe, with the
changes below).

Run: ``datasetdm train --config configs/shapes_semantic.py`` (rerun to resume). The frozen model is
the shipped shapes-world SD (made by ``datasetdm pretrain --config configs/shapes_sd.py``);
``pipeline=PATH`` picks another diffusers-format folder. Variant ``:tiny`` is for tests (few
steps, few points, tiny decoder). Shared settings: datasetdm_jax/config_common.py.
"""

import ml_collections

from datasetdm_jax import config_common as common


def get_config(arg=None):
    common.check_variant(arg, "tiny")
    c = common.shapes_pdecoder(
        "semantic",
        deep_supervision=True,       # Mask2Former aux losses on every decoder layer (official: off);
                                     # semantic, 3,000 steps: test mIoU 0.362 with, 0.335 without
        num_points=12544 // 16,      # loss point samples per mask; 64 px images have 4096 pixels
    )
    c.semantic_head = "mask2former"  # official; "per_pixel": configs/shapes_semantic_per_pixel.py (the demo's)
    c.decoder = ml_collections.ConfigDict(dict(hidden=64, num_queries=10, num_layers=6, heads=4, ffn=256))
    # `datasetdm generate --config configs/shapes_semantic.py --num_images N --out DIR`.
    c.generate = common.shapes_generate(
        min_area=16,                 # semantic: classes covering fewer pixels of an image become background
    )
    if arg == "tiny":
        common.shapes_tiny(c)
        c.num_points, c.data.flip = 64, False
        c.decoder = ml_collections.ConfigDict(dict(hidden=32, num_queries=10, num_layers=2, heads=4, ffn=64))
    return c
