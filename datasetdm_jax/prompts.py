"""Prompt sources for dataset generation: every prompt is a pure function of its global index.

A source maps a global example index ``i`` to a ``Prompt`` (text + the classes it names), drawn
from ``numpy.random.default_rng([seed, STREAM, i])`` or read from line ``i % n`` of a file. So
every process of a multi-host run and every rerun of a stopped one draws the same, distinct stream
(the official code repeats the same prompts on every GPU). Kinds, named in a config by
``kind``:

- ``templates``: ``"a photo of a {subtype} {class}"`` over classes with optional sub-types, and
  multi-class prompts naming up to ``max_classes`` distinct classes ("a cat and a dog"). No
  ``classes``: the decoder's own classes (background left out).
- ``file``: one prompt per line (UTF-8; blank lines and ``#`` comments skipped), e.g. an
  LLM-written list; line ``i % n`` for index ``i``.
- ``shapes``: the shapes world's caption grammar ("a red circle and a blue person on a dark
  striped background"), matching what the shapes-world model was trained on.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from datasetdm_jax.data import shapes

__all__ = ["Prompt", "PromptSource", "TemplatePrompts", "FilePrompts", "ShapesPrompts", "read_prompt_file",
           "from_config", "SOURCES"]

STREAM = 0x5052  # "PR": keeps the prompt stream apart from other uses of the same seed
DEFAULT_TEMPLATES = ("a photo of {a_class}",)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: its text and the class names it mentions (in order, for class-prompt appending)."""

    text: str
    classes: tuple[str, ...] = ()


class PromptSource:
    """Base: ``source[i]`` is the prompt of global index ``i``; ``describe()`` goes into the manifest."""

    def __getitem__(self, index: int) -> Prompt:
        raise NotImplementedError

    def batch(self, indices: Sequence[int]) -> list[Prompt]:
        return [self[int(i)] for i in indices]

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def _rng(self, seed: int, index: int) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"prompt index must be >= 0, got {index}")
        return np.random.default_rng([int(seed), STREAM, int(index)])


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


