"""P-Decoder training for 17-keypoint pose on the shapes world (reference §3.4, §4).

Heatmap head with Gaussian targets and JointsMSE weighted by visibility (all 17 joints kept,
occluded ones too, unlike the official decoder that drops border joints). As in the official
single-person setting ("a photo of a person"), the labelled and test images are the scenes that
hold exactly one stick-figure person (other objects may occlude it): ``data.filter='one_person'``.
Scored with COCO keypoint AP (OKS; object area = the person's visible mask area).

Run: ``datasetdm train --config configs/shapes_pose.py`` (rerun to resume). Variant ``:tiny`` is
for tests.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "pose"
    c.name = "shapes_pose"
    c.pipeline = ""                  # "" = the shipped shapes-world SD (datasetdm_jax/assets/shapes_sd)
    c.workdir = "runs/shapes_pose"
    c.capture = "datasetdm"
    c.timestep = 0                   # official: DDPM set_timesteps(50) -> timesteps[-1] = 0 (reference §2.1)
    c.seed = 42
    c.steps = 3000
    c.max_steps = 0
    c.batch_size = 4
    c.lr = 1e-4
    c.num_points = 0                 # unused by pose
    # Official: sigma 2 on a 64x64 heatmap of a 512 px person crop. Here the heatmap is 32x32 for a
    # 64 px image whose person is ~20-40 px tall, so sigma 1 heatmap px keeps a similar relative size.
    c.pose_sigma = 1.0
    c.log_every = 10
    c.eval_every = 500
    c.checkpoint_every_s = 300.0
    c.keep_checkpoints = 2
    c.data = ml_collections.ConfigDict(dict(split="train_labelled", num_images=100, seed=0, image_size=64,
                                            flip=True, filter="one_person"))
    c.val = ml_collections.ConfigDict(dict(split="test", seed=1, num_images=32, batch_size=8))
    c.eval = ml_collections.ConfigDict(dict(split="test", seed=0, num_images=256, batch_size=8))
    c.decoder = ml_collections.ConfigDict(dict(hidden=64, out_size=32))
    # `datasetdm generate --config configs/shapes_pose.py --num_images N --out DIR`: one-person prompts
    # (the decoder is trained on one-person scenes; official: "a photo of a person"), sampler, and the
    # labeller ('decoder': the P-Decoder `datasetdm train` wrote to `workdir`). Keypoints: heatmap
    # argmax per joint; all 17 kept, visibility 2 where the peak > keypoint_threshold (the official code
    # writes every peak with no threshold), else 0; an image's person is kept with >= min_keypoints
    # visible joints. With an instance decoder in the same labeller (DecoderLabeler(..., also=[instance
    # config])), each kept person instance gets its own keypoints, decoded inside its box grown by
    # box_margin of its size per side (datasetdm_jax/decoders/postprocess.py).
    c.generate = ml_collections.ConfigDict(dict(
        prompts=ml_collections.ConfigDict(dict(kind="shapes", seed=0, domain="full", path="", classes=("person",),
                                               templates=(), max_classes=1, min_objects=1, max_objects=1)),
        steps=25, guidance=7.5, scheduler="pndm", negative_prompt="", batch_size=16, seed=0,
        labeler="decoder", shard_size=256, image_format="png",
        keypoint_threshold=0.1, min_keypoints=1, box_margin=0.25,
    ))
    if arg == "tiny":
        c.steps, c.batch_size, c.log_every, c.eval_every, c.lr = 4, 2, 1, 2, 1e-3
        c.data.num_images, c.data.image_size = 8, 32
        c.eval.num_images, c.eval.batch_size = 4, 2
        c.val.num_images, c.val.batch_size = 2, 2
        c.decoder = ml_collections.ConfigDict(dict(hidden=16, out_size=16))
        c.generate.steps, c.generate.batch_size, c.generate.shard_size = 2, 2, 3
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (expected 'tiny' or none)")
    return c
