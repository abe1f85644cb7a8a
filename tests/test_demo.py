"""The demo's claim check: each claim carries its measured numbers and can fail."""

from datasetdm_jax import demo


def _result(real, mixed, real_shift, mixed_shift, rel_real, rel_mixed):
    sem = {"real": {"test": {"miou": real}, "test_shifted": {"miou": real_shift}},
           "real+synthetic": {"test": {"miou": mixed}, "test_shifted": {"miou": mixed_shift}}}
    dep = {"real": {"test": {"rel": rel_real}}, "real+synthetic": {"test": {"rel": rel_mixed}}}
    return {"semantic": sem, "depth": dep}


def test_claims_hold_when_synthetic_data_helps():
    claims = demo.check_claims(_result(0.40, 0.47, 0.30, 0.40, 0.20, 0.15), min_gain=5.0)
    assert [c["holds"] for c in claims] == [True, True, True]
    assert abs(claims[0]["measured"] - 7.0) < 1e-6


def test_claims_fail_when_it_does_not():
    claims = demo.check_claims(_result(0.40, 0.42, 0.30, 0.31, 0.20, 0.25), min_gain=5.0)
    assert [c["holds"] for c in claims] == [False, False, False]


def test_the_labeller_is_set_against_the_real_only_row():
    decoders = {"semantic": {"miou": 0.30, "miou_grounded": 0.38}, "depth": {"rel": 0.1}}
    claims = demo.check_claims(_result(0.40, 0.42, 0.30, 0.31, 0.20, 0.25), min_gain=5.0, decoders=decoders)
    assert [c["holds"] for c in claims] == [False, False, None, False]
    assert claims[2]["measured"] == {"p_decoder_grounded": 38.0, "p_decoder_all_classes": 30.0, "real_only": 40.0}
    # a decoder scored before the grounded metric existed: no such line
    assert len(demo.check_claims(_result(0.40, 0.42, 0.30, 0.31, 0.20, 0.25), 5.0, {"semantic": {"miou": 0.3}})) == 3


# --- attention-labelled rows (d), (e): semantic only, reported as measured ---------------------

def _with_attention(base, att, real_att):
    sem = lambda t, s: {"test": {"miou": t}, "test_shifted": {"miou": s}}
    attention = {"rows": ["synthetic", "real+synthetic"],
                 "semantic": {"synthetic": sem(*att), "real+synthetic": sem(*real_att)},
                 "train": {"semantic": {"synthetic": {"steps": 1}, "real+synthetic": {"steps": 1}}}}
    for row in base["depth"].values():
        row["test_shifted"] = {"rel": 0.3}
    base = {**base, "rows": ["real", "real+synthetic"], "test_splits": ["test", "test_shifted"], "num_real": 100,
            "num_synthetic": 64, "train": {"semantic": {}, "depth": {}}}
    return demo.add_rows(base, attention, demo.ATTENTION_ROWS)


