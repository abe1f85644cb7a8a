"""Training-free attention labels (Dataset Diffusion) on the shapes world, through `datasetdm generate`.

Run: ``datasetdm generate --config configs/shapes_attention.py --num_images N --out DIR`` (no
training needed). Variant ``:both`` labels each image with the trained semantic P-Decoder
(``workdir`` of configs/shapes_semantic.py) and the attention labeller in one sampler pass
(``labeler: decoder+attention``; records hold ``segmentation`` and ``attention_label``).

The shapes model's latent is 16x16 and its UNet attends at feature heights 16, 8 and 4 (mid
block). The paper's quarter-resolution cross-attention would be 4x4, a cell per 16x16 image
pixels, coarser than most shapes; 8x8 (``cross_res: 8``) is the finest grid the class maps can
have here, with self-attention at half the latent (8x8) as in the paper.
"""

import os

from datasetdm_jax.config_utils import load_config


def labeler_config(append_class_names=True):
    """The attention labeller's shapes-world settings (tau, thresholds: the paper's defaults)."""
    import ml_collections

    return ml_collections.ConfigDict(dict(tau=4, threshold=0.6, uncertainty_threshold=0.5, self_res=8, cross_res=8,
                                          append_class_names=append_class_names))


def get_config(arg=None):
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_semantic.py"))
    c.name = "shapes_attention"
    c.generate.labeler = "attention"
    c.generate.labeler_config = labeler_config()
    if arg == "both":
        # Same images as the plain P-Decoder labeller: the captions already name every shape, so the
        # class names are not appended (the class prompt is still used as attention keys).
        c.generate.labeler = "decoder+attention"
        c.generate.labeler_config.append_class_names = False
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (expected 'both' or none)")
    return c
