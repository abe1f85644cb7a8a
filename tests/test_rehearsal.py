"""The real-size rehearsal's data (datasetdm_jax/bench/rehearsal.py): its VOC-layout folder passes the
paper's few-shot selection at VOC's image size, one image per class, and an empty selection is one line."""

import ml_collections
import numpy as np
import pytest

from datasetdm_jax.bench import rehearsal
from datasetdm_jax.data import sources
from datasetdm_jax.errors import UserError


def voc_data(root, **kw):
    data = dict(source="voc", root=str(root), split="train_aug", image_size=64, resize="crop", num_images=100,
                per_class=1, min_pixels=18000, max_objects=1, flip=False, seed=0)
    return ml_collections.ConfigDict({**data, **kw})


def test_layout_passes_the_few_shot_selection(tmp_path):
    root = rehearsal.write_voc_layout(tmp_path / "VOC2012")
    src = sources.build(voc_data(root))
    assert len(src) == len(rehearsal.CLASSES)
    present = sorted(int(v) for i in range(len(src)) for v in np.unique(src[i]["segmentation"]) if 0 < v < 255)
    assert present == sorted(rehearsal.CLASSES)


def test_empty_selection_is_a_one_line_error(tmp_path):
    root = rehearsal.write_voc_layout(tmp_path / "VOC2012")
    with pytest.raises(UserError, match=r"no image passes the few-shot selection .* check data.root"):
        sources.build(voc_data(root, min_pixels=10**7))
