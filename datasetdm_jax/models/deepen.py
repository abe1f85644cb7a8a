"""Function-preserving deepening of a trained UNet2DConditionModel (``layers_per_block`` L -> L').

A trained shapes-world UNet that has stopped improving can continue with more capacity instead of
restarting from scratch (the Net2DeeperNet idea): every added layer starts as the identity, so the
deeper model computes exactly what the trained one did and training resumes from its quality.

Why it is exact, block by block (diffusers' layout, which ours mirrors):
- A down block's layers ``L..L'-1`` are new. A ResnetBlock2D with equal in/out channels adds
  ``conv2(...)`` to its input, so a zero ``conv2`` makes it the identity; a Transformer2DModel adds
  ``proj_out(...)`` to its input, so a zero ``proj_out`` does the same. Their skip outputs then all
  equal layer ``L-1``'s.
- An up block pops ``L'+1`` skips in reverse. Trained layer 0 stays first (its skip, down layer
  ``L'-1``, equals the old down layer ``L-1``). Then come ``L'-L`` new pass-through layers: each
  resnet's 1x1 shortcut selects the hidden half of ``concat(hidden, skip)`` and its ``conv2`` is zero,
  so it ignores the (duplicate) skip it pops. Trained layers ``1..L`` follow and pop exactly the skips
  they were trained on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["deepen_unet_params"]

Tree = dict[Any, Any]


def _zeroed(layer: Tree, key: str) -> Tree:
    out = dict(layer)
    out[key] = {k: np.zeros_like(v) for k, v in layer[key].items()}
    return out


def _pass_through_resnet(layer: Tree) -> Tree:
    """A fresh up-block resnet that returns the hidden half of its ``concat(hidden, skip)`` input."""
    out = _zeroed(layer, "conv2")
    kernel = np.asarray(layer["conv_shortcut"]["kernel"])  # (1, 1, hidden + skip, hidden)
    hidden = kernel.shape[-1]
    select = np.zeros_like(kernel)
    select[0, 0, :hidden, :] = np.eye(hidden, dtype=kernel.dtype)
    out["conv_shortcut"] = {"kernel": select, "bias": np.zeros_like(layer["conv_shortcut"]["bias"])}
    return out


def _block(old: Tree, fresh: Tree, source, new_resnet) -> Tree:
    """A block of ``fresh``'s depth: trained layer ``source(i)`` at index i, or (None) a new layer
    made from ``fresh``'s (resnet by ``new_resnet``, attention with a zero ``proj_out``)."""
    block = dict(old)
    for kind, make in (("resnets", new_resnet), ("attentions", lambda layer: _zeroed(layer, "proj_out"))):
        if kind in fresh:
            block[kind] = {i: make(fresh[kind][i]) if source(i) is None else old[kind][source(i)]
                           for i in fresh[kind]}
    return block


def deepen_unet_params(old: Tree, fresh: Tree, old_layers: int, new_layers: int) -> Tree:
    """``old`` (a UNet's params with ``layers_per_block=old_layers``) grown to the tree of ``fresh``
    (a freshly initialised UNet with ``new_layers``), computing the same function.

    New layers keep ``fresh``'s random weights except for the parts zeroed (or made a selection)
    above, so they can learn: a zero ``conv2`` still passes gradient to itself, then to ``conv1``.
    Trees are ``nnx.to_pure_dict`` params with integer keys for block and layer lists."""
    if new_layers < old_layers:
        raise ValueError(f"deepen_unet_params: cannot go from {old_layers} to {new_layers} layers per block")
    new = dict(old)
    added = new_layers - old_layers
    # Down: trained layers first, identities after. Up: trained layer 0, the pass-throughs, the rest.
    down = lambda i: i if i < old_layers else None  # noqa: E731
    up = lambda i: 0 if i == 0 else (None if i <= added else i - added)  # noqa: E731
    new["down_blocks"] = {b: _block(old["down_blocks"][b], fresh["down_blocks"][b], down,
                                    lambda layer: _zeroed(layer, "conv2")) for b in fresh["down_blocks"]}
    new["up_blocks"] = {b: _block(old["up_blocks"][b], fresh["up_blocks"][b], up, _pass_through_resnet)
                        for b in fresh["up_blocks"]}
    return new
