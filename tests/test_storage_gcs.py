"""gs:// output against a real GCS JSON API: `gcp-storage-emulator` on 127.0.0.1, started here.

`datasetdm generate --out gs://...` killed with -9 and resumed, two processes (one of them killed,
then both rerun) into one bucket prefix, readers and export, all byte-identical to a local
uninterrupted run; a train workdir's own files in the bucket; unsupported schemes fail in one line
and never become a local folder. The client is pointed at the emulator the way a user would point it at a test server:
STORAGE_EMULATOR_HOST (gcsfs) and TENSORSTORE_GCS_HTTP_URL (orbax's arrays), anonymous credentials.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from tiny_sd import save_random_decoder

if not all(importlib.util.find_spec(m) for m in ("gcp_storage_emulator", "gcsfs")):  # not imported yet: see ENV
    pytest.skip("needs gcp-storage-emulator and gcsfs (requirements-ci.txt)", allow_module_level=True)

from datasetdm_jax import dataset_writer, export, labelers, pretrained, smoke, storage, train  # noqa: E402
from datasetdm_jax.config_utils import load_config  # noqa: E402
from datasetdm_jax.data import records, records_tfds  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
TINY = os.path.join(CONFIGS, "shapes_semantic.py") + ":tiny"
NUM = 8  # 3 shards of 3, 3, 2 (tiny: shard_size 3, batch 2)
CACHE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
BUCKET = "datasetdm-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator on a free port, this process's clients pointed at it, a bucket; the env to give
    subprocesses. Stopped (and its in-memory objects dropped) after the module."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("emulator") / "emulator.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory", "--quiet"], stdout=log, stderr=subprocess.STDOUT)
    # gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT on import: off, it would ask the emulator for the bucket
    # type over gRPC (which it does not serve) before every call
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}",
           "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "EPATH_USE_TF": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "gcp-storage-emulator did not start"
                time.sleep(0.1)
        import fsspec
        import gcsfs

        fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=env["STORAGE_EMULATOR_HOST"], skip_instance_cache=True)
        fs.mkdir(BUCKET)
        fsspec.config.conf.setdefault("gs", {})["token"] = "anon"  # this process's epath/gcsfs clients
        yield {"env": env, "fs": fs, "url": f"gs://{BUCKET}"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def setup(tmp_path_factory, gcs):
    """A tiny random SD and decoder, and the local uninterrupted reference dataset."""
    root = tmp_path_factory.mktemp("gcs")
    model = pretrained.save_pipeline(smoke.random_pipeline(root / "src"), root / "model")
    overrides = [f"pipeline={model}", f"workdir={root / 'wd'}"]
    config = load_config(TINY, overrides)
    trainer = train.Trainer(config)
    save_random_decoder(config, trainer)
    ref = root / "ref"
    dataset_writer.generate_dataset(config, NUM, str(ref), labeler=labelers.make_labeler(config), progress=False)
    return root, overrides, ref, config, trainer


def _local_files(folder) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder)) if n != dataset_writer.LOG_DIR}


def _bucket_files(fs, url: str) -> dict[str, bytes]:
    prefix = url.removeprefix("gs://").rstrip("/")
    return {p[len(prefix) + 1:]: fs.cat_file(p) for p in sorted(fs.find(prefix))
            if not p[len(prefix) + 1:].startswith(dataset_writer.LOG_DIR + "/")}


def _cli(root, gcs, args):
    env = {**os.environ, **gcs["env"], "DATASETDM_JAX_CACHE": CACHE}
    return subprocess.Popen([sys.executable, "-m", "datasetdm_jax.cli", "generate", "--config", TINY, *args],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(fs, path: str, procs, timeout: float = 900) -> None:
    deadline = time.time() + timeout  # generous: CI machines can be very busy
    while time.time() < deadline and all(p.poll() is None for p in procs):
        fs.invalidate_cache()
        if fs.exists(path):
            return
        time.sleep(0.05)


def test_unsupported_schemes_fail_in_one_line(gcs, tmp_path, monkeypatch, capsys):  # gcs: its env before gcsfs loads
    from datasetdm_jax import cli

    monkeypatch.chdir(tmp_path)
    for url, words in [("foo://bucket/x", "foo:// is not a supported storage location"),
                       ("s3://bucket/x", "s3:// is not a supported storage location"),
                       ("gs://", "no bucket named")]:
        with pytest.raises(SystemExit) as e:
            cli.main(["generate", "--config", TINY, "--num_images", "2", "--out", url])
        err = capsys.readouterr().err.strip() or str(e.value.code)
        assert e.value.code != 0 and err.startswith("datasetdm generate: error: ") and words in err
        assert "\n" not in err and "Traceback" not in err
        with pytest.raises(ValueError, match=words.replace("/", ".")):
            export.export_folder(url, str(tmp_path / "exported"))
        with pytest.raises(ValueError, match=words.replace("/", ".")):
            export.export_folder(str(tmp_path), url)
    assert os.listdir(tmp_path) == []  # no local folder named foo:, s3: or gs:


def test_generate_into_bucket_killed_resumed_read_and_exported(setup, gcs):
    root, overrides, ref, _, _ = setup
    fs, url = gcs["fs"], gcs["url"] + "/killed"
    args = ["--num_images", str(NUM), "--out", url, *overrides]
    p = _cli(root, gcs, args)
    _wait_for(fs, f"{url}/data-00000-of-00003.json", [p])
    p.send_signal(signal.SIGKILL)
    log = p.communicate()[0]
    assert fs.exists(f"{url}/data-00000-of-00003.json"), log
    assert not fs.exists(f"{url}/{records.MANIFEST}")                  # killed mid-run
    progress = [json.loads(x) for x in fs.cat_file(f"{url}/logs/process-0.jsonl").decode().splitlines()]
    assert progress[0]["event"] == "start" and progress[0]["images_total"] == NUM   # readable while it ran
    assert all(x["event"] == "shard" and x["shards_done"] == 1 and x["images_done"] == 3 for x in progress[1:2])
    p = _cli(root, gcs, args)
    log = p.communicate(timeout=900)[0]
    assert p.returncode == 0, log
    assert "img/s" in log and f"generate: 8 images in 3 shard(s) at {url}" in log
    assert _bucket_files(fs, url) == _local_files(ref)                 # byte-identical to the local run
    assert not (root / "gs:").exists()
    lines = [json.loads(x) for x in fs.cat_file(f"{url}/logs/process-0.jsonl").decode().splitlines()]
    assert [x["event"] for x in lines[-4:]] == ["start", "shard", "shard", "shards_written"]
    assert lines[-2]["images_done"] == NUM and lines[-2]["shards_done"] == 3 and lines[-2]["images_per_s"] > 0
    # readers straight from the bucket
    exs = list(records.read_examples(url))
    want = list(records.read_examples(str(ref)))
    assert [e["index"] for e in exs] == list(range(NUM))
    np.testing.assert_array_equal(exs[5]["image"], want[5]["image"])
    np.testing.assert_array_equal(records.grain_source(url)[5]["segmentation"], want[5]["segmentation"])
    assert len(records_tfds.tfds_source(url)) == NUM
    # export from the bucket, into a local folder and into the bucket: the same files
    stats = export.export_folder(url, str(root / "exported"))
    assert stats["images"] == NUM
    local_ref = export.export_folder(str(ref), str(root / "exported_ref"))
    assert stats == local_ref
    export.export_folder(url, url + "-exported")
    for rel in ("annotations.json", "prompts.jsonl", "images/00000005.jpg", "segmentation/00000007.png"):
        assert (root / "exported" / rel).read_bytes() == (root / "exported_ref" / rel).read_bytes()
        assert fs.cat_file(f"{url}-exported/{rel}".removeprefix("gs://")) == (root / "exported" / rel).read_bytes()


def test_two_processes_one_killed_then_rerun_into_one_prefix(setup, gcs):
    root, overrides, ref, _, _ = setup
    fs, url = gcs["fs"], gcs["url"] + "/multi"

    def launch():
        port = _free_port()
        return [_cli(root, gcs, ["--num_images", str(NUM), "--out", url, "--coordinator", f"127.0.0.1:{port}",
                                 "--num_processes", "2", "--process_id", str(k), *overrides]) for k in (0, 1)]

    procs = launch()  # process 0 makes shards 0 and 2, process 1 shard 1
    _wait_for(fs, f"{url}/data-00000-of-00003.json", procs)
    procs[0].send_signal(signal.SIGKILL)                             # the coordinator dies mid-run
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert procs[1].returncode != 0, logs[1]                          # its peer fails, with a reason
    assert ("another process of this run failed or died" in logs[1]
            or "JAX distributed service detected fatal errors" in logs[1]), logs[1]
    assert not fs.exists(f"{url}/{records.MANIFEST}")
    procs = launch()                                                  # rerun every process: finishes
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert _bucket_files(fs, url) == _local_files(ref)
    for k in (0, 1):
        lines = [json.loads(x) for x in fs.cat_file(f"{url}/logs/process-{k}.jsonl").decode().splitlines()]
        assert lines[-1]["event"] == "shards_written" and lines[-1]["process"] == k and lines[-1]["processes"] == 2


def test_train_workdir_in_bucket(gcs, tmp_path):
    """`train --workdir gs://...`: the workdir's own files (metrics.jsonl appended and cut back on
    resume, the best-checkpoint probe, the checkpoint folder, which stays a gs:// URL for orbax) go
    through the bucket; another scheme is refused in one line before any work. Orbax's array writes
    (tensorstore's GCS client, pointed here by TENSORSTORE_GCS_HTTP_URL) cannot be checked against this
    emulator: tensorstore updates an OCDBT manifest conditionally on the object generation read back
    from the x-goog-generation response header, which gcp-storage-emulator does not send
    ("Malformed StorageGeneration"). Checkpoint + resume itself runs on a local workdir through the
    same code (tests/test_train.py::test_resume_equals_uninterrupted)."""
    from datasetdm_jax import training_state

    fs, wd = gcs["fs"], gcs["url"] + "/train-wd"
    for step in (1, 2, 3):
        training_state.append_metrics(wd, {"stage": train.STAGE, "step": step, "loss": 1.0 / step})
    training_state.append_metrics(wd, {"stage": "other", "step": 9})
    training_state.truncate_metrics(wd, train.STAGE, 2)                  # resumed from the step-2 checkpoint
    recs = [json.loads(x) for x in fs.cat_file(f"{wd}/{train.METRICS_FILE}").decode().splitlines()]
    assert [(r["stage"], r["step"]) for r in recs] == [(train.STAGE, 1), (train.STAGE, 2), ("other", 9)]
    mngr = training_state.checkpoint_manager(wd, train.STAGE, 2)
    try:
        assert str(mngr.directory) == f"{wd}/{train.STAGE}" and mngr.latest_step() is None
    finally:
        mngr.close()
    best = training_state.BestCheckpoint("mIoU")
    assert best.restore_args(f"{wd}/{train.STAGE}/2", {}) == {}          # no 'best' item in the bucket
    storage.write_bytes(f"{wd}/{train.STAGE}/2/best/_METADATA", "{}")
    assert set(best.restore_args(f"{wd}/{train.STAGE}/2", {})) == {"best", "best_meta"}
    with pytest.raises(ValueError, match="foo:// is not a supported storage location"):
        train.run(load_config(TINY), "foo://bucket/wd")
    assert not os.path.exists("foo:")
