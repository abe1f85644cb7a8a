"""P-Decoder for PASCAL VOC 2012 semantic segmentation, the paper's setting.

Run: ``datasetdm train --config configs/voc_semantic.py data.root=/path/to/VOCdevkit/VOC2012``
(rerun to resume). Numbers cite ../shared/reference/datasetdm_official_code.md (section in each
comment). The frozen model is SD 1.4 in diffusers format (safetensors), §1.
"""

import ml_collections

from datasetdm_jax.data.voc import CLASSES  # label value -> class name


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "semantic"
    c.name = "voc_semantic"
    c.pipeline = "models/stable-diffusion-v1-4"  # §1: CompVis/stable-diffusion-v1-4
    c.workdir = "runs/voc_semantic"
    c.capture = "datasetdm"          # §2.2-2.3: 28 UNet maps + cond cross-attention of all 16 layers
    c.timestep = 0                   # §2.1: DDPM set_timesteps(50) -> timesteps[-1] = 0
    c.seed = 42                      # §4: seed_everything(42)
    c.batch_size = 1                 # §4: batch 1 (ours works at any batch size)
    c.lr = 1e-4                      # §4: Adam, no weight decay
    # §4: StepLR x0.1 every 350 epochs, 5000 epochs nominal ("train until stopped"); 100 images
    # at batch 1 -> 350 epochs = 35000 steps. train.py uses a constant lr for now.
    c.steps = 40000
    c.max_steps = 0
    c.num_classes = 21               # background + 20 VOC classes (label values 0..20, 255 ignore)
    c.deep_supervision = False       # §3.1: no auxiliary losses in the official decoder
    c.num_points = 12544             # §4: point samples for matching and mask losses
    c.log_every = 50
    c.eval_every = 5000
    c.checkpoint_every_s = 600.0
    c.keep_checkpoints = 2
    # §4 table: 512x512 inputs; 5 images per class -> 100, single-class label maps whose class
    # covers > 18000 px (list file Selected_File/VOC/100.txt); prompt "a photo of a {class}".
    c.data = ml_collections.ConfigDict(dict(
        source="voc", root="data/VOCdevkit/VOC2012", split="train_aug", image_size=512, resize="crop",
        num_images=100, per_class=5, min_pixels=18000, max_objects=1, flip=True, seed=0))
    c.val = ml_collections.ConfigDict(dict(split="val", seed=1, num_images=100, batch_size=1))  # every eval_every
    c.eval = ml_collections.ConfigDict(dict(split="val", seed=0, num_images=1449, batch_size=1))  # at end
    # §3.1-3.2: Mask2Former-style head, hidden 256, 10 layers, 8 heads, FFN 2048, 20 queries (VOC).
    # 21 queries: the official code uses 20, but our semantic targets have one slot per class (21 with
    # background) and Hungarian matching needs a query for each.
    c.decoder = ml_collections.ConfigDict(dict(hidden=256, num_queries=21, num_layers=10, heads=8, ffn=2048))
    # §2.1, §5: generation with PNDM (PLMS) 50 steps, CFG 7 for VOC. `datasetdm generate --config
    # configs/voc_semantic.py --num_images N --out DIR` labels with the decoder trained in `workdir`.
    c.generate = ml_collections.ConfigDict(dict(
        prompts=ml_collections.ConfigDict(dict(kind="templates", classes=CLASSES[1:], templates=("a photo of {a_class}",),
                                               max_classes=1, seed=0)),
        scheduler="pndm", steps=50, guidance=7.0, negative_prompt="", batch_size=8, seed=0,
        labeler="decoder", shard_size=256, image_format="jpeg",
        min_area=256,                # semantic: classes covering fewer pixels of a 512 x 512 image become background
    ))
    if arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (expected none)")
    return c
