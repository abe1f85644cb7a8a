"""Labels follow the prompt: the prompt says which classes an image holds, the decoder says where.

The official DatasetDM generation draws each image from a prompt naming its class and keeps the
decoder's mask for that class only. A labeller that takes the argmax over every class it knows
contradicts its own prompt wherever the image is ambiguous ("a red triangle" labelled square), and
those labels are worse than the images. With ``generate.grounding = "prompt"`` (the default) the
classes a prompt does not name are removed before the argmax (background always allowed);
``generate.grounding_threshold`` > 0 also marks 255 (ignored downstream) every pixel whose winning
allowed class holds less than that share of the decoder's total score there, i.e. pixels where the
decoder believed in a class the prompt does not name. ``"none"`` keeps the ungrounded argmax.

``generate.grounding_always`` names classes every image may hold whatever its prompt says: the
"stuff" of a street scene (road, building, sky, ...) is in every Cityscapes frame, though a prompt
names one object class ("a photo of a car in an urban street"), so only the named "things" follow
the prompt there.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

MODES = ("prompt", "none")


def settings(g) -> dict[str, Any]:
    """``(mode, threshold)`` of a config's ``generate`` section, validated (one-line errors)."""
    mode = str(g.get("grounding", "prompt"))
    if mode not in MODES:
        raise ValueError(f"generate.grounding must be one of {MODES}, got {mode!r}")
    threshold = float(g.get("grounding_threshold", 0.0))
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"generate.grounding_threshold must be in [0, 1), got {threshold}")
    out: dict[str, Any] = {"grounding": mode, "grounding_threshold": threshold}
    always = tuple(str(c) for c in (g.get("grounding_always", ()) or ()))
    if always:  # only when set: a manifest of a folder made without it stays the same
        out["grounding_always"] = always
    return out


def allowed_classes(named: Sequence[Sequence[str]], class_names: Sequence[str], mode: str,
                    always: Sequence[str] = ()) -> np.ndarray:
    """(B, K) bool: the label values each image may take. Background (value 0) and the ``always``
    classes always; with mode "prompt" only the classes its prompt names besides, else all. A prompt
    that names no known class cannot be grounded and allows all (a file caption such as "a man on a
    horse" names no VOC class)."""
    k = len(class_names)
    out = np.ones((len(named), k), bool)
    if mode == "none" or k == 0:
        return out
    index = {c: i for i, c in enumerate(class_names)}
    unknown = [c for c in always if c not in index]
    if unknown:
        raise ValueError(f"generate.grounding_always: unknown class(es) {unknown}; the decoder knows {list(class_names)}")
    base = [0] + [index[c] for c in always]
    for b, row in enumerate(named):
        ids = [index[c] for c in row if c in index]
        if ids:
            out[b] = False
            out[b, base] = True
            out[b, ids] = True
    return out