@dataclasses.dataclass(frozen=True)
class TemplatePrompts(PromptSource):
    """Templates over classes with sub-types: ``{class}``, ``{subtype}`` (may be empty; spaces are
    collapsed), ``{a_class}`` ("an old cat": article + sub-type + class) and ``{objects}`` (several
    classes: "a cat and a red car") are filled. Only templates with ``{objects}`` name more than one.
    ``words`` spells a class in the text otherwise than its label name ("pottedplant": "potted plant")."""

    classes: tuple[str, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    subtypes: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    max_classes: int = 1
    seed: int = 0
    known_classes: tuple[str, ...] | None = None
    words: Mapping[str, str] = dataclasses.field(default_factory=dict)  # class -> its words in the text

    def __post_init__(self):
        if not self.classes:
            raise ValueError("prompts.classes: no classes given")
        if not self.templates:
            raise ValueError("prompts.templates: no templates given")
        if self.known_classes is not None:
            unknown = [c for c in self.classes if c not in self.known_classes]
            if unknown:
                raise ValueError(f"prompts.classes: unknown class(es) {unknown}; the decoder knows "
                                 f"{list(self.known_classes)}")
        bad = [k for k in self.subtypes if k not in self.classes]
        if bad:
            raise ValueError(f"prompts.subtypes: keys {bad} are not in prompts.classes")
        if not 1 <= int(self.max_classes) <= len(self.classes):
            raise ValueError(f"prompts.max_classes must be in [1, {len(self.classes)}], got {self.max_classes}")
        for t in self.templates:
            if "{class}" not in t and "{a_class}" not in t and "{objects}" not in t:
                raise ValueError(f"prompts.templates: {t!r} names no {{class}}, {{a_class}} or {{objects}}")

    def __getitem__(self, index: int) -> Prompt:
        rng = self._rng(self.seed, index)
        template = self.templates[rng.integers(len(self.templates))]
        n = int(rng.integers(1, int(self.max_classes) + 1))
        picked = [self.classes[j] for j in rng.choice(len(self.classes), size=n, replace=False)]
        subs = []
        for c in picked:
            options = tuple(self.subtypes.get(c, ()))
            subs.append(options[rng.integers(len(options))] if options else "")
        said = [self.words.get(c, c) for c in picked]
        phrases = [" ".join(f"{s} {c}".split()) for s, c in zip(subs, said)]
        text = template.format(**{"class": said[0], "subtype": subs[0], "a_class": _article(phrases[0]),
                                  "objects": _join([_article(p) for p in phrases])})
        text = " ".join(text.split())
        if "{objects}" not in template:
            picked = picked[:1]
        return Prompt(text, tuple(picked))

    def describe(self) -> dict[str, Any]:
        out = {"kind": "templates", "classes": list(self.classes), "templates": list(self.templates),
               "subtypes": {k: list(v) for k, v in self.subtypes.items()}, "max_classes": int(self.max_classes),
               "seed": int(self.seed)}
        if self.words:
            out["words"] = dict(self.words)
        return out


def read_prompt_file(path: str) -> list[str]:
    """Prompts of a UTF-8 file, one per line; blank lines and lines starting with ``#`` skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"prompt file {path} cannot be read: {e.strerror}") from None
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts (only blank or # comment lines)")
    return prompts


@dataclasses.dataclass(frozen=True)
class FilePrompts(PromptSource):
    """Line ``i % n`` of a prompt file; ``classes`` lists known class names found in each line."""

    path: str
    known_classes: tuple[str, ...] | None = None
    lines: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.lines:
            object.__setattr__(self, "lines", tuple(read_prompt_file(self.path)))

    def __getitem__(self, index: int) -> Prompt:
        if index < 0:
            raise IndexError(f"prompt index must be >= 0, got {index}")
        text = self.lines[int(index) % len(self.lines)]
        words = set(text.lower().replace(",", " ").replace(".", " ").split())
        named = tuple(c for c in (self.known_classes or ()) if c.lower() in words)
        return Prompt(text, named)

    def describe(self) -> dict[str, Any]:
        import hashlib
        digest = hashlib.sha256("\n".join(self.lines).encode()).hexdigest()
        return {"kind": "file", "path": os.path.abspath(self.path), "num_prompts": len(self.lines),
                "sha256": digest}


@dataclasses.dataclass(frozen=True)
class ShapesPrompts(PromptSource):
    """Captions in the shapes world's grammar: 1..max_objects coloured objects, a background."""

    seed: int = 0
    classes: tuple[str, ...] = shapes.DEFAULT_CLASSES
    domain: str = "full"
    min_objects: int = 1
    max_objects: int = 3
    background: bool = True

    def __post_init__(self):
        shapes.ShapesConfig(classes=tuple(self.classes), domain=self.domain, min_objects=self.min_objects,
                            max_objects=self.max_objects)  # validates (one-line ValueError)

    def __getitem__(self, index: int) -> Prompt:
        rng = self._rng(self.seed, index)
        counts = np.arange(self.min_objects, self.max_objects + 1)
        n = int(rng.choice(counts))
        colours = rng.choice(len(shapes.COLOUR_NAMES), size=n, replace=False)
        names = [self.classes[j] for j in rng.integers(len(self.classes), size=n)]
        objs = [{"colour": shapes.COLOUR_NAMES[c], "class_name": k, "center": (float(x), 0.0)}
                for x, (c, k) in enumerate(zip(colours, names))]
        bgs = shapes.DOMAINS[self.domain]
        bg = bgs[rng.integers(len(bgs))] if self.background else None
        return Prompt(shapes.caption_for(objs, bg), tuple(dict.fromkeys(names)))

    def describe(self) -> dict[str, Any]:
        return {"kind": "shapes", "seed": int(self.seed), "classes": list(self.classes), "domain": self.domain,
                "min_objects": int(self.min_objects), "max_objects": int(self.max_objects),
                "background": bool(self.background)}


SOURCES = {"templates": TemplatePrompts, "file": FilePrompts, "shapes": ShapesPrompts}


def from_config(cfg: Mapping[str, Any], known_classes: Sequence[str] | None = None) -> PromptSource:
    """A source from a config dict: ``kind`` plus that kind's fields (see the module docstring).

    ``known_classes`` (the decoder's class names) makes unknown template classes a one-line error.
    """
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    kind = cfg.pop("kind", None)
    # a dataset without classes (depth) cannot check prompt classes: its templates name scenes
    known = tuple(known_classes) if known_classes else None
    if kind == "templates":
        # no classes given: every class the decoder knows, background left out (COCO's come from its
        # annotation file, so a config cannot list them)
        classes = tuple(cfg.get("classes") or ()) or tuple(c for c in (known or ()) if c != "background")
        return TemplatePrompts(classes=classes,
                               templates=tuple(cfg.get("templates") or DEFAULT_TEMPLATES),
                               subtypes={k: tuple(v) for k, v in dict(cfg.get("subtypes") or {}).items()},
                               max_classes=int(cfg.get("max_classes", 1)), seed=int(cfg.get("seed", 0)),
                               known_classes=known, words=dict(cfg.get("words") or {}))
    if kind == "file":
        if not cfg.get("path"):
            raise ValueError("prompts.path: a prompt file is needed for kind='file'")
        return FilePrompts(str(cfg["path"]), known_classes=known)
    if kind == "shapes":
        classes = tuple(cfg.get("classes") or shapes.DEFAULT_CLASSES)
        if known is not None and any(c not in known for c in classes):
            raise ValueError(f"prompts.classes: unknown class(es) {[c for c in classes if c not in known]}")
        return ShapesPrompts(seed=int(cfg.get("seed", 0)), classes=classes, domain=str(cfg.get("domain", "full")),
                             min_objects=int(cfg.get("min_objects", 1)), max_objects=int(cfg.get("max_objects", 3)),
                             background=bool(cfg.get("background", True)))
    raise ValueError(f"prompts.kind must be one of {sorted(SOURCES)}, got {kind!r}")
