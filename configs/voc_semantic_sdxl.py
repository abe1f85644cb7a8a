"""The VOC semantic P-Decoder (configs/voc_semantic.py) on Stable Diffusion XL base 1.0 at 1024 px.

Run: ``datasetdm train --config configs/voc_semantic_sdxl.py data.root=/path/to/VOCdevkit/VOC2012``,
then ``datasetdm generate --config configs/voc_semantic_sdxl.py --num_images N --out DIR``. Everything
not set here is the VOC recipe (same 100 training images, decoder, prompts, grounding). Not in the
paper, and run only on a tiny random SDXL on CPU (tests/test_sdxl_pdecoder.py): no real SDXL
weights, no accelerator, so no accuracy or speed here is measured.
"""

import os

from datasetdm_jax.config_utils import load_config


def get_config(arg=None):
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "voc_semantic.py")
    c = load_config(base + (f":{arg}" if arg else ""))  # its variants (none) and their refusal
    c.name = "voc_semantic_sdxl"
    c.workdir = "runs/voc_semantic_sdxl"
    c.pipeline = "stabilityai/stable-diffusion-xl-base-1.0"  # a Hub repo id (hub.py), or a local SDXL folder
    c.data.image_size = 1024         # SDXL's native size (128x128 latents); VOC's ~500 px photos are upscaled
    # 'lean' (up-block outputs + mid, layer-mean cross-attention), not 'datasetdm': one captured guided
    # UNet call of bf16 SDXL at batch 1 peaks near 15 GiB (4.8 of it the UNet's weights; docs/benchmarks.md,
    # an XLA CPU estimate) and the text towers and VAE hold 1.7 GiB more, so a 16 GiB chip has no room for
    # the 0.73 GiB of 'datasetdm' features per image (1,200 layer-heads x 77 tokens at 32x32; 'lean':
    # 0.11 GiB) nor for the 8x larger decoder stem that reads them.
    c.capture = "lean"
    # Features at 128/64/32 (not SD's 64/32/16/8); the decoder's stem reads whatever levels the preset gives.
    c.generate.scheduler = "euler"   # SDXL base's own scheduler (EulerDiscreteScheduler, leading spacing)
    c.generate.batch_size = 1        # one image per call: the guided UNet alone nearly fills 16 GiB
    c.generate.min_area = 1024       # VOC's 256 px of a 512 px image, scaled to 1024 x 1024
    return c
