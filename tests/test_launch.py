"""launch/tpu.py --dry-run prints every gcloud command and runs none."""

import os
import shlex
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "launch", "tpu.py")
BASE = ["--name", "dsdm", "--zone", "us-west4-a", "--accelerator-type", "v4-32", "--bucket", "gs://bk",
        "--project", "proj", "--dry-run"]


def _dry(*args, path=None):
    env = {**os.environ, "PATH": path} if path is not None else None
    r = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env)
    return r.returncode, [shlex.split(line) for line in r.stdout.splitlines()], r.stderr


def test_all_prints_every_step_in_order(tmp_path):
    # An empty PATH: were anything executed (gcloud, git), the run would fail.
    rc, cmds, err = _dry("all", *BASE, "--model-src", "gs://bk/models/shapes_sd", "--decoder-src", str(tmp_path),
                         "--num_images", "5000", "--run", "r7", "--spot", "generate.steps=50", path="")
    assert rc == 0, err
    heads = [c[:5] for c in cmds]
    assert heads[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert heads[-1] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"]
    create = cmds[0]
    assert {"dsdm", "--zone=us-west4-a", "--project=proj", "--accelerator-type=v4-32", "--spot"} <= set(create)
    assert cmds[1][:2] == ["git", "archive"] and "scp" in cmds[2] and "--worker=all" in cmds[2]
    ssh = [c for c in cmds if c[4] == "ssh"]
    assert all("--worker=all" in c and "--zone=us-west4-a" in c for c in ssh)
    scripts = [next(a for a in c if a.startswith("--command="))[len("--command="):] for c in ssh]
    assert "pip install -q -e . 'jax[tpu]==0.10.2'" in scripts[0]
    # a gs:// model is pulled directly; a local decoder folder is uploaded once, then pulled
    assert "gs://bk/models/shapes_sd datasetdm-jax/models/shapes_sd" in scripts[1]
    upload = [c for c in cmds if c[:3] == ["gcloud", "storage", "rsync"]]
    assert upload == [["gcloud", "storage", "rsync", "--recursive", str(tmp_path), "gs://bk/weights/runs_shapes_semantic"]]
    gen = shlex.split(scripts[3].split("&& ", 1)[1])
    assert gen == [".venv/bin/datasetdm", "generate", "--distributed", "--config", "configs/shapes_semantic.py",
                   "--num_images", "5000", "--out", "~/datasetdm-out/r7", "generate.steps=50"]
    assert scripts[4] == "gcloud storage rsync --recursive ~/datasetdm-out/r7 gs://bk/datasets/r7"


@pytest.mark.parametrize("step, first", [("create", "create"), ("delete", "delete"), ("gather", "ssh")])
def test_single_steps(step, first):
    rc, cmds, err = _dry(step, *BASE)
    assert rc == 0, err
    assert len(cmds) == 1 and cmds[0][4] == first


def test_clone_instead_of_shipping_the_checkout():
    rc, cmds, _ = _dry("setup", *BASE, "--repo", "https://example.com/x.git", "--revision", "v1")
    assert rc == 0 and len(cmds) == 1
    assert "git clone -q https://example.com/x.git datasetdm-jax" in cmds[0][-1]
    assert "git checkout -q v1" in cmds[0][-1]


def test_bad_bucket_is_a_one_line_error():
    rc, cmds, err = _dry("create", *[a if a != "gs://bk" else "bk" for a in BASE])
    assert rc != 0 and cmds == [] and "--bucket must be a gs:// path" in err
