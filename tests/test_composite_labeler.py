"""`labeler: decoder+attention`: one sampler pass gives the P-Decoder's labels (equal to the plain
DecoderLabeler's on the same seeds) and the attention labeller's map of the very same images."""

import numpy as np
import pytest

from datasetdm_jax import dataset_writer, prompts, train
from datasetdm_jax.labelers.decoder import DecoderLabeler
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.data import records, shapes
from datasetdm_jax.labelers import composite
from test_generate_dataset import TINY
from tiny_sd import save_random_decoder

# The tiny UNet attends at feature heights 16 and 8 for a 32 px image (latent 16).
ATTENTION = dict(self_res=16, cross_res=8, append_class_names=False)
INDICES = np.arange(3, 5)


@pytest.fixture(scope="module")
def setup(pipe, tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("composite")
    config = load_config(TINY, [f"pipeline={tiny_dir}", f"workdir={root / 'wd'}"])
    save_random_decoder(config, train.Trainer(config, pipe=pipe))
    ps = prompts.from_config(config.generate.prompts).batch(INDICES)
    plain = DecoderLabeler(config, pipe=pipe)(ps, INDICES, 0)
    both = composite.DecoderAttentionLabeler(config, pipe=pipe, attention_config=ATTENTION)
    return root, config, ps, plain, both, both(ps, INDICES, 0)


def test_decoder_labels_match_the_plain_labeller(setup):
    _, _, ps, plain, _, res = setup
    np.testing.assert_array_equal(res.images, plain.images)
    assert res.prompts == plain.prompts == [p.text for p in ps]
    for a, b in zip(res.labels, plain.labels):
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
        np.testing.assert_allclose(a["quality"], b["quality"], rtol=1e-5)


def test_attention_labels_of_the_same_images(setup):
    _, _, ps, _, _, res = setup
    for p, lab in zip(ps, res.labels):
        att = lab[composite.ATTENTION_KEY]
        assert att.shape == (32, 32) and att.dtype == np.uint8
        allowed = {0, 255} | {shapes.CLASSES.index(c) for c in p.classes}
        assert set(np.unique(att).tolist()) <= allowed
    # both label sets are written to each record; the attention map round-trips exactly
    out = setup[0] / "records"
    manifest = dataset_writer.generate_dataset(setup[1], 5, str(out), labeler=setup[4], progress=False)
    assert manifest["labeler"]["name"] == "decoder+attention" and manifest["labeler"]["attention"]["cross_res"] == 8
    exs = list(records.read_tfrecords(str(out)))
    for k, i in enumerate(INDICES):
        np.testing.assert_array_equal(exs[i]["attention_label"], res.labels[k][composite.ATTENTION_KEY])
        np.testing.assert_array_equal(exs[i]["segmentation"], res.labels[k]["segmentation"])
        np.testing.assert_array_equal(exs[i]["image"], res.images[k])


def test_class_names_appended_and_unknown_classes_refused(setup, pipe):
    _, config, ps, _, _, _ = setup
    appended = composite.DecoderAttentionLabeler(config, pipe=pipe, attention_config={**ATTENTION,
                                                                                     "append_class_names": True})
    texts, (tokens, weights, ids, valid) = appended._inputs(ps[:1], 2)  # padded to the batch of 2
    assert texts == [f"{ps[0].text}; {' '.join(ps[0].classes)}"] * 2
    n = len(ps[0].classes)
    assert tokens.shape[0] == 2 and valid[0].sum() == n and weights.shape[:2] == ids.shape == valid.shape
    assert ids[0, :n].tolist() == [shapes.CLASSES.index(c) for c in ps[0].classes]
    with pytest.raises(ValueError, match="'dragon' is not a label class"):
        appended._inputs([prompts.Prompt("a dragon", ("dragon",))], 2)


def test_attention_settings_reach_the_sampler(setup, pipe, monkeypatch):
    """max_timestep and normalisation go from the attention config into the one-pass sampler."""
    _, config, _, _, _, _ = setup
    seen = {}

    def record(pipe, **kw):
        seen.update(kw)
        raise RuntimeError("built")

    monkeypatch.setattr(composite.attention, "build_labeller_fn", record)
    with pytest.raises(RuntimeError, match="built"):
        composite.DecoderAttentionLabeler(config, pipe=pipe, attention_config={**ATTENTION, "max_timestep": 500,
                                                                               "normalisation": "peak"})
    assert seen["max_timestep"] == 500 and seen["normalisation"] == "peak"


def test_fsdp_frozen_model_labels_the_same(setup, pipe, tiny_dir, monkeypatch):
    """``generate.param_sharding=fsdp``: the frozen SD split over the 2 devices (threshold lowered so
    the tiny weights split) gives the plain labeller's images and labels."""
    import jax

    from datasetdm_jax import sharding

    root, _, ps, plain, _, _ = setup
    monkeypatch.setattr(sharding, "MIN_ELEMENTS", 1024)
    config = load_config(TINY, [f"pipeline={tiny_dir}", f"workdir={root / 'wd'}", "generate.param_sharding=fsdp"])
    labeler = DecoderLabeler(config, pipe=pipe)
    assert labeler.mesh.size == 2
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(labeler.frozen))
    res = labeler(ps, INDICES, 0)
    assert np.abs(res.images.astype(int) - plain.images.astype(int)).max() <= 1
    for a, b in zip(res.labels, plain.labels):
        assert (a["segmentation"] == b["segmentation"]).mean() > 0.999
        np.testing.assert_allclose(a["quality"], b["quality"], rtol=1e-4)
