"""The shared config blocks (datasetdm_jax/config_common.py) and every config file that uses them."""

import os

import pytest

from datasetdm_jax import config_common as common
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.data import shapes

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
SHAPES = ("semantic", "instance", "depth", "pose")
VARIANTS = {**{f"shapes_{t}": ("", "tiny") for t in SHAPES}, "downstream_shapes": ("", "tiny"),
            **{n: ("",) for n in ("voc_semantic", "voc_semantic_sdxl", "cityscapes_semantic", "coco_instance",
                                  "nyu_depth", "coco_pose", "downstream_voc", "downstream_cityscapes",
                                  "downstream_nyu")}}


def test_check_variant_names_the_known_ones():
    common.check_variant(None, "tiny")
    common.check_variant("", "tiny")
    common.check_variant("tiny", "tiny")
    with pytest.raises(ValueError, match=r"unknown variant 'x' \(expected 'tiny' or none\)"):
        common.check_variant("x", "tiny")
    with pytest.raises(ValueError, match=r"unknown variant 'x' \(expected 'small', 'tiny' or none\)"):
        common.check_variant("x", "small", "tiny")
    with pytest.raises(ValueError, match=r"unknown variant 'tiny' \(expected none\)"):
        common.check_variant("tiny")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_loads_and_bogus_is_refused(name):
    for v in VARIANTS[name]:
        c = load_config(os.path.join(CONFIGS, f"{name}.py") + (f":{v}" if v else ""))
        assert c.name == name and c.workdir == f"runs/{name}"
    with pytest.raises(ValueError, match="unknown variant 'bogus'"):
        load_config(os.path.join(CONFIGS, f"{name}.py:bogus"))


def test_shapes_blocks_keep_task_fields_and_tiny_shrinks():
    full = {t: load_config(os.path.join(CONFIGS, f"shapes_{t}.py")) for t in SHAPES}
    tiny = {t: load_config(os.path.join(CONFIGS, f"shapes_{t}.py:tiny")) for t in SHAPES}
    assert {t: c.task for t, c in full.items()} == {t: t for t in SHAPES}
    assert full["semantic"].num_points == 784 and full["depth"].num_points == 0
    assert full["instance"].top_k == 20 and tiny["instance"].top_k == 5 and full["pose"].pose_sigma == 1.0
    assert "deep_supervision" in full["semantic"] and "deep_supervision" not in full["depth"]
    # a depth head outputs sigmoid x max_depth: it must reach the farthest background pixel
    assert min(full["depth"].decoder.max_depth, tiny["depth"].decoder.max_depth) > shapes.SCENE_MAX_DEPTH
    assert full["pose"].data.filter == "one_person" and "filter" not in full["semantic"].data
    assert full["pose"].generate.prompts.classes == ("person",) and full["semantic"].generate.prompts.classes == ()
    for t in SHAPES:
        assert (tiny[t].steps, tiny[t].data.image_size, tiny[t].generate.shard_size) == (4, 32, 3)
        assert (full[t].data.image_size, full[t].generate.shard_size) == (64, 256)
    # each task's measured recipe: steps, feature timestep and the generation pass that reads it
    assert {t: c.steps for t, c in full.items()} == dict(semantic=3000, instance=3000, depth=3000, pose=1000)
    assert {t: c.timestep for t, c in full.items()} == dict(semantic=400, instance=100, depth=0, pose=0)
    assert {t: c.generate.feature_pass for t, c in full.items()} == dict(
        semantic="renoise", instance="renoise", depth="last_step", pose="last_step")
    # `datasetdm exp baseline ... baseline.width=16` (its --help example) is a known field
    assert load_config(os.path.join(CONFIGS, "shapes_pose.py"), ["baseline.width=16"]).baseline.width == 16
    # the shared base is built fresh per call: changing one config never leaks into another
    a, b = common.shapes_pdecoder("semantic"), common.shapes_pdecoder("semantic")
    a.data.image_size = 8
    assert b.data.image_size == 64


def test_downstream_task_defaults_are_paper_scale():
    t = common.downstream_task("semantic", 21, 20000, common.deeplab_v3plus())
    assert (t.lr, t.warmup_steps, t.log_every, t.batch_size) == (1e-3, 500, 50, 16)
    shapes = load_config(os.path.join(CONFIGS, "downstream_shapes.py:tiny"))
    assert (shapes.semantic.lr, shapes.semantic.warmup_steps, shapes.semantic.batch_size) == (2e-3, 0, 4)


def test_paper_configs_have_a_whole_generate_section():
    """One shared generate block (sd14_generate): every key present, so any can be set from the CLI."""
    keys = set(common.sd14_generate().keys())
    assert {"prompts", "batch_size", "shard_size", "labeler", "grounding", "formats", "image_format"} <= keys
    for name in ("voc_semantic", "cityscapes_semantic", "coco_instance", "coco_pose", "nyu_depth"):
        g = load_config(os.path.join(CONFIGS, f"{name}.py")).generate
        assert keys <= set(g.keys()), name
        assert (g.labeler, g.grounding, g.prompts.kind, g.steps, g.scheduler) == ("decoder", "prompt", "templates", 50,
                                                                                   "pndm"), name
        assert g.formats == ("tfrecord", "array_record") and g.feature_pass == "last_step"
        assert all("{a_class}" in t for t in g.prompts.templates)
    assert load_config(os.path.join(CONFIGS, "coco_instance.py")).generate.prompts.classes == ()   # COCO's own
    assert load_config(os.path.join(CONFIGS, "coco_pose.py")).generate.prompts.classes == ("person",)
    assert load_config(os.path.join(CONFIGS, "voc_semantic.py"), ["generate.formats=('array_record',)"]
                       ).generate.formats == ("array_record",)
