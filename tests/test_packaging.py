"""The wheel: the repository's configs/ ship as ``datasetdm_jax.configs`` beside the shapes-world
model, and an installed copy finds both with no checkout around (the wheel is built from a copy of
the sources, unpacked onto PYTHONPATH and used from an empty folder). Needs setuptools >= 69 (the
[test] extra) to build without network."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SOURCES = ("pyproject.toml", "setup.py", "README.md", "datasetdm_jax", "configs")

CHECK = r"""
import json, os, sys
root = sys.argv[1]
import datasetdm_jax
from datasetdm_jax import assets, config_utils, demo, pretrained

out = {"package": datasetdm_jax.__file__, "configs_dir": config_utils.configs_dir(), "demo": demo.CONFIGS_DIR,
       "model": assets.shapes_sd_path()}
for spec in ("voc_semantic", "shapes_demo.py:small", "configs/shapes_semantic.py:tiny", "downstream_shapes"):
    out[spec] = config_utils.resolve_config(spec.split(":")[0])
    config_utils.load_config(spec)
out["small_images"] = int(config_utils.load_config("shapes_demo:small").generate.num_images)
pipe = pretrained.load_pipeline(assets.shapes_sd_path())
out["unet_sample_size"] = int(pipe.configs["unet"]["sample_size"])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, cwd=out)
    (whl,) = out.glob("datasetdm_jax-*.whl")
    return whl


def test_wheel_holds_the_configs_and_the_model(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
    assert {f"datasetdm_jax/configs/{f}" for f in configs} <= names
    assert "datasetdm_jax/assets/shapes_sd/unet/diffusion_pytorch_model.safetensors" in names
    assert not any(n.startswith(("configs/", "tests/")) for n in names)  # no stray top-level packages


def test_installed_copy_finds_configs_and_model_without_a_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=empty, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    package = str(site / "datasetdm_jax")
    for key in ("package", "configs_dir", "demo", "model", "voc_semantic", "shapes_demo.py:small",
                "configs/shapes_semantic.py:tiny", "downstream_shapes"):
        assert out[key].startswith(package), (key, out[key])
    assert out["configs_dir"] == os.path.join(package, "configs")
    assert out["small_images"] > 0 and out["unet_sample_size"] > 0
    cli = subprocess.run([sys.executable, "-m", "datasetdm_jax.cli", "demo", "--help"], cwd=empty, env=env,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and "--config" in cli.stdout, cli.stderr[-2000:]


def test_readme_commands_match_ci_and_the_plain_install_has_no_torch():
    """README line 1 installs only the package; line 2 is what .ci/run runs, less its pinned file."""
    import tomllib

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    assert readme[2] == "```bash" and readme[5] == "```"
    demo, tests = readme[3], readme[4]
    assert demo == "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/datasetdm demo"
    ci = [line for line in open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") if line.startswith("python3 ")]
    assert len(ci) == 1 and ci[0].strip().replace(" -q -r requirements-ci.txt", "") == tests
    deps = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["dependencies"]
    assert not [d for d in deps if d.split(">")[0].split("=")[0].split("[")[0] in ("torch", "diffusers", "pytest")]


def test_demo_imports_no_torch():
    code = ("import sys\n"
            "import datasetdm_jax.demo, datasetdm_jax.cli\n"
            "from datasetdm_jax import dataset_writer, export, generate, hub, pretrained, train\n"
            "from datasetdm_jax.data import records\n"
            "from datasetdm_jax.downstream import compare, data\n"
            "from datasetdm_jax.labelers import composite, decoder\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'tensorflow') if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_config_names_resolve_from_any_directory(tmp_path, monkeypatch):
    from datasetdm_jax import config_utils

    monkeypatch.chdir(tmp_path)
    shipped = config_utils.configs_dir()
    for spec, name in (("voc_semantic", "voc_semantic.py"), ("voc_semantic.py", "voc_semantic.py"),
                       ("configs/shapes_sd.py", "shapes_sd.py"), ("shapes_demo", "shapes_demo.py")):
        assert config_utils.resolve_config(spec) == os.path.join(shipped, name)
    assert config_utils.load_config("shapes_sd:tiny").to_dict() == config_utils.load_config(
        os.path.join(shipped, "shapes_sd.py:tiny")).to_dict()
    (tmp_path / "voc_semantic.py").write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                                              "    return ml_collections.ConfigDict({'mine': arg})\n")
    assert config_utils.load_config("voc_semantic.py:x").mine == "x"  # a file where it points wins
    with pytest.raises(FileNotFoundError, match="not a file here, nor a shipped config: .*voc_semantic"):
        config_utils.load_config("no_such_config:small")
