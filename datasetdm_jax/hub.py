"""Stable Diffusion by Hugging Face repo id: ``resolve("org/name")`` -> a local diffusers-format folder.

`pretrained.load_pipeline` and every config's ``pipeline=`` take a local diffusers-format folder or a
repo id on the Hugging Face Hub (``stable-diffusion-v1-5/stable-diffusion-v1-5``, optionally
``@revision``). A local path wins when it exists (as in diffusers). A repo id fetches only what the
loader reads: ``model_index.json``, the components' JSON configs, the tokenizer's files and the
safetensors weights (``variant="fp16"`` fetches the ``*.fp16.safetensors`` files instead; a repo with
only fp16 safetensors gets those) into the standard Hugging Face cache (``HF_HUB_CACHE``, ``HF_HOME``;
a second call downloads nothing). ``HF_HUB_OFFLINE=1`` reads the cache only. A repo whose weights are
only pickles (``.bin``, ``.ckpt``) is refused before anything is downloaded, with the command that
converts it. huggingface_hub is imported only when a repo id is given.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

__all__ = ["HubError", "MODEL_HINT", "model_hint", "is_repo_id", "parse_repo_id", "allow_patterns", "pick_variant", "resolve",
           "cached_folder"]

MODEL_HINT = ("pipeline= takes a local diffusers-format folder (model_index.json, unet/, vae/, text_encoder/, "
              "tokenizer/, scheduler/) or a Hugging Face repo id such as stable-diffusion-v1-5/stable-diffusion-v1-5; "
              "the shapes-world model (shapes configs) is made by `datasetdm pretrain --config configs/shapes_sd.py`")
# Folder names the shipped configs use for real models -> the Hub repo that holds that model.
KNOWN_REPOS = {"stable-diffusion-v1-4": "CompVis/stable-diffusion-v1-4",
               "stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
               "stable-diffusion-2-1-base": "stabilityai/stable-diffusion-2-1-base",
               "stable-diffusion-2-1": "stabilityai/stable-diffusion-2-1",
               "stable-diffusion-xl-base-1.0": "stabilityai/stable-diffusion-xl-base-1.0"}
CONVERT_HINT = ("convert once where torch is installed: python -c \"from diffusers import StableDiffusionPipeline as P; "
                "P.from_pretrained('ORG/NAME').save_pretrained('OUT', safe_serialization=True)\", then pipeline=OUT")
# The folders the loader reads (SD 1.x / 2.x, and SDXL's second text encoder); others, such as
# safety_checker/ (1.2 GB) and the single-file checkpoints at a repo's top level, are never fetched.
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class HubError(ValueError):
    """A model cannot be found or fetched: the one-line message says why and what to do."""


def model_hint(spec: str | os.PathLike = "") -> str:
    """What to do about a missing model ``spec``: for a folder named after a known model (the paper
    configs' ``models/stable-diffusion-v1-4``), the repo id that fetches it; else `MODEL_HINT`."""
    name = os.path.basename(os.fspath(spec).rstrip("/\\"))
    repo = KNOWN_REPOS.get(name)
    if repo is None or parse_repo_id(os.fspath(spec))[0] == repo:  # unknown, or already that repo id
        return MODEL_HINT
    return (f"set pipeline={repo} to fetch this model from the Hugging Face Hub (needs access to huggingface.co), "
            f"or put a diffusers-format copy of {repo} (safetensors) at {os.fspath(spec)}")


def is_repo_id(spec: str) -> bool:
    """True when ``spec`` is no existing path and reads as ``org/name`` or ``org/name@revision``."""
    spec = str(spec)
    return bool(_REPO_ID.match(spec)) and ".." not in spec.split("@")[0] and not os.path.exists(spec)


def parse_repo_id(spec: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; no ``@``: revision None (the main branch)."""
    repo_id, _, revision = str(spec).partition("@")
    return repo_id, revision or None


def _weight_names(variant: str | None) -> tuple[str, ...]:
    """fnmatch patterns of one component's safetensors weights, plain or sharded, in ``variant``."""
    tag = f".{variant}" if variant else ""
    return tuple(p for stem in WEIGHT_STEMS for p in (f"{stem}{tag}.safetensors", f"{stem}{tag}-*-of-*.safetensors"))


def allow_patterns(variant: str | None = None) -> list[str]:
    """The files of a repo that `resolve` downloads: JSON, text and safetensors weights (of ``variant``)
    in the components' folders, and ``model_index.json``."""
    out = ["model_index.json"]
    for c in COMPONENTS:
        out += [f"{c}/*.json", f"{c}/*.txt"]
        if c in WEIGHT_COMPONENTS:
            out += [f"{c}/{name}" for name in _weight_names(variant)]
    return out


def pick_variant(repo: str, files: Iterable[str], variant: str | None = None) -> str | None:
    """The weight variant to download from a repo holding ``files``: ``variant`` when every component
    has it in safetensors, else plain or fp16 safetensors, whichever is complete; a one-line error for
    a repo that is not in diffusers format or whose weights are only pickles."""
    import fnmatch

    files = list(files)
    if "model_index.json" not in files:
        singles = [f for f in files if "/" not in f and f.endswith((".safetensors",) + PICKLE_SUFFIXES)]
        raise HubError(f"{repo}: not a diffusers-format repo (no model_index.json)"
                       + (f"; single-file checkpoints ({', '.join(singles[:3])}) are not read" if singles else "")
                       + f"; {MODEL_HINT}")
    components = [c for c in WEIGHT_COMPONENTS if f"{c}/config.json" in files]

    def complete(v: str | None) -> bool:
        return all(any(fnmatch.fnmatch(f, f"{c}/{p}") for f in files for p in _weight_names(v)) for c in components)

    for candidate in dict.fromkeys((variant, None, "fp16")):  # the asked variant, else what there is
        if complete(candidate):
            return candidate
    bad = [c for c in components if not any(
        fnmatch.fnmatch(f, f"{c}/{p}") for f in files for v in (variant, None, "fp16") for p in _weight_names(v))]
    pickles = [f for f in files if f.split("/")[0] in bad and f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise HubError(f"{repo}: only pickled weights ({', '.join(pickles[:4])}), which can execute code when "
                       f"loaded; safetensors required, {CONVERT_HINT}")
    raise HubError(f"{repo}: no complete set of safetensors weights (plain or fp16)"
                   + (f": none for {', '.join(bad)}" if bad else ""))


def _offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if value is None else value.strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve(spec: str | os.PathLike, *, variant: str | None = None) -> str:
    """A local folder for ``spec``: the path itself when it exists, else the Hugging Face cache's
    snapshot of the repo id ``spec`` (downloaded when missing); a one-line `HubError` otherwise."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        return spec
    if os.path.exists(spec):
        raise HubError(f"{spec}: not a folder; {model_hint(spec)}")
    if not is_repo_id(spec):
        raise HubError(f"{spec}: no such folder; {model_hint(spec)}")
    repo, revision = parse_repo_id(spec)
    from huggingface_hub import HfApi, constants, errors, snapshot_download

    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read now, as HF_HUB_OFFLINE
    offline = _offline()
    where = f"{repo}" + (f"@{revision}" if revision else "")
    try:
        unreachable = offline
        if not offline:
            try:
                files = HfApi().list_repo_files(repo, revision=revision)
            except (errors.RepositoryNotFoundError, errors.GatedRepoError, errors.RevisionNotFoundError):
                raise
            except Exception:  # noqa: BLE001 - no network, a proxy, the Hub down: the cache may still hold it
                unreachable = True
            else:
                variant = pick_variant(where, files, variant)
        return snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns(variant),
                                 local_files_only=unreachable)
    except errors.RepositoryNotFoundError:
        raise HubError(f"{spec}: no such local folder, and no such repo on the Hugging Face Hub (or it is private: "
                       f"`hf auth login`); {model_hint(spec)}") from None
    except errors.GatedRepoError:
        raise HubError(f"{where}: a gated repo; accept its licence on huggingface.co, then `hf auth login`") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{where}: no such revision on the Hugging Face Hub") from None
    except (errors.LocalEntryNotFoundError, errors.IncompleteSnapshotError, errors.OfflineModeIsEnabled) as e:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise HubError(f"{spec}: no such local folder, and as a Hugging Face repo id not (completely) in the cache "
                       f"({cache_dir or constants.HF_HUB_CACHE}) while {why} ({type(e).__name__}); download it once "
                       f"online, or {model_hint(spec)}") from None
    except (errors.HfHubHTTPError, OSError) as e:
        msg = " ".join(str(e).split())[:200]
        raise HubError(f"{where}: download from the Hugging Face Hub failed: {msg}") from None


def cached_folder(spec: str | os.PathLike) -> str:
    """The local folder of ``spec`` without any download: the path itself, or the Hugging Face cache's
    snapshot of the repo id ``spec`` as `resolve` left it; a one-line `HubError` when there is none."""
    spec = os.fspath(spec)
    if os.path.isdir(spec) or not is_repo_id(spec):
        return spec
    repo, revision = parse_repo_id(spec)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, revision=revision, cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                 allow_patterns=["model_index.json"], local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to find the cached snapshot reads the same
        raise HubError(f"{spec}: no such local folder, and as a Hugging Face repo id not in the cache "
                       f"({type(e).__name__}); {model_hint(spec)}") from None
