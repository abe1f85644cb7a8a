"""Labels follow the prompt: grounding restricts semantic and instance labels to the named classes."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from datasetdm_jax.decoders import inference, postprocess
from datasetdm_jax.labelers import grounding

CLASSES = ("background", "circle", "square", "triangle")


def test_allowed_classes_follow_the_prompt():
    allowed = grounding.allowed_classes([["triangle"], ["circle", "square"], []], CLASSES, "prompt")
    assert allowed.tolist() == [[True, False, False, True], [True, True, True, False], [True] * 4]
    assert grounding.allowed_classes([["triangle"]], CLASSES, "none").all()


def test_grounding_settings_are_validated():
    assert grounding.settings(ml_collections.ConfigDict()) == {"grounding": "prompt", "grounding_threshold": 0.0}
    with pytest.raises(ValueError, match="generate.grounding must be one of"):
        grounding.settings(ml_collections.ConfigDict(dict(grounding="yes")))
    with pytest.raises(ValueError, match="grounding_threshold"):
        grounding.settings(ml_collections.ConfigDict(dict(grounding_threshold=1.5)))


def test_semantic_labels_take_only_named_classes():
    # one image, 2x2 pixels: the decoder believes square (top row) and triangle / background (bottom)
    scores = np.zeros((1, 4, 2, 2), np.float32)
    scores[0, 2, 0, :] = 0.8          # square, strong
    scores[0, 3, 0, 0] = 0.15         # triangle, weak, under the square in the top-left pixel
    scores[0, 0, 0, 1] = 0.05         # background, weak, top-right
    scores[0, 3, 1, 0] = 0.9          # triangle, bottom-left
    scores[0, 0, 1, 1] = 0.9          # background, bottom-right
    prompt = jnp.asarray(grounding.allowed_classes([["triangle"]], CLASSES, "prompt"))
    ungrounded = inference.class_map(jnp.asarray(scores))
    assert ungrounded[0].tolist() == [[2, 2], [3, 0]]               # square: the prompt never named it
    seg, conf = inference.grounded_class_map(jnp.asarray(scores), prompt)
    assert seg[0].tolist() == [[3, 0], [3, 0]]                     # only triangle or background
    assert conf[0, 1].tolist() == pytest.approx([1.0, 1.0], abs=1e-4)
    assert float(conf[0, 0, 0]) == pytest.approx(0.15 / 0.95, abs=1e-4)
    weak, _ = inference.grounded_class_map(jnp.asarray(scores), prompt, weak_threshold=0.5)
    assert weak[0].tolist() == [[255, 255], [3, 0]]                # contradicted pixels are ignored
    same, _ = inference.grounded_class_map(jnp.asarray(scores), jnp.ones((1, 4), bool))
    assert same.tolist() == ungrounded.tolist()                    # "none" keeps today's argmax


def test_instance_labels_are_relabelled_or_dropped():
    # two queries over 3 classes (+ no-object); query 0 believes "square", query 1 "triangle"
    logits = jnp.log(jnp.asarray([[[0.05, 0.85, 0.05, 0.05], [0.02, 0.02, 0.9, 0.06]]], jnp.float32))
    masks = jnp.full((1, 2, 4, 4), -5.0).at[0, 0, :2].set(5.0).at[0, 1, 2:].set(5.0)
    kw = dict(out_size=4, score_threshold=0.3, max_instances=2)
    plain = postprocess.trim({k: np.asarray(v[0]) for k, v in postprocess.instance_labels(logits, masks, **kw).items()})
    assert sorted(plain["instance_labels"].tolist()) == [2, 3]     # data ids: square 2, triangle 3
    allowed = jnp.asarray(grounding.allowed_classes([["triangle"]], CLASSES, "prompt"))
    grounded = postprocess.trim({k: np.asarray(v[0]) for k, v in
                                 postprocess.instance_labels(logits, masks, allowed=allowed, **kw).items()})
    assert grounded["instance_labels"].tolist() == [3]              # the square query is dropped (0.05 < 0.3)
    low = postprocess.trim({k: np.asarray(v[0]) for k, v in postprocess.instance_labels(
        logits, masks, allowed=allowed, **{**kw, "score_threshold": 0.01}).items()})
    assert low["instance_labels"].tolist() == [3, 3]               # or relabelled to the named class


def test_always_allowed_classes_join_every_grounded_image():
    names = ("road", "sky", "car", "person")
    got = grounding.allowed_classes([["car"], [], ["person", "car"]], names, "prompt", always=("sky",))
    assert got.tolist() == [[True, True, True, False], [True] * 4, [True, True, True, True]]
    assert grounding.settings(ml_collections.ConfigDict(dict(grounding_always=("sky",))))["grounding_always"] == ("sky",)
    assert "grounding_always" not in grounding.settings(ml_collections.ConfigDict(dict(grounding_always=())))
    with pytest.raises(ValueError, match=r"grounding_always: unknown class\(es\) \['tree'\]"):
        grounding.allowed_classes([["car"]], names, "prompt", always=("tree",))
