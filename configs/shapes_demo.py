"""`datasetdm demo`: the shapes-world proof of DatasetDM, end to end, no downloads.

Stages (each cached in the workdir, so a second run is fast): train the P-Decoders (semantic and
depth) on 100 labelled real images through the shipped shapes-world SD; generate an annotated
synthetic dataset; train the downstream segmenter and depth net on (a) real, (b) synthetic,
(c) real + synthetic, and the segmenter on (d) synthetic with attention labels, (e) real + those,
(f) synthetic with the consensus of both labellers (pixels where they disagree ignored);
evaluate on the real test and domain-shifted splits; print the table, write report.json and
figure.png. Variant ``:small`` (minutes; Colab quickstart and tests).
"""

import os

import ml_collections

from datasetdm_jax.config_utils import load_config


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.workdir = "runs/demo"
    c.model = ""                      # "" = the shipped shapes-world SD (datasetdm_jax/assets/shapes_sd)
    # P-Decoders: the task configs, their steps, the real test images their own score is measured
    # on, and more key=value overrides of the task config (e.g. "decoders.depth.overrides=('lr=1e-3',)").
    c.decoders = ml_collections.ConfigDict(dict(
        # The per-pixel head labels real test images better than the official Mask2Former head at
        # half the training time (1,000 steps, test mIoU all classes / grounded: 57.4 / 64.0 against
        # 46.0 / 56.0; docs/experiments/decoder_recipes.md).
        semantic=ml_collections.ConfigDict(dict(config="shapes_semantic_per_pixel.py", steps=1000, eval_images=256,
                                                overrides=())),
        # Each reads its own feature pass in the one sampler pass: semantic re-noised to its 400,
        # depth the last sampler step (its timestep 0: test REL 0.137 against 0.153 at 400).
        depth=ml_collections.ConfigDict(dict(config="shapes_depth.py", steps=600, eval_images=256, overrides=())),
    ))
    # Generation: one sampler pass labels each image with every decoder (semantic + depth).
    # guidance 3: one-object fidelity (25 PNDM steps) is class 0.72 / colour 0.975 at 3 on the shipped
    # model; the 10,000-step one gave 0.61 / 0.95 at 3 against 0.52 / 0.71 at 7.5, whose images are
    # over-saturated (`datasetdm exp fidelity --guidance`).
    # Labels follow the prompt (grounding "prompt": classes the prompt does not name are never
    # labelled); "none" is the ungrounded argmax over all classes, for comparison.
    c.generate = ml_collections.ConfigDict(dict(num_images=1024, steps=15, guidance=3.0, scheduler="dpmpp_2m",
                                                batch_size=32, seed=0, shard_size=256, grounding="prompt",
                                                grounding_threshold=0.0))
    # The training-free attention labeller labels the same images in that same pass (rows d, e);
    # settings from configs/shapes_attention.py:both (cross_res 8, captions not appended).
    here = os.path.dirname(os.path.abspath(__file__))
    c.attention = ml_collections.ConfigDict(dict(
        enabled=True, labeler=load_config(os.path.join(here, "shapes_attention.py:both")).generate.labeler_config))
    # 1,000 segmenter steps at the learning rate that trains (a) real-only best on held-out real
    # images (configs/downstream_shapes.py); every row trains with that same recipe.
    # ``overrides``: key=value for that config (e.g. "downstream.overrides=('semantic.lr=2e-3',)").
    c.downstream = ml_collections.ConfigDict(dict(config="downstream_shapes.py", semantic_steps=1000,
                                                  depth_steps=700, test_images=256, overrides=()))
    # What the paper claims, checked against the measured table (reported either way).
    c.claims = ml_collections.ConfigDict(dict(min_miou_gain=5.0))
    if arg == "small":
        c.workdir = "runs/demo_small"
        c.decoders.semantic.steps, c.decoders.depth.steps = 60, 40
        c.decoders.semantic.eval_images = c.decoders.depth.eval_images = 32
        c.generate.num_images, c.generate.steps, c.generate.batch_size, c.generate.shard_size = 64, 10, 16, 32
        c.downstream.semantic_steps, c.downstream.depth_steps, c.downstream.test_images = 60, 60, 64
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (expected 'small' or none)")
    return c
