"""The Colab notebooks, executed end to end on CPU with nbclient: any failing cell fails the test.

`quickstart.ipynb` runs the real small demo (configs/shapes_demo.py:small) into a temporary workdir;
`stable_diffusion_tpu.ipynb` runs with its parameters cell pointed at a tiny random diffusers-format
SD and a tiny fake VOC folder (its install and download cells are guarded by IN_COLAB and skip).
The kernel inherits this process's environment: CPU, 2 host devices and the persistent compile cache.
The install cell itself (what Colab runs) is executed here with a stand-in ``google.colab`` and pip.
"""

import json
import os
import re
import subprocess
import sys
import types

import nbformat
import pytest
from nbclient import NotebookClient

from datasetdm_jax import pretrained, smoke
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.data import records, voc
from datasetdm_jax.downstream import compare
from fake_voc import write_fake_voc

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
COLAB = os.path.join(ROOT, "colab")
CACHE = os.path.join(ROOT, ".jax_cache")
TINY_DECODER = {"hidden": 32, "num_queries": 21, "num_layers": 2, "heads": 4, "ffn": 64}
# The shipped model and every stage of the small demo, at the fewest steps and images that still
# exercise each cell (the notebook's own OVERRIDES parameter; the small demo as it is took 4.3 min).
_FEW = "('data.num_images=16', 'val.num_images=8')"
QUICKSTART_OVERRIDES = [
    "decoders.semantic.steps=8", "decoders.depth.steps=8", "decoders.semantic.eval_images=8",
    "decoders.depth.eval_images=8", f"decoders.semantic.overrides={_FEW}", f"decoders.depth.overrides={_FEW}",
    "generate.num_images=16", "generate.steps=4", "generate.shard_size=16",
    "downstream.semantic_steps=8", "downstream.depth_steps=8", "downstream.test_images=16"]


@pytest.fixture(autouse=True)
def kernel_env(monkeypatch):
    """What tests/conftest.py sets with jax.config, as the env vars a fresh kernel reads."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=2"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", CACHE)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def _execute(name: str, params: dict, timeout: int):
    """Runs colab/<name> with ``params`` appended to its parameters cell; returns the executed notebook."""
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}: outputs not cleared"
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: expected one cell tagged 'parameters'"
    for key in params:
        assert re.search(rf"^{key} = ", cells[0].source, re.M), f"{name}: no parameter {key}"
    cells[0].source += "\n# test overrides\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": COLAB}}).execute()
    return nb


def _outputs(nb, kind: str) -> list:
    """Every output of the executed notebook that carries ``kind`` ('image/png' or 'text')."""
    found = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if kind == "text" and o.get("output_type") == "stream":
                found.append(o["text"])
            elif kind in o.get("data", {}):
                found.append(o["data"][kind])
    return found


def _downloads_guarded(name: str) -> None:
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    for c in nb.cells:
        if c.cell_type == "code" and re.search(r"snapshot_download\(|urlretrieve\(|\"install\"|git\", \"clone", c.source):
            assert "if IN_COLAB" in c.source, f"{name}: an install/download cell runs outside Colab"


@pytest.mark.parametrize("name, extra", [("quickstart.ipynb", "cpu"), ("stable_diffusion_tpu.ipynb", "tpu")])
def test_colab_install_cell(name, extra, monkeypatch, tmp_path):
    """In Colab the setup cell stops with a clear message while REPO_URL is unset, and otherwise
    pip-installs the package from it with the extra that pins JAX ([cpu] or [tpu])."""
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])][0]
    setup = [c for c in nb.cells if c.cell_type == "code" and "google.colab" in c.source]
    assert len(setup) == 1 and nb.cells.index(params) < nb.cells.index(setup[0])
    assert re.search(r'^REPO_URL = ""', params.source, re.M)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(cmd))
    with pytest.raises(RuntimeError, match="REPO_URL is not set: in the parameters cell above"):
        exec(setup[0].source, {"REPO_URL": ""})
    assert calls == []
    url = "https://example.org/datasetdm-jax.git@v0.1.0"
    exec(setup[0].source, {"REPO_URL": url})
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", f"datasetdm-jax[{extra}] @ git+{url}"]]


def test_stable_diffusion_tpu_notebook(tmp_path):
    _downloads_guarded("stable_diffusion_tpu.ipynb")
    model = pretrained.save_pipeline(smoke.random_pipeline(tmp_path / "src"), tmp_path / "model")
    workdir = tmp_path / "run"
    nb = _execute("stable_diffusion_tpu.ipynb", dict(
        MODEL=str(model), VOC_ROOT=write_fake_voc(str(tmp_path / "VOC2012")), VOC_SPLIT="train_aug",
        WORKDIR=str(workdir), IMAGE_SIZE=32, PER_CLASS=1, MIN_PIXELS=100, BATCH_PER_DEVICE=1, TRAIN_STEPS=3,
        NUM_POINTS=64, DECODER=TINY_DECODER, EVAL_IMAGES=2, NUM_IMAGES=4, SAMPLER_STEPS=2), timeout=600)
    text = "".join(_outputs(nb, "text"))
    assert "2 labelled images" in text and "local run" in text
    results = json.loads((workdir / "results.json").read_text())
    assert results["task"] == "semantic" and results["step"] == 3 and results["num_images"] == 2
    manifest = json.loads((workdir / "generated" / records.MANIFEST).read_text())
    assert manifest["counts"]["images"] == 4
    assert sorted(manifest["counts"]["images_with_class"]) == sorted(voc.CLASSES)
    exs = list(records.read_tfrecords(str(workdir / "generated")))
    assert [e["index"] for e in exs] == [0, 1, 2, 3]
    for e in exs:
        assert e["image"].shape == (32, 32, 3) and e["segmentation"].max() < len(voc.CLASSES)
        assert e["prompt"].startswith("a photo of") and set(e["classes"]) <= set(voc.CLASSES[1:])
    assert len(_outputs(nb, "image/png")) == 3  # labelled images, samples, preview.png


def test_quickstart_notebook(tmp_path):
    _downloads_guarded("quickstart.ipynb")
    workdir = tmp_path / "demo_small"
    nb = _execute("quickstart.ipynb", dict(WORKDIR=str(workdir), OVERRIDES=QUICKSTART_OVERRIDES), timeout=900)
    report = json.loads((workdir / "report.json").read_text())
    down = report["downstream"]
    assert {"real", "synthetic", "real+synthetic"} <= set(down["rows"])  # rows (a)-(c), and any more
    for task, metric in (("semantic", "miou"), ("depth", "rel")):
        for row in ("real", "synthetic", "real+synthetic"):
            for split in down["test_splits"]:
                assert down[task][row][split][metric] >= 0
    small = load_config(os.path.join(ROOT, "configs", "shapes_demo.py:small"), QUICKSTART_OVERRIDES)
    assert report["generated"]["images"] == small.generate.num_images and report["claims"]
    text = "".join(_outputs(nb, "text"))
    assert compare.format_table(down) in text  # the printed table
    assert "P-Decoders on 16 labelled real images" in text  # the count the overrides set, not a fixed 100
    for claim in report["claims"]:
        assert claim["claim"] in text
    assert (workdir / "figure.png").is_file() and (workdir / "synthetic" / records.MANIFEST).is_file()
    assert len(_outputs(nb, "image/png")) == 2  # figure.png and the sample grid
