"""The shapes-world SD's training data: procedural batches (prefetched in a thread, resumable by
their grain iterator state), the fixed held-out batch, and the closed-vocabulary tokenizer."""

from __future__ import annotations

import os
import queue
import shutil
import threading
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from datasetdm_jax import tokenizer as tk
from datasetdm_jax.data import pipeline, shapes

__all__ = ["shapes_config", "Prefetcher", "train_iterator", "heldout_batch", "Tokens", "ensure_tokenizer",
           "text_encoder_dict", "plain"]


def shapes_config(config: ml_collections.ConfigDict):
    d = config.data
    kw = dict(image_size=int(d.image_size), min_objects=int(d.min_objects), max_objects=int(d.max_objects))
    if d.classes:
        kw["classes"] = tuple(d.classes)
    return shapes.ShapesConfig(**kw)


class Prefetcher:
    """Renders batches ahead in a thread; each batch carries the grain iterator state *after* it,
    so a checkpoint records exactly the consumed position, not the prefetched one."""

    def __init__(self, iterator, depth: int):
        self._it, self._q = iterator, queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self):
        try:
            while not self._stop.is_set():
                batch = next(self._it)
                item = ({"image": batch["image"], "caption": [str(c) for c in batch["caption"]]},
                        self._it.get_state())
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced to the consumer
            self._q.put(e)

    def next(self) -> tuple[dict, Any]:
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()


def train_iterator(config: ml_collections.ConfigDict, batch_size: int, data_state: Any | None):
    ds = pipeline.procedural_dataset(config.data.split, batch_size, int(config.data.seed),
                                     config=shapes_config(config), shuffle_seed=None)
    it = iter(ds)
    if data_state is not None:
        it.set_state(data_state)
    return it


def heldout_batch(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fixed held-out batch (first ``heldout_size`` scenes of the held-out split)."""
    n = int(config.data.heldout_size)
    ds = pipeline.procedural_dataset(config.data.heldout_split, n, int(config.data.seed),
                                     config=shapes_config(config), shuffle_seed=None)
    b = next(iter(ds))
    return {"image": b["image"], "caption": [str(c) for c in b["caption"]]}


class Tokens:
    """Closed-vocabulary tokenizer with a caption cache (captions repeat a lot)."""

    def __init__(self, folder: str, max_length: int):
        self.folder = folder
        self.max_length = int(max_length)
        self.tokenizer = tk.load_tokenizer(folder)
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            ids = tk.tokenize(self.tokenizer, missing, max_length=self.max_length)
            self._cache.update(zip(missing, ids))
        return np.stack([self._cache[c] for c in captions]).astype(np.int32)


def ensure_tokenizer(workdir: str, config: ml_collections.ConfigDict) -> str:
    folder = os.path.join(workdir, "tokenizer")
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        if config.init_from:  # keep the warm-start model's token ids
            shutil.copytree(os.path.join(config.init_from, "tokenizer"), folder, dirs_exist_ok=True)
        else:
            tk.write_clip_tokenizer(folder, shapes.caption_vocabulary(), int(config.tokenizer.max_length))
    return folder


def text_encoder_dict(config: ml_collections.ConfigDict, tok) -> dict[str, Any]:
    """The text encoder config.json with vocabulary size and special ids from the tokenizer."""
    d = plain(config.text_encoder.to_dict())
    d.update(vocab_size=len(tok.get_vocab()), bos_token_id=int(tok.bos_token_id),
             eos_token_id=int(tok.eos_token_id), pad_token_id=int(tok.pad_token_id))
    if d["max_position_embeddings"] < int(config.tokenizer.max_length):
        raise ValueError("text_encoder.max_position_embeddings is smaller than tokenizer.max_length")
    return d


def plain(x: Any) -> Any:
    """ConfigDict contents -> JSON-ready Python (tuples become lists)."""
    if isinstance(x, Mapping):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x
