"""CLIP tokenizer: offline loading, fixed-length tokenisation, and writing small closed vocabularies.

Stable Diffusion folders ship a byte-level BPE CLIP tokenizer (`vocab.json` + `merges.txt`).
We use transformers' implementation (pure Python/Rust, no torch) so token ids match the PyTorch
pipelines exactly. `write_clip_tokenizer` makes the same kind of folder for a small closed word
list (the shapes world), so our own models load through exactly the path SD 1.5 does.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["load_tokenizer", "tokenize", "write_clip_tokenizer", "BOS", "EOS"]

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
_END = "</w>"
_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (the alphabet byte-level BPE works in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """Loads a CLIP tokenizer folder offline; raises a one-line ValueError naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: tokenizer folder not found")
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder}: no CLIP tokenizer files (expected vocab.json + merges.txt, or tokenizer.json)")
    from transformers import CLIPTokenizer  # lazy: transformers is heavy to import

    try:
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types for bad files
        msg = " ".join(str(e).split())[:300]
        raise ValueError(f"{folder}: cannot load the CLIP tokenizer ({type(e).__name__}: {msg})") from e
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"{folder}: tokenizer lacks {BOS} / {EOS} tokens")
    return tok


def tokenize(tokenizer: Any, prompts: str | Sequence[str], max_length: int = _MAX_LENGTH) -> np.ndarray:
    """Prompts -> int32 ids (B, max_length): BOS, tokens, EOS, padded; longer prompts are truncated.

    Truncation keeps the first max_length - 2 tokens as diffusers does (same ids as transformers'
    `truncation=True`), and warns once per call with the number of prompts cut (silently dropped
    words change what is generated). One tokenizer pass; padding and truncation are done here.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("tokenize: empty prompt list")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("tokenize: prompts must be strings")
    full = tokenizer(prompts, add_special_tokens=True, truncation=False)["input_ids"]
    too_long = [i for i, ids in enumerate(full) if len(ids) > max_length]
    if too_long:
        warnings.warn(
            f"{len(too_long)} of {len(prompts)} prompt(s) longer than {max_length} tokens were truncated "
            f"(first: prompt {too_long[0]}, {len(full[too_long[0]])} tokens)", stacklevel=2)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = np.full((len(prompts), max_length), pad, dtype=np.int32)
    for i, ids in enumerate(full):
        if len(ids) > max_length:  # keep BOS + the first max_length - 2 tokens, end with EOS
            ids = ids[: max_length - 1] + [eos]
        out[i, : len(ids)] = ids
    return out


def write_clip_tokenizer(folder: str | os.PathLike, words: Sequence[str],
                         model_max_length: int = _MAX_LENGTH) -> dict[str, int]:
    """Writes a minimal CLIP BPE tokenizer folder where each of `words` is one token `word</w>`.

    The vocabulary is CLIP's layout in miniature: the 256 byte characters, the same with `</w>`,
    the merge products needed to build each word, then BOS and EOS (so vocab_size is small and
    any text still tokenizes, character by character, outside the word list). Merges are added
    in order so that each word reduces to a single token; appending a merge never changes how an
    earlier word is split, so one pass suffices. `model_max_length` is the padded context length
    pipelines use (SD's 77; a small model with short captions can use fewer tokens, which cuts the
    text encoder's cost). Returns the vocabulary (token -> id).
    """
    byte_chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for b in range(256):
        vocab.setdefault(byte_chars[b], len(vocab))
    for b in range(256):
        vocab.setdefault(byte_chars[b] + _END, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    seen = set()
    for word in words:
        w = word.strip().lower()
        if not w or not w.isalpha():
            raise ValueError(f"write_clip_tokenizer: {word!r} is not a single word of letters")
        if w in seen:
            continue
        seen.add(w)
        symbols = [byte_chars[b] for b in w.encode("utf-8")]
        symbols[-1] += _END
        while True:
            parts = _bpe(symbols, ranks)
            if len(parts) == 1:
                break
            pair = (parts[0], parts[1])  # grow the word from the left with one new merge
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": int(model_max_length), "do_lower_case": True,
        "errors": "replace", "add_prefix_space": False, **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return vocab


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Standard BPE: repeatedly merge the adjacent pair with the lowest rank."""
    parts = list(symbols)
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get((parts[i], parts[i + 1]), 1 << 60))
        pair = (parts[best], parts[best + 1])
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                merged.append(pair[0] + pair[1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts
