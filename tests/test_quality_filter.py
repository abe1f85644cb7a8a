"""Optional quality filter downstream: synthetic records below synthetic.min_quality are left out,
with counts reported; the (c) vs (c') comparison script on a tiny demo-like workdir."""

import json

import numpy as np
import pytest

from datasetdm_jax.data import records
from datasetdm_jax.downstream import data, quality, shapes_arrays

TINY = "configs/downstream_shapes.py:tiny"
QUALITY = [0.2, 0.9, 0.5, 0.7, 0.1, 0.8]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A demo-like workdir: WORKDIR/synthetic holds 6 records (32 px, semantic + depth) of known quality."""
    work = tmp_path_factory.mktemp("demo")
    out = work / "synthetic"
    out.mkdir()
    scenes = shapes_arrays("pretrain", len(QUALITY), image_size=32, progress=False)
    exs = [records.to_example({"image": scenes["image"][i], "segmentation": scenes["segmentation"][i],
                               "depth": scenes["depth"][i], "prompt": "p", "index": i, "quality": q})
           for i, q in enumerate(QUALITY)]
    shards = [records.write_shard(str(out), records.shard_name(k, 2), exs[3 * k:3 * k + 3], formats=("tfrecord",))
              for k in (0, 1)]
    (out / records.MANIFEST).write_text(json.dumps({"shards": shards}))
    return work, out, scenes


def test_min_quality_drops_the_right_records_and_counts_them(synthetic):
    _, out, scenes = synthetic
    counts = {}
    got = data.records_arrays(str(out), progress=False, min_quality=0.5, counts=counts)
    np.testing.assert_array_equal(got["image"], scenes["image"][[1, 2, 3, 5]])         # 0.9, 0.5, 0.7, 0.8
    np.testing.assert_array_equal(got["segmentation"], scenes["segmentation"][[1, 2, 3, 5]])
    assert counts == {"read": 6, "kept": 4, "dropped": 2, "min_quality": 0.5}
    got = data.records_arrays(str(out), 3, progress=False, min_quality=0.5, counts=counts)  # filter within num
    assert len(got["image"]) == 2 and counts == {"read": 3, "kept": 2, "dropped": 1, "min_quality": 0.5}
    assert len(data.records_arrays(str(out), progress=False, counts=counts)["image"]) == 6   # default: off
    assert counts["dropped"] == 0 and counts["min_quality"] == 0.0
    with pytest.raises(ValueError, match=r"min_quality=0.95 drops all 6 records"):
        data.records_arrays(str(out), progress=False, min_quality=0.95)
    np.testing.assert_allclose(quality.record_qualities(str(out)), QUALITY, rtol=1e-6)
    assert quality.threshold_for(np.asarray(QUALITY), 0.5) == pytest.approx(0.6)


def test_records_without_quality_are_refused(tmp_path, synthetic):
    _, _, scenes = synthetic
    ex = records.to_example({"image": scenes["image"][0], "segmentation": scenes["segmentation"][0], "index": 0})
    s = records.write_shard(str(tmp_path), records.shard_name(0, 1), [ex], formats=("tfrecord",))
    (tmp_path / records.MANIFEST).write_text(json.dumps({"shards": [s]}))
    with pytest.raises(ValueError, match="record 0 has no image/quality"):
        data.records_arrays(str(tmp_path), progress=False, min_quality=0.5)


def test_downstream_min_quality_override_reports_counts(tmp_path, synthetic, capsys):
    from datasetdm_jax import cli

    _, out, _ = synthetic
    cli.main(["downstream", "--config", TINY, "--workdir", str(tmp_path), f"synthetic.records={out}",
              "synthetic.min_quality=0.6", "rows=('real+synthetic',)", "tasks=('semantic',)"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_synthetic"] == 3
    assert report["synthetic_filter"] == {"read": 6, "kept": 3, "dropped": 3, "min_quality": 0.6}
    assert "kept 3 of 6 synthetic records" in capsys.readouterr().out


def test_quality_comparison_script_on_a_demo_workdir(synthetic, capsys):
    work, _, _ = synthetic
    result = quality.main(["--demo_config", "configs/shapes_demo.py:small", "--workdir", str(work),
                           "--downstream_config", TINY, "--tasks", "semantic", "--steps", "2",
                           "--drop_fraction", "0.5"])
    assert result["rows"] == ["real+synthetic", "real+filtered"]
    assert result["num_synthetic_by_row"] == {"real+synthetic": 6, "real+filtered": 3}
    assert result["synthetic_filter"]["kept"] == 3 and result["synthetic_filter"]["min_quality"] == pytest.approx(0.6)
    for row in result["rows"]:
        assert 0.0 <= result["semantic"][row]["test"]["miou"] <= 1.0
    printed = capsys.readouterr().out
    assert "(c') real + synth. q>=0.600" in printed and "kept 3 of 6" in printed
    table = (work / "quality_filter.txt").read_text().splitlines()
    assert [line.split()[-3] for line in table[1:]] == ["6", "3"]          # # synth. per row
    stored = json.loads((work / "quality_filter.json").read_text())
    assert stored["steps"] == {"semantic": 2} and stored["rows"] == result["rows"]
