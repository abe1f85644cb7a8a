"""Load big_vision-style Python configs without absl flags.

A config file defines ``get_config(arg=None) -> ml_collections.ConfigDict``. It is named on the
command line as ``path/to/file.py`` or ``path/to/file.py:arg`` (``arg`` picks a variant such as
``tiny``), and single fields are changed with ``key.sub=value`` overrides, e.g.
``load_config("configs/shapes_sd.py:tiny", ["diffusion.lr=1e-3", "diffusion.steps=50"])``.

The configs of the repository's ``configs/`` folder ship inside the package as
``datasetdm_jax.configs`` (pyproject.toml maps the folder there, for wheels and editable installs
alike), so a bare name finds them from any directory: ``shapes_sd``, ``shapes_sd.py:tiny`` and
``configs/shapes_sd.py:tiny`` all load the same file when no such file exists where they point.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from typing import Any, Sequence

import ml_collections

from datasetdm_jax.errors import UserError

__all__ = ["load_config", "apply_overrides", "parse_value", "configs_dir", "shipped_configs", "resolve_config"]


def configs_dir() -> str:
    """The folder of the shipped configs: the installed ``datasetdm_jax.configs`` package, else (a
    checkout put on ``sys.path`` without installing) the ``configs/`` folder beside the package."""
    try:
        spec = importlib.util.find_spec("datasetdm_jax.configs")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped_configs() -> list[str]:
    """The names of the shipped config files (``shapes_demo.py``, ``voc_semantic.py``, ...)."""
    folder = configs_dir()
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


def resolve_config(path: str) -> str:
    """A config file's path: ``path`` itself when it is a file, else the shipped config it names
    (``voc_semantic``, ``voc_semantic.py`` or ``configs/voc_semantic.py``); a one-line error otherwise."""
    if os.path.isfile(path):
        return path
    name = re.sub(r"^(\./)?configs[/\\]", "", path)
    if name and not name.endswith(".py"):
        name += ".py"
    if name and os.sep not in name and "/" not in name:
        shipped = os.path.join(configs_dir(), name)
        if os.path.isfile(shipped):
            return shipped
    names = ", ".join(f[:-3] for f in shipped_configs()) or "none found"
    raise FileNotFoundError(f"config file not found: {path} (not a file here, nor a shipped config: {names})")


def _import_file(path: str):
    """Import a config file as a throwaway module, by path (also the shipped ones: a config is
    read as a file, never imported as ``datasetdm_jax.configs.<name>``)."""
    name = "_datasetdm_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:  # a broken config file: name the file and line, no traceback
        raise UserError(f"config file {path}, line {e.lineno}: {e.msg}; fix the file") from None
    except (ImportError, NameError) as e:
        raise UserError(f"config file {path}: {type(e).__name__}: {e}; fix the file") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path} has no get_config(arg=None) function")
    return module


def parse_value(text: str, current: Any = None) -> Any:
    """Parse an override value: a Python literal (``1e-3``, ``(32, 64)``, ``True``, ``None``) or a
    bare string. Ints are promoted to float where the field is a float, so ``lr=1`` works."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, str) and not isinstance(value, str):
        value = text
    return value


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str] | None) -> ml_collections.ConfigDict:
    """Set ``key.sub=value`` fields in place (leading ``--`` and ``--set`` tolerated); unknown keys
    are refused so a typo cannot silently train the wrong model."""
    for item in overrides or ():
        item = item.strip()
        if item.startswith("--set="):
            item = item[len("--set="):]
        item = item.lstrip("-")
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = config
        for p in parents:
            if p not in node:
                raise ValueError(f"override {key!r}: no config field {p!r}")
            node = node[p]
        if leaf not in node:
            raise ValueError(f"override {key!r}: no config field {leaf!r}")
        current = node[leaf]
        value = parse_value(text.strip(), current)
        if isinstance(current, ml_collections.ConfigDict):
            if not isinstance(value, dict):
                raise ValueError(f"override {key!r}: a sub-config needs a dict value")
            value = ml_collections.ConfigDict(value)
        try:
            with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
                node[leaf] = value
        except TypeError:  # ml_collections keeps a field's type: 'abc' cannot become an int
            raise UserError(f"override {key}={text.strip()}: {key} takes {_type_name(current)} "
                            f"(e.g. {key}={_example(current)}), got {type(value).__name__} {value!r}") from None
    return config


def _type_name(value: Any) -> str:
    kinds = {bool: "true/false (True or False)", int: "an integer", float: "a number", str: "a string",
             tuple: "a tuple", list: "a list"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _example(value: Any) -> str:
    return repr(value) if not isinstance(value, str) else value


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def load_config(spec: str, overrides: Sequence[str] | None = None) -> ml_collections.ConfigDict:
    """``"file.py"`` or ``"file.py:arg"`` -> ``get_config(arg)`` with ``overrides`` applied; a shipped
    config also by its bare name (``"voc_semantic"``, ``"shapes_demo:small"``), see `resolve_config`."""
    path, arg = spec, None
    if ":" in spec and not os.path.isfile(spec):
        path, arg = spec.rsplit(":", 1)
    module = _import_file(resolve_config(path))
    config = module.get_config(arg) if arg is not None else module.get_config()
    return apply_overrides(config, overrides)
