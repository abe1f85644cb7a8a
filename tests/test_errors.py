"""Bad input and interruptions: one line `datasetdm CMD: error: ...` (exit 2) naming the file or key,
found before a model loads or a file is written; Ctrl-C exits 130 with how to go on; a real bug keeps
its traceback and says it is one. No test here loads a model (make_labeler is booby-trapped)."""

import json
import os
import runpy
import sys
import time

import numpy as np
import pytest

from datasetdm_jax import cli, dataset_writer, errors, export, hub
from datasetdm_jax.data import records, shapes

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
TINY = os.path.join(CONFIGS, "shapes_semantic.py") + ":tiny"


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    """Validation must come first: loading a model (building the labeller) fails the test."""
    from datasetdm_jax import labelers

    def trap(*a, **k):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(labelers, "make_labeler", trap)


def run_cli(argv, capsys):
    """``cli.main(argv)`` -> (exit code, stderr); the command must fail."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, capsys.readouterr().err.strip()


def one_line_error(code, err, cmd):
    assert code == errors.EXIT_USER, err
    assert err.startswith(f"datasetdm {cmd}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def make_data(folder, quality=0.5, n=4, formats=("tfrecord", "array_record")):
    """A finished generated dataset of ``n`` shapes scenes (one shard), without a model."""
    os.makedirs(folder, exist_ok=True)
    exs = []
    for i in range(n):
        sc = shapes.render_scene(i, shapes.ShapesConfig(image_size=32))
        exs.append(records.to_example({"image": sc["image"], "prompt": sc["caption"], "classes": [], "index": i,
                                       "seed": 0, "segmentation": sc["segmentation"], "quality": quality}))
    s0 = records.write_shard(str(folder), records.shard_name(0, 1), exs, formats=formats)
    records.atomic_write(os.path.join(folder, records.MANIFEST),
                         json.dumps({"shards": [s0], "class_names": list(shapes.CLASSES)}))
    return str(folder)


def listing(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


# -- generate: config values and --out, checked before anything else ------------------------------

def test_override_of_the_wrong_type_names_key_value_and_type(tmp_path, capsys):
    t0 = time.time()
    err = one_line_error(*run_cli(["generate", "--config", TINY, "--num_images", "2", "--out", str(tmp_path / "o"),
                                   "generate.steps=abc"], capsys), "generate")
    assert "generate.steps" in err and "'abc'" in err and "integer" in err
    assert time.time() - t0 < 30 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("setting, words", [("generate.steps=-1", "generate.steps=-1: expected an integer >= 1"),
                                            ("generate.batch_size=0", "generate.batch_size=0"),
                                            ("generate.scheduler=nosuch", "generate.scheduler='nosuch': expected one of"),
                                            ("generate.guidance=1e999", "generate.guidance=inf: expected a number"),
                                            ("dtype=fp8", "dtype='fp8': expected one of auto, float32, bfloat16"),
                                            ("generate.param_sharding=zero", "generate.param_sharding='zero': expected one of replicated, fsdp")])
def test_bad_setting_is_refused_before_the_spec_is_written(tmp_path, capsys, setting, words):
    """A failed run must not lock its folder: nothing is written before the settings are checked."""
    out = tmp_path / "o"
    err = one_line_error(*run_cli(["generate", "--config", TINY, "--num_images", "2", "--out", str(out), setting],
                                  capsys), "generate")
    assert words in err and not out.exists()


@pytest.mark.parametrize("args, words", [(["--config", TINY, "generate.stepz=5"], "no config field 'stepz'"),
                                         (["--config", "nowhere.py"], "config file not found: nowhere.py")])
def test_unknown_key_and_missing_config_file(tmp_path, capsys, args, words):
    err = one_line_error(*run_cli(["generate", "--num_images", "2", "--out", str(tmp_path / "o"), *args], capsys),
                         "generate")
    assert words in err and not (tmp_path / "o").exists()


def test_num_images_below_one(tmp_path, capsys):
    err = one_line_error(*run_cli(["generate", "--config", TINY, "--num_images", "0", "--out", str(tmp_path / "o")],
                                  capsys), "generate")
    assert "--num_images=0" in err


def test_a_spec_left_by_a_run_that_wrote_no_shard_does_not_lock_the_folder(tmp_path):
    out = str(tmp_path)
    old = {"format": dataset_writer.FORMAT, "config": {"generate": {"steps": 3}}, "num_images": 2}
    new = {**old, "config": {"generate": {"steps": 4}}}
    records.atomic_write(os.path.join(out, dataset_writer.SPEC_FILE), json.dumps(old))
    assert dataset_writer._check_spec(out, new, old) == new   # nothing was generated: the new spec replaces it
    assert json.loads((tmp_path / dataset_writer.SPEC_FILE).read_text()) == new
    records.atomic_write(os.path.join(out, records.shard_name(0, 1) + ".json"), "{}")  # a finished shard
    with pytest.raises(errors.UserError, match="different setting"):
        dataset_writer._check_spec(out, old, new)


def _unwritable(tmp_path):
    if os.geteuid() == 0:  # root writes through mode bits; /proc takes no new files from anyone
        return "/proc/datasetdm-test/out"
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return str(folder / "out")


@pytest.mark.parametrize("where, words", [
    ("file", "is a file, not a folder"),
    ("below_file", "is a file, so no folder can be made below it"),
    ("unwritable", "no permission to write"),
    ("scheme", "s3:// is not a supported storage location")])
def test_unusable_out_fails_at_once_for_generate_and_export(tmp_path, capsys, where, words):
    (tmp_path / "afile").write_text("x")
    out = {"file": str(tmp_path / "afile"), "below_file": str(tmp_path / "afile" / "sub"),
           "unwritable": _unwritable(tmp_path), "scheme": "s3://bucket/x"}[where]
    t0 = time.time()
    err = one_line_error(*run_cli(["generate", "--config", TINY, "--num_images", "2", "--out", out], capsys),
                         "generate")
    assert words in err and out in err and time.time() - t0 < 30
    data = make_data(tmp_path / "data")
    err = one_line_error(*run_cli(["export", "--data", data, "--out", out], capsys), "export")
    assert words in err
    assert (tmp_path / "afile").read_text() == "x"


def test_user_path_oserrors_are_one_line_and_name_the_path(capsys):
    for exc in (FileExistsError(17, "File exists", "/x/y"), NotADirectoryError(20, "Not a directory", "/f/z"),
                PermissionError(13, "Permission denied", "/ro/w"), FileNotFoundError(2, "No such file", "/no")):
        with pytest.raises(SystemExit) as e, errors.boundary("datasetdm generate"):
            raise exc
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and exc.filename in err and "\n" not in err


# -- export: never mixed, quality checked, incomplete output marked --------------------------------

def test_export_refuses_an_export_of_other_data_and_replaces_its_own(tmp_path, capsys):
    d1, d2 = make_data(tmp_path / "d1", 0.5), make_data(tmp_path / "d2", 0.9, n=3)
    out = str(tmp_path / "e")
    cli.main(["export", "--data", d1, "--out", out])
    before = {p: (tmp_path / "e" / p).read_bytes() for p in listing(out)}
    assert "images/00000003.jpg" in before and export.EXPORT_FILE in before and export.INCOMPLETE_FILE not in before
    err = one_line_error(*run_cli(["export", "--data", d2, "--out", out], capsys), "export")
    assert "holds an export of another dataset" in err and d1 in err
    assert {p: (tmp_path / "e" / p).read_bytes() for p in listing(out)} == before  # untouched
    # the same data again, fewer images: the earlier export is replaced whole, nothing of it left beside
    cli.main(["export", "--data", d1, "--out", out])
    assert listing(out) == sorted(before)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    err = one_line_error(*run_cli(["export", "--data", d1, "--out", str(foreign)], capsys), "export")
    assert "not empty and holds no export" in err and listing(foreign) == ["notes.txt"]


def test_export_replacing_its_own_export_leaves_no_old_image(tmp_path):
    data = make_data(tmp_path / "d", 0.5)
    out = str(tmp_path / "e")
    export.export_folder(data, out)
    # an earlier export that had more images (say of a longer run of the same data)
    (tmp_path / "e" / "images" / "00000099.jpg").write_bytes(b"old")
    stats = export.export_folder(data, out)
    assert stats["images"] == 4 and "images/00000099.jpg" not in listing(out)
    coco = json.loads((tmp_path / "e" / "annotations.json").read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == [f"images/{k:08d}.jpg" for k in range(4)]


@pytest.mark.parametrize("value", ["nan", "2", "-0.1", "inf"])
def test_min_quality_outside_0_1_is_refused(tmp_path, capsys, value):
    data = make_data(tmp_path / "d")
    err = one_line_error(*run_cli(["export", "--data", data, "--out", str(tmp_path / "e"), "--min_quality", value],
                                  capsys), "export")
    assert "--min_quality" in err and "[0, 1]" in err and not (tmp_path / "e").exists()


def test_min_quality_that_leaves_nothing_is_an_error_not_an_empty_export(tmp_path, capsys):
    data = make_data(tmp_path / "d", quality=0.5)
    err = one_line_error(*run_cli(["export", "--data", data, "--out", str(tmp_path / "e"), "--min_quality", "0.6"],
                                  capsys), "export")
    assert "leaves out all 4 examples" in err and "0.5" in err
    assert (tmp_path / "e" / export.INCOMPLETE_FILE).exists() and not (tmp_path / "e" / "annotations.json").exists()


def test_interrupted_export_is_marked_incomplete_and_a_rerun_finishes_it(tmp_path, capsys, monkeypatch):
    data = make_data(tmp_path / "d")
    out = tmp_path / "e"
    real, calls = records.encode_jpeg, []

    def ctrl_c_on_the_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(records, "encode_jpeg", ctrl_c_on_the_third)
    code, err = run_cli(["export", "--data", data, "--out", str(out)], capsys)
    assert code == errors.EXIT_INTERRUPTED and "INCOMPLETE" in err and "rerun the same command" in err
    assert (out / export.INCOMPLETE_FILE).exists() and not (out / "annotations.json").exists()
    assert data in json.loads((out / export.INCOMPLETE_FILE).read_text())["note"]
    monkeypatch.setattr(records, "encode_jpeg", real)
    cli.main(["export", "--data", data, "--out", str(out)])
    assert not (out / export.INCOMPLETE_FILE).exists() and len(listing(out / "images")) == 4


# -- corrupt input files: the message names the file -----------------------------------------------

def test_corrupt_manifest_names_the_file(tmp_path, capsys):
    data = make_data(tmp_path / "d")
    (tmp_path / "d" / records.MANIFEST).write_bytes(b'{"shards": [\x01')
    err = one_line_error(*run_cli(["export", "--data", data, "--out", str(tmp_path / "e")], capsys), "export")
    assert os.path.join(data, records.MANIFEST) in err and "corrupt" in err


@pytest.mark.parametrize("fmt", ["array_record", "tfrecord"])
def test_corrupt_shard_names_the_file(tmp_path, capsys, fmt):
    data = make_data(tmp_path / "d", formats=(fmt,))
    shard = tmp_path / "d" / (records.shard_name(0, 1) + records.FORMATS[fmt])
    b = bytearray(shard.read_bytes())
    for k in (200, 1000):
        b[k] ^= 0xFF
    shard.write_bytes(bytes(b))
    err = one_line_error(*run_cli(["export", "--data", data, "--out", str(tmp_path / "e")], capsys), "export")
    assert err.split("error: ")[1].startswith(str(shard)) and "corrupt" in err
    assert records.shard_name(0, 1) + ".json" in err  # what to delete to make the shard again


def test_config_file_with_a_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(arg=None):\n    return {\n")
    err = one_line_error(*run_cli(["generate", "--config", str(bad), "--num_images", "2",
                                   "--out", str(tmp_path / "o")], capsys), "generate")
    assert str(bad) in err and "line" in err


def test_corrupt_spec_names_the_file(tmp_path):
    (tmp_path / dataset_writer.SPEC_FILE).write_text("{not json")
    with pytest.raises(errors.UserError, match="spec.json is corrupt"):
        dataset_writer._stored_spec(str(tmp_path))


# -- python -m datasetdm_jax.data.sources: dataset faults in one line -------------------------------

@pytest.mark.parametrize("layout", ["missing", "wrong"])
def test_sources_listing_reports_dataset_faults_in_one_line(tmp_path, capsys, monkeypatch, layout):
    root = tmp_path / "voc"
    if layout == "wrong":
        (root / "JPEGImages").mkdir(parents=True)   # no label folder, no ImageSets
    monkeypatch.setattr(sys, "argv", ["sources", os.path.join(CONFIGS, "voc_semantic.py"), f"data.root={root}"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("datasetdm_jax.data.sources", run_name="__main__")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith("python -m datasetdm_jax.data.sources: error: ") and str(root) in err


# -- the missing model of a paper config names that model, not the shapes world --------------------

def test_missing_sd14_weights_name_the_repo_not_the_shapes_pretraining(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hub.HubError) as e:
        dataset_writer._model_fingerprint("models/stable-diffusion-v1-4")   # configs/voc_semantic.py's pipeline
    assert "pipeline=CompVis/stable-diffusion-v1-4" in str(e.value) and "datasetdm pretrain" not in str(e.value)
    assert "datasetdm pretrain" in hub.model_hint(str(tmp_path / "my_shapes_model"))


# -- interruptions and real bugs -------------------------------------------------------------------

def test_ctrl_c_exits_130_with_the_resume_hint(tmp_path, capsys, monkeypatch):
    from datasetdm_jax import train

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "main_train", interrupted)
    code, err = run_cli(["train", "--config", TINY, "--workdir", str(tmp_path)], capsys)
    assert code == 130 and "datasetdm train: interrupted; rerun the same command to resume" in err


def test_a_bug_keeps_its_traceback_and_says_it_is_one(tmp_path, capsys, monkeypatch):
    def buggy(*a, **k):
        return {}["images"]

    monkeypatch.setattr(export, "main_export", buggy)
    code, err = run_cli(["export", "--data", str(tmp_path), "--out", str(tmp_path / "e")], capsys)
    assert code == 1 and "Traceback" in err and "KeyError" in err and "this is a bug" in err


def test_user_error_or_bug():
    def raise_in_numpy():
        np.zeros(3).reshape(2)

    def raise_in_the_package():
        records.check_formats(("parquet",))   # the package's own check of a user's setting

    for fn, user in ((raise_in_numpy, False), (raise_in_the_package, True)):
        try:
            fn()
        except ValueError as e:
            assert errors.is_user_error(e) is user
    assert errors.is_user_error(errors.UserError("x")) and errors.is_user_error(PermissionError(13, "no", "/p"))
    assert not errors.is_user_error(KeyError("x")) and not errors.is_user_error(OSError(5, "I/O error"))
