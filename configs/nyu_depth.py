"""P-Decoder for NYU Depth v2 (labelled, 795 train / 654 test), the paper's setting.

Run: ``datasetdm train --config configs/nyu_depth.py data.root=/path/to/nyu`` where the folder
holds nyu_depth_v2_labeled.mat + splits.mat, or the extracted train/ and test/ folders (see
datasetdm_jax/data/nyu.py). Values marked "official" are those of the official DatasetDM code. Shared
settings: datasetdm_jax/config_common.py.
"""

import ml_collections

from datasetdm_jax import config_common as common


# The 27 scene types of the NYU Depth v2 labelled set (its `sceneTypes`, underscores as spaces): the
# prompt classes of generation, as in the training captions ("a photo of a kitchen").
SCENES = ("basement", "bathroom", "bedroom", "bookstore", "cafe", "classroom", "computer lab", "conference room",
          "dinette", "dining room", "exercise room", "foyer", "furniture store", "home office", "home storage",
          "indoor balcony", "kitchen", "laundry room", "living room", "office", "office kitchen", "playroom",
          "printer room", "reception room", "student lounge", "study", "study room")


def get_config(arg=None):
    common.check_variant(arg)
    c = common.sd14_pdecoder(
        "depth", "nyu_depth",
        steps=100000,                # 400 epochs of 250 images at batch 1
        num_points=0,                # unused by depth
        eval_every=10000,
        # Official few-shot selection: 250 random train frames (official list Selected_File/NYU/250.txt;
        # here a seeded random subset of the 795); 512x512; depth in metres ([-1, 1] images; official:
        # [0, 1] images, 8-bit depth).
        data=dict(source="nyu", root="data/nyu", split="train", image_size=512, resize="crop", num_images=250,
                  max_objects=1, flip=True, seed=0),
        eval_split="test", eval_images=654,
    )
    # Official: sigmoid x max depth 10 m; the official head is 1024-channel 3x3 convs at 512x512.
    c.decoder = ml_collections.ConfigDict(dict(hidden=256, max_depth=10.0, head_channels=1024))
    # `datasetdm generate --config configs/nyu_depth.py --num_images N --out DIR`. Official generation:
    # indoor-scene prompts (a GPT-written list, not shipped here), CFG 5. Here: "a photo of a {room}"
    # and "a photo of the inside of a {room}" over the NYU scene types; depth in metres (16-bit PNG, mm).
    # A list of your own: generate.prompts.kind=file generate.prompts.path=prompts.txt.
    c.generate = common.sd14_generate(
        guidance=5.0,
        prompts=dict(classes=SCENES, templates=("a photo of {a_class}", "a photo of the inside of {a_class}")),
    )
    return c
