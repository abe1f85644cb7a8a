"""Class-prompt appending and class-name -> token positions for the attention labeller.

Dataset Diffusion generates from `caption + "; " + class names` and reads the cross-attention of
a second, separately encoded text, the class prompt (the class names joined by spaces), whose
tokens act only as keys. Each class's map is the mean over the tokens of its name. The official
code assumes one token per word, so a name that BPE splits ("aeroplane" -> aerop + lane) shifts
every later class by a token; here the positions come from the tokenizer itself.

`caption_token_weights` is the alternative key set (``class_tokens="caption"``): the class words
inside the generation prompt itself, i.e. the cross-attention the UNet really computes. A name is
read at every whole-word occurrence in the prompt (all its instances in "a red circle and a blue
circle"; the appended copy too when class names are appended).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from datasetdm_jax.tokenizer import tokenize

SEPARATOR = "; "


def append_class_names(caption: str, names: Sequence[str]) -> str:
    """The generation prompt: `caption; name1 name2 ...` (the caption alone when there are no names)."""
    names = [n.strip() for n in names]
    return caption if not names else caption + SEPARATOR + " ".join(names)


def _name_tokens(tokenizer: Any, name: str) -> list[int]:
    ids = tokenizer(name, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"class name {name!r} has no tokens")
    return list(ids)


def class_prompt_tokens(tokenizer: Any, names_per_image: Sequence[Sequence[str]], max_length: int,
                        max_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-prompt ids (B, max_length) int32 and token weights (B, max_classes, max_length) float32.

    Row b of the ids tokenizes `" ".join(names_per_image[b])`; weights[b, k] is 1/n over the n
    tokens of the k-th name (0 for padding classes), so `weights @ attention` is each class's
    mean token map. A class prompt too long for `max_length` is an error: a truncated name would
    silently read the wrong tokens.
    """
    n = len(names_per_image)
    weights = np.zeros((n, max_classes, max_length), np.float32)
    spans = []
    for b, names in enumerate(names_per_image):
        if len(names) > max_classes:
            raise ValueError(f"image {b}: {len(names)} class names, more than max_classes={max_classes}")
        toks = [_name_tokens(tokenizer, name) for name in names]
        if sum(map(len, toks)) > max_length - 2:  # BOS and EOS take two positions
            raise ValueError(f"image {b}: class prompt {' '.join(names)!r} needs more than the "
                             f"{max_length} tokens of the text encoder; use fewer class names")
        spans.append(toks)
    ids = tokenize(tokenizer, [" ".join(names) for names in names_per_image], max_length=max_length) \
        if n else np.zeros((0, max_length), np.int32)
    for b, (names, toks) in enumerate(zip(names_per_image, spans)):
        pos = 1  # after BOS
        for k, (name, t) in enumerate(zip(names, toks)):
            end = pos + len(t)
            if list(ids[b, pos:end]) != t:  # the joined prompt must tokenize as its names do
                raise ValueError(f"image {b}: class name {name!r} tokenizes differently inside the class prompt "
                                 f"{' '.join(names)!r}")
            weights[b, k, pos:end] = 1.0 / len(t)
            pos = end
    return ids, weights


def _ends_word(tokenizer: Any, token_id: int) -> bool:
    """Whether a token ends a word, for vocabularies that mark word ends (CLIP BPE: ``</w>``)."""
    return str(tokenizer.convert_ids_to_tokens(int(token_id))).endswith("</w>")


def caption_token_weights(tokenizer: Any, prompts: Sequence[str], names_per_image: Sequence[Sequence[str]],
                          max_length: int, max_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt ids (B, max_length) int32 and weights (B, max_classes, max_length): weights[b, k] is the
    mean over the tokens of every whole-word occurrence of name k in prompt b.

    A name missing from its (possibly truncated) prompt is an error: its map would be empty.
    """
    n = len(prompts)
    if n != len(names_per_image):
        raise ValueError(f"{n} prompts but {len(names_per_image)} class-name lists")
    ids = tokenize(tokenizer, list(prompts), max_length=max_length) if n else np.zeros((0, max_length), np.int32)
    weights = np.zeros((n, max_classes, max_length), np.float32)
    bos = tokenizer.bos_token_id
    for b, names in enumerate(names_per_image):
        if len(names) > max_classes:
            raise ValueError(f"image {b}: {len(names)} class names, more than max_classes={max_classes}")
        row = [int(i) for i in ids[b]]
        for k, name in enumerate(names):
            t = _name_tokens(tokenizer, name)
            marked = _ends_word(tokenizer, t[-1])  # then "circle" must not match the tail of "semicircle"
            hits = [p for p in range(1, max_length - len(t) + 1) if row[p:p + len(t)] == t
                    and (row[p - 1] == bos or not marked or _ends_word(tokenizer, row[p - 1]))]
            if not hits:
                raise ValueError(f"image {b}: class name {name!r} is not a word of the prompt {prompts[b]!r}; "
                                 "name it in the prompt, set append_class_names=True, or use "
                                 "class_tokens='class_prompt'")
            for p in hits:
                weights[b, k, p:p + len(t)] = 1.0 / (len(t) * len(hits))
    return ids, weights
