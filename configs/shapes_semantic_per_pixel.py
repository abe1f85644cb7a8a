"""The semantic P-Decoder the demo labels with: shapes_semantic.py's recipe with a per-pixel
classifier head (`decoders.per_pixel`) instead of the official Mask2Former head.

Why: on 100 labelled images of the shapes world the per-pixel head labels real test images better
than the Mask2Former head on the same features (docs/experiments/decoder_recipes.md), as a per-pixel
segmenter trained from scratch does there. Run: ``datasetdm train --config
configs/shapes_semantic_per_pixel.py``. Variant ``:tiny`` is for tests.
"""

import ml_collections

from datasetdm_jax import config_common as common
from datasetdm_jax.config_utils import load_config


def get_config(arg=None):
    common.check_variant(arg, "tiny")
    c = load_config(__file__.replace("_per_pixel.py", ".py") + (":tiny" if arg == "tiny" else ""))
    c.name = "shapes_semantic_per_pixel"
    c.workdir = "runs/shapes_semantic_per_pixel"
    c.semantic_head = "per_pixel"
    c.deep_supervision = False       # a Mask2Former setting: one prediction, no per-layer losses
    c.batch_size = 8
    c.decoder = ml_collections.ConfigDict(dict(hidden=32 if arg == "tiny" else 64))
    return c
