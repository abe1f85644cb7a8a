"""Per-pixel semantic P-Decoder: the pixel stem, one 3x3 conv and a 1x1 classifier, trained with
per-pixel cross-entropy.

Not the official decoder (Mask2Former, `segmentation.py`): on the shapes world, 100 labelled images,
it labels real test images better than the Mask2Former head trained on the same features
(docs/experiments/decoder_recipes.md), as a per-pixel segmenter trained from scratch does
better than a Mask2Former one there. The stem's fused map is upsampled to ``head_size`` before the
conv (default: twice the highest feature resolution) and the logits bilinearly to ``out_size`` (the
image size; `tasks.build_decoder` sets it).
"""

from __future__ import annotations

import jax
from flax import nnx

from datasetdm_jax.decoders.pixel_stem import FeatureSpec, PixelStem, resize


class PerPixelDecoder(nnx.Module):
    """Returns {'logits': (B, out_size, out_size, num_classes)} (class 0 = background)."""

    def __init__(self, spec: FeatureSpec, num_classes: int, *, out_size: int, hidden: int = 64,
                 head_size: int | None = None, dtype=None, rngs: nnx.Rngs):
        self.stem = PixelStem(spec, hidden=hidden, dtype=dtype, rngs=rngs)
        self.out_size = out_size
        self.head_size = head_size or 2 * max(spec)
        self.conv = nnx.Conv(hidden, hidden, (3, 3), padding=1, dtype=dtype, rngs=rngs)
        self.classifier = nnx.Conv(hidden, num_classes, (1, 1), dtype=dtype, rngs=rngs)

    def __call__(self, features) -> dict[str, jax.Array]:
        x, _ = self.stem(features)
        x = self.classifier(jax.nn.relu(self.conv(resize(x, self.head_size))))
        return {"logits": resize(x, self.out_size)}
