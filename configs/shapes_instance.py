"""P-Decoder training for class-aware instance segmentation on the shapes world.

Mask2Former-style head with Hungarian matching on class + mask costs; unlike the official code
(class-agnostic, every label 1) each query predicts the object's class. Scored with COCO mask AP
(class-aware, plus the class-agnostic AP of the official protocol).

Run: ``datasetdm train --config configs/shapes_instance.py`` (rerun to resume). The frozen model is
the shipped shapes-world SD (made by ``datasetdm pretrain --config configs/shapes_sd.py``);
``pipeline=PATH`` picks another diffusers-format folder. Variant ``:tiny`` is for tests.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "instance"
    c.name = "shapes_instance"
    c.pipeline = ""                  # "" = the shipped shapes-world SD (datasetdm_jax/assets/shapes_sd)
    c.workdir = "runs/shapes_instance"
    c.capture = "datasetdm"          # features preset: 'datasetdm' or 'lean'
    c.timestep = 0                   # official: DDPM set_timesteps(50) -> timesteps[-1] = 0 (reference §2.1)
    c.seed = 42
    c.steps = 3000
    c.max_steps = 0                  # > 0: stop this invocation after that many steps (resumable)
    c.batch_size = 4
    c.lr = 1e-4                      # Adam, no weight decay (official)
    c.deep_supervision = False       # Mask2Former aux losses on every decoder layer (official: off)
    c.num_points = 12544 // 16       # loss point samples per mask; 64 px images have 4096 pixels
    c.top_k = 20                     # (query, class) pairs kept per image at inference
    c.log_every = 10
    c.eval_every = 500
    c.checkpoint_every_s = 300.0
    c.keep_checkpoints = 2
    c.data = ml_collections.ConfigDict(dict(split="train_labelled", num_images=100, seed=0, image_size=64,
                                            flip=True))
    # val: scored every eval_every steps (test-distribution scenes of another seed); eval: the test
    # split, scored once at the end into results.json.
    c.val = ml_collections.ConfigDict(dict(split="test", seed=1, num_images=32, batch_size=8))
    c.eval = ml_collections.ConfigDict(dict(split="test", seed=0, num_images=256, batch_size=8))
    # At most 3 objects per scene: 10 queries are plenty.
    c.decoder = ml_collections.ConfigDict(dict(hidden=64, num_queries=10, num_layers=6, heads=4, ffn=256))
    # `datasetdm generate --config configs/shapes_instance.py --num_images N --out DIR`: prompts (kind shapes,
    # templates or file; see datasetdm_jax/prompts.py), sampler, and the labeller ('decoder': the
    # P-Decoder `datasetdm train` wrote to `workdir`). Instances: one per decoder query (its best
    # class), score = class prob x mean in-mask sigmoid, kept if >= score_threshold (official 0.4),
    # at most max_instances (official 20) of at least min_area pixels (datasetdm_jax/decoders/postprocess.py).
    c.generate = ml_collections.ConfigDict(dict(
        prompts=ml_collections.ConfigDict(dict(kind="shapes", seed=0, domain="full", path="", classes=(),
                                               templates=(), max_classes=1)),
        steps=25, guidance=7.5, scheduler="pndm", negative_prompt="", batch_size=16, seed=0,
        labeler="decoder", shard_size=256, image_format="png",
        score_threshold=0.4, max_instances=20, min_area=16,
    ))
    if arg == "tiny":
        c.steps, c.batch_size, c.num_points, c.log_every, c.eval_every, c.lr = 4, 2, 64, 1, 2, 1e-3
        c.data.num_images, c.data.image_size, c.data.flip = 8, 32, True
        c.eval.num_images, c.eval.batch_size = 4, 2
        c.val.num_images, c.val.batch_size = 2, 2
        c.top_k = 5
        c.decoder = ml_collections.ConfigDict(dict(hidden=32, num_queries=6, num_layers=2, heads=4, ffn=64))
        c.generate.steps, c.generate.batch_size, c.generate.shard_size = 2, 2, 3
        c.generate.max_instances, c.generate.min_area = 4, 1
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (expected 'tiny' or none)")
    return c
