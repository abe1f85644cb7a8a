"""`datasetdm exp proof` on a tiny random SD: every row, finite numbers, cached stages, refused stale checkpoints."""

import json
import math
import os

import pytest

from datasetdm_jax import pretrained, smoke, train
from datasetdm_jax.research import baselines, proof
from datasetdm_jax.config_utils import load_config

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_proof.py") + ":tiny"


@pytest.fixture(scope="module")
def proof_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("proof")
    model = str(pretrained.save_pipeline(smoke.random_pipeline(root / "src"), root / "model"))
    config = load_config(CONFIG, [f"model={model}", f"workdir={root / 'out'}"])
    return config, proof.run(config, progress=False)


def test_report_has_every_row_with_finite_numbers(proof_run):
    config, report = proof_run
    assert list(report["rows"]) == list(proof.ROWS)
    splits = report["settings"]["splits"]
    assert splits == ["test", "test_shifted"]
    for row, r in report["rows"].items():
        assert set(r) == ({"p_decoder"} if row == proof.DS_ROW else {"p_decoder", "scratch"}), row
        for res in r.values():
            assert res["trainable_params"] > 0 and res["train_s"] > 0 and res["steps"] == 2, (row, res)
            for s in splits:
                for key, *_ in proof.METRICS[proof._task(row)]:
                    assert math.isfinite(res[s][key]), (row, s, key, res[s])
    pd, sc = report["rows"]["semantic"]["p_decoder"], report["rows"]["semantic"]["scratch"]
    assert pd["frozen_params"] > 0 and sc["frozen_params"] == 0
    assert len(pd["test"]["per_class_iou"]) == len(report["settings"]["class_names"]) == 8
    # 'auto' width: the candidate (4 or 8) closest in size to the P-Decoder
    target = pd["trainable_params"]
    best = min((4, 8), key=lambda w: abs(math.log(baselines.scratch_params(
        proof.task_config(config, "semantic", "", "x"), w) / target)))
    assert sc["model"].startswith(f"scratch conv backbone (width {best})")
    # 4 tasks x 2 splits + deep supervision x 2 splits
    assert len(report["claims"]) == 10 and all(isinstance(c["holds"], bool) for c in report["claims"])
    workdir = str(config.workdir)
    assert json.load(open(os.path.join(workdir, "report.json")))["rows"].keys() == report["rows"].keys()
    table = open(os.path.join(workdir, "table.md")).read()
    for text in ("mIoU", "mask AP", "REL", "keypoint AP", "P-Decoder without deep supervision", "Per-class IoU",
                 "| background |"):
        assert text in table, text
    assert "| star |" not in table  # not a class of this world: absent from every test set, left out


def test_rerun_reuses_every_stage(proof_run, monkeypatch):
    config, report = proof_run

    def refuse(*a, **k):
        raise AssertionError("a cached stage was recomputed")
    monkeypatch.setattr(train, "run", refuse)
    monkeypatch.setattr(baselines, "train_scratch", refuse)
    again = proof.run(config, progress=False)
    assert json.dumps(again["rows"]) == json.dumps(report["rows"])
    # another test set rescores both models without retraining either (both trainers are refused)
    changed = load_config(CONFIG, [f"model={config.model}", f"workdir={config.workdir}", "eval.num_images=4",
                                   "rows=depth"])
    rescored = proof.run(changed, progress=False)
    assert list(rescored["rows"]) == ["depth"] and rescored["settings"]["num_test_images"] == 4
    for m in ("p_decoder", "scratch"):
        old, new = report["rows"]["depth"][m], rescored["rows"]["depth"][m]
        assert new["trainable_params"] == old["trainable_params"] and new["train_s"] == old["train_s"]
        assert new["test"]["rel"] != old["test"]["rel"]  # scored on 4 images instead of 2


def test_checkpoint_of_another_model_is_refused(proof_run):
    config, _ = proof_run
    key_file = os.path.join(str(config.workdir), "depth", "p_decoder", proof.KEY_FILE)
    key = json.load(open(key_file))
    with open(key_file, "w") as f:
        json.dump({**key, "model": "another"}, f)
    try:
        with pytest.raises(ValueError, match="another model or settings"):
            proof.run(config, progress=False)
    finally:
        with open(key_file, "w") as f:
            json.dump(key, f)


def test_claims_can_fail():
    res = lambda v: {"test": {"miou": v}}
    rows = {"semantic": {"p_decoder": {**res(0.3), "deep_supervision": True}, "scratch": res(0.5)},
            proof.DS_ROW: {"p_decoder": res(0.35)},
            "depth": {"p_decoder": {"test": {"rel": 0.1}}, "scratch": {"test": {"rel": 0.2}}}}
    claims = proof.check_claims(rows, ["test"])
    assert [c["holds"] for c in claims] == [False, True, False]
    assert claims[0]["measured"] == {"p_decoder": 0.3, "scratch": 0.5}
