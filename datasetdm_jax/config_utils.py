"""Load big_vision-style Python configs without absl flags.

A config file defines ``get_config(arg=None) -> ml_collections.ConfigDict``. It is named on the
command line as ``path/to/file.py`` or ``path/to/file.py:arg`` (``arg`` picks a variant such as
``tiny``), and single fields are changed with ``key.sub=value`` overrides, e.g.
``load_config("configs/shapes_sd.py:tiny", ["diffusion.lr=1e-3", "diffusion.steps=50"])``.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Sequence

import ml_collections

__all__ = ["load_config", "apply_overrides", "parse_value"]


def _import_file(path: str):
    """Import a config file as a throwaway module (configs are not part of the package)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    name = "_datasetdm_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config(arg=None) function")
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
        with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
            node[leaf] = value
    return config


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def load_config(spec: str, overrides: Sequence[str] | None = None) -> ml_collections.ConfigDict:
    """``"file.py"`` or ``"file.py:arg"`` -> ``get_config(arg)`` with ``overrides`` applied."""
    path, arg = spec, None
    if ":" in spec and not os.path.isfile(spec):
        path, arg = spec.rsplit(":", 1)
    module = _import_file(path)
    config = module.get_config(arg) if arg is not None else module.get_config()
    return apply_overrides(config, overrides)