def test_attention_rows_are_merged_compared_and_tabled():
    from datasetdm_jax.downstream import compare

    base = _result(0.40, 0.47, 0.30, 0.40, 0.20, 0.15)
    base["semantic"]["synthetic"] = {"test": {"miou": 0.35}, "test_shifted": {"miou": 0.33}}
    result = _with_attention(base, (0.25, 0.20), (0.45, 0.36))
    assert result["rows"] == ["real", "real+synthetic", "attention", "real+attention"]
    assert result["semantic"]["attention"]["test"]["miou"] == 0.25 and "attention" not in result["depth"]
    assert "attention" not in base["semantic"]  # the (a)-(c) result is not modified
    claims = demo.check_claims(result, min_gain=5.0)
    # (d) 25.0 is 71% of (b) 35.0: below the 80% bar
    assert [c["holds"] for c in claims] == [True, True, True, False, None]
    assert claims[3]["measured"] == {"ratio": 0.714, "attention": {"test": 25.0, "test_shifted": 20.0},
                                     "p_decoder": {"test": 35.0, "test_shifted": 33.0}}
    assert claims[4]["measured"]["attention"] == {"test": 45.0, "test_shifted": 36.0}
    assert claims[4]["measured"]["real"] == {"test": 40.0, "test_shifted": 30.0}
    lines = compare.format_table(result).splitlines()
    assert lines[3].split()[:2] == ["(d)", "synth.,"]
    assert lines[3].split()[-6:] == ["-", "64", "25.0", "20.0", "-", "-"]  # no depth from attention
    assert lines[4].split()[-6:] == ["100", "64", "45.0", "36.0", "-", "-"]
    # a close attention row holds the claim; the consensus row (f) is merged and reported as measured
    sem = lambda t, u: {"test": {"miou": t}, "test_shifted": {"miou": u}}
    consensus = {"rows": ["synthetic"], "semantic": {"synthetic": sem(0.37, 0.34)},
                 "train": {"semantic": {"synthetic": {"steps": 1}}}}
    close = demo.add_rows(_with_attention(base, (0.30, 0.28), (0.45, 0.36)), consensus, demo.CONSENSUS_ROWS)
    assert close["rows"][-1] == "consensus"
    claims = demo.check_claims(close, min_gain=5.0)
    assert [c["holds"] for c in claims] == [True, True, True, True, None, None]
    assert claims[5]["measured"]["consensus"] == {"test": 37.0, "test_shifted": 34.0}
    assert compare.format_table(close).splitlines()[5].split()[:2] == ["(f)", "synth.,"]


def test_consensus_keeps_only_where_both_labellers_agree():
    import numpy as np

    from datasetdm_jax.labelers.composite import consensus_labels

    decoder = np.array([[0, 1, 2, 255]], np.uint8)
    attention = np.array([[0, 1, 3, 255]], np.uint8)
    assert consensus_labels(decoder, attention).tolist() == [[0, 1, 255, 255]]


def test_figure_shows_both_label_sets(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from datasetdm_jax.data import records

    rng = np.random.default_rng(0)
    exs = [records.to_example({"image": rng.integers(0, 255, (32, 32, 3), np.uint8), "prompt": "a red circle",
                               "index": i, "segmentation": rng.integers(0, 3, (32, 32)),
                               "attention_label": np.full((32, 32), 255 * (i % 2), np.uint8),
                               "depth": rng.uniform(1, 5, (32, 32))}) for i in range(6)]
    summary = records.write_shard(str(tmp_path), "data-00000-of-00001", exs, formats=("tfrecord",))
    (tmp_path / records.MANIFEST).write_text(json.dumps({"shards": [summary]}))
    result = _with_attention(_result(0.40, 0.47, 0.30, 0.40, 0.20, 0.15), (0.25, 0.20), (0.45, 0.36))
    demo._figure(str(tmp_path / "figure.png"), str(tmp_path), result)
    assert Image.open(tmp_path / "figure.png").size[1] == 1375  # five rows of images: 2.5 in each at 110 dpi
    # odd examples are all uncertain; even ones all background, where 1/3 of the P-Decoder pixels are 0
    segs = [ex["segmentation"] for ex in records.read_tfrecords(str(tmp_path))]
    expected = np.mean([(s == 0).mean() for s in segs[::2]])
    stats = demo.attention_label_stats(str(tmp_path))
    assert stats["ignored_fraction"] == 0.5 and abs(stats["agreement_with_p_decoder"] - expected) < 1e-4


def test_downstream_overrides_reach_the_downstream_config():
    """`downstream.overrides` sets fields of the downstream config the demo trains with (its recipe)."""
    from datasetdm_jax.config_utils import load_config

    base = demo.downstream_config(load_config("shapes_demo"))
    assert base.semantic.steps == 1000 and base.semantic.lr == 2e-2
    tuned = demo.downstream_config(load_config("shapes_demo", ["downstream.overrides=('semantic.lr=6e-3',)"]))
    assert tuned.semantic.lr == 6e-3 and tuned.semantic.steps == 1000 and tuned.depth.lr == base.depth.lr
