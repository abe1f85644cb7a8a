"""P-Decoder training for depth on the shapes world (reference §4: SILog loss).

Run: ``datasetdm train --config configs/shapes_depth.py`` (rerun to resume). The frozen model is
the shipped shapes-world SD (made by ``datasetdm pretrain --config configs/shapes_sd.py``);
``pipeline=PATH`` picks another diffusers-format folder. Variant ``:tiny`` is for tests.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "depth"
    c.name = "shapes_depth"
    c.pipeline = ""                 # "" = the shipped shapes-world SD (datasetdm_jax/assets/shapes_sd)
    c.workdir = "runs/shapes_depth"
    c.capture = "datasetdm"
    c.timestep = 0                   # official: DDPM set_timesteps(50) -> timesteps[-1] = 0 (reference §2.1)
    c.seed = 42
    c.steps = 3000
    c.max_steps = 0
    c.batch_size = 4
    c.lr = 1e-4
    c.num_points = 0                 # unused by depth
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
    # The official head runs two 3x3 convs at full resolution; a 32-channel head keeps it cheap.
    c.decoder = ml_collections.ConfigDict(dict(hidden=64, max_depth=10.0, head_channels=32))
    # `datasetdm generate --config configs/shapes_depth.py --num_images N --out DIR`: prompts (kind shapes,
    # templates or file; see datasetdm_jax/prompts.py), sampler, and the labeller ('decoder': the
    # P-Decoder `datasetdm train` wrote to `workdir`; other names come from datasetdm_jax.labelers).
    c.generate = ml_collections.ConfigDict(dict(
        prompts=ml_collections.ConfigDict(dict(kind="shapes", seed=0, domain="full", path="", classes=(),
                                               templates=(), max_classes=1)),
        steps=25, guidance=7.5, scheduler="pndm", negative_prompt="", batch_size=16, seed=0,
        labeler="decoder", shard_size=256, image_format="png",
        min_area=0,                 # semantic: classes covering fewer pixels of an image become background
    ))
    if arg == "tiny":
        c.steps, c.batch_size, c.log_every, c.eval_every, c.lr = 4, 2, 1, 2, 1e-3
        c.data.num_images, c.data.image_size, c.data.flip = 8, 32, False
        c.eval.num_images, c.eval.batch_size = 4, 2
        c.val.num_images, c.val.batch_size = 2, 2
        c.decoder = ml_collections.ConfigDict(dict(hidden=16, max_depth=10.0, head_channels=8))
        c.generate.steps, c.generate.batch_size, c.generate.shard_size = 2, 2, 3
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (expected 'tiny' or none)")
    return c
