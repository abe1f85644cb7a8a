"""Models by Hugging Face repo id (datasetdm_jax/hub.py), offline: a tiny diffusers folder written into
the Hugging Face cache layout (``models--org--name/snapshots/<commit>/`` and ``refs/main``) by the test."""

import os

import pytest
from huggingface_hub.utils import filter_repo_objects

from datasetdm_jax import hub, pretrained, smoke, train

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# The file list of stable-diffusion-v1-5/stable-diffusion-v1-5 (abridged): plain, fp16 and non-EMA
# weights as safetensors and pickles, a safety checker, and single-file checkpoints at the top.
SD15_FILES = [
    "model_index.json", "README.md", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json", "safety_checker/config.json", "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin",
]
SMALL = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "tokenizer/merges.txt",
         "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
         "unet/config.json", "vae/config.json"]


def _fetched(variant=None, files=SD15_FILES):
    return sorted(filter_repo_objects(files, allow_patterns=hub.allow_patterns(variant)))


def test_only_the_loaders_safetensors_are_fetched():
    assert _fetched() == sorted(SMALL + ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                                         "vae/diffusion_pytorch_model.safetensors"])
    assert _fetched("fp16") == sorted(SMALL + [
        "text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors"])
    sharded = ["unet/diffusion_pytorch_model-00001-of-00002.safetensors",
               "unet/diffusion_pytorch_model.safetensors.index.json",
               "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors"]
    assert _fetched(files=sharded) == sorted(sharded[:2])
    assert _fetched("fp16", files=sharded) == sorted(sharded[1:])


def test_variant_choice_and_pickle_only_repos_are_refused():
    assert hub.pick_variant("sd15", SD15_FILES) is None
    assert hub.pick_variant("sd15", SD15_FILES, "fp16") == "fp16"
    fp16_only = [f for f in SD15_FILES if not f.endswith(("model.safetensors", "non_ema.safetensors"))]
    assert hub.pick_variant("x", fp16_only) == "fp16"
    pickles = [f for f in SD15_FILES if not f.endswith(".safetensors")]
    with pytest.raises(hub.HubError, match=r"only pickled weights .*save_pretrained\('OUT', safe_serialization=True\)"):
        hub.pick_variant("org/old", pickles)
    with pytest.raises(hub.HubError, match="not a diffusers-format repo.*v1-5-pruned.ckpt"):
        hub.pick_variant("org/single", ["v1-5-pruned.ckpt", "README.md"])


def test_repo_ids_and_paths(tmp_path):
    assert hub.is_repo_id("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert hub.parse_repo_id("org/name@v1.0") == ("org/name", "v1.0")
    assert hub.parse_repo_id("org/name") == ("org/name", None)
    for spec in ("/abs/model", "./org/name", "a/b/c", "../name", "name", str(tmp_path)):
        assert not hub.is_repo_id(spec), spec
    assert hub.resolve(str(tmp_path)) == str(tmp_path)  # an existing folder is used as it is


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """A Hugging Face cache holding org/tiny-sd (a tiny random SD) at COMMIT, main pointing there."""
    cache = tmp_path_factory.mktemp("hf_cache")
    repo = cache / "models--org--tiny-sd"
    src = tmp_path_factory.mktemp("src")
    pretrained.save_pipeline(smoke.random_pipeline(src), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)  # no newline, as huggingface_hub writes it
    return cache


@pytest.fixture
def offline(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_cache


def test_load_pipeline_by_repo_id_from_the_offline_cache(offline):
    snapshot = offline / "models--org--tiny-sd" / "snapshots" / COMMIT
    assert os.path.samefile(hub.resolve("org/tiny-sd"), snapshot)
    assert os.path.samefile(hub.resolve(f"org/tiny-sd@{COMMIT}"), snapshot)
    pipe = pretrained.load_pipeline("org/tiny-sd")
    assert os.path.samefile(pipe.tokenizer_path, snapshot / "tokenizer")
    assert pipe.encode_prompt(["a red circle"]).shape[:2] == (1, 77)
    # a config's pipeline= goes through the same loader
    assert os.path.samefile(train.load_frozen_pipeline("org/tiny-sd").tokenizer_path, snapshot / "tokenizer")


def test_missing_repo_offline_is_one_line(offline):
    with pytest.raises(pretrained.PretrainedError) as e:
        pretrained.load_pipeline("org/absent")
    msg = str(e.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE is set" in msg and str(offline) in msg
    assert "local diffusers-format folder" in msg and "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg
    with pytest.raises(pretrained.PretrainedError, match="HF_HUB_OFFLINE is set.*pipeline= takes a local"):
        pretrained.load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")  # no "put a copy at <repo id>"


def test_missing_local_folder_names_both_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="local diffusers-format folder .* or a Hugging Face repo id"):
        train.load_frozen_pipeline(str(tmp_path / "nope"))
    with pytest.raises(pretrained.PretrainedError, match="no such folder; pipeline= takes"):
        pretrained.load_pipeline(tmp_path / "nope")


def test_dataset_fingerprint_of_a_repo_id_reads_the_cached_snapshot(offline):
    from datasetdm_jax import dataset_writer

    by_id = dataset_writer._model_fingerprint("org/tiny-sd")
    local = dataset_writer._model_fingerprint(hub.cached_folder("org/tiny-sd"))
    assert by_id["path"] == "org/tiny-sd" and by_id["configs_sha256"] == local["configs_sha256"]


def test_unreachable_hub_falls_back_to_the_cache(hf_cache, monkeypatch):
    """Online mode with no network: a cached repo loads, a missing one is a one-line error."""
    import huggingface_hub

    def no_network(self, *args, **kwargs):
        raise ConnectionRefusedError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert os.path.samefile(hub.resolve("org/tiny-sd"), hf_cache / "models--org--tiny-sd" / "snapshots" / COMMIT)
    with pytest.raises(hub.HubError, match="the Hub cannot be reached"):
        hub.resolve("org/absent")
