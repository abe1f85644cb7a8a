"""Stage results cached as JSON beside the settings that produced them.

Why: the demo and the proof rerun cheaply when nothing changed and recompute, rather than reuse, a
stage whose settings (model, config, data) differ. The file holds ``{"key": ..., "result": ...}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def load(path: str | os.PathLike, key: Any) -> dict[str, Any] | None:
    """The stored result when ``path`` exists and was written for the same ``key`` (compared as JSON)."""
    path = Path(path)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == json.loads(json.dumps(key)):
            return stored["result"]
    return None


def store(path: str | os.PathLike, key: Any, result: dict[str, Any]) -> None:
    """Write ``result`` under ``key`` atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "result": result}, indent=1))
    os.replace(tmp, path)
