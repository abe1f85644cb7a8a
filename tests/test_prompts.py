"""Prompt sources: pure functions of the global index, files, templates, shapes grammar, errors."""

import pytest

from datasetdm_jax import prompts
from datasetdm_jax.data import shapes

ANIMALS = ("cat", "dog", "horse")


def test_templates_are_a_pure_function_of_the_index():
    src = prompts.TemplatePrompts(classes=ANIMALS, templates=("a photo of a {subtype} {class}",),
                                  subtypes={"cat": ("black", "tabby")}, seed=3)
    again = prompts.TemplatePrompts(classes=ANIMALS, templates=("a photo of a {subtype} {class}",),
                                    subtypes={"cat": ("black", "tabby")}, seed=3)
    seq = [src[i] for i in range(40)]
    assert [again[i] for i in reversed(range(40))] == seq[::-1]          # order of calls does not matter
    assert src.batch([7, 3]) == [seq[7], seq[3]]
    texts = {p.text for p in seq}
    assert {"a photo of a dog", "a photo of a horse"} <= texts
    assert {"a photo of a black cat", "a photo of a tabby cat"} & texts
    assert all("  " not in t for t in texts)
    assert all(p.classes == (p.text.split()[-1],) for p in seq)
    other_seed = prompts.TemplatePrompts(classes=ANIMALS, templates=("a photo of a {subtype} {class}",),
                                         subtypes={"cat": ("black", "tabby")}, seed=4)
    assert [other_seed[i] for i in range(40)] != seq


def test_multi_class_prompts_name_distinct_classes():
    src = prompts.TemplatePrompts(classes=ANIMALS, templates=("{objects} on a farm",), max_classes=3)
    seen = [src[i] for i in range(60)]
    assert max(len(p.classes) for p in seen) == 3
    for p in seen:
        assert len(set(p.classes)) == len(p.classes)
        assert all(c in p.text for c in p.classes)
    assert any(" and " in p.text for p in seen)


def test_article_placeholder():
    src = prompts.TemplatePrompts(classes=("apple",), templates=("a photo of {a_class}",),
                                  subtypes={"apple": ("old", "red")})
    assert {src[i].text for i in range(20)} == {"a photo of an old apple", "a photo of a red apple"}


def test_prompt_file_skips_blank_and_comment_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# written by an LLM\n\na cat on a sofa\n  \nzwei Hunde im Schnee \u2744\n# end\n", encoding="utf-8")
    src = prompts.from_config({"kind": "file", "path": str(f)}, known_classes=ANIMALS)
    assert [src[i].text for i in range(4)] == ["a cat on a sofa", "zwei Hunde im Schnee \u2744"] * 2
    assert src[0].classes == ("cat",) and src[1].classes == ()
    assert src.describe()["num_prompts"] == 2


@pytest.mark.parametrize("content, match", [
    ("\n# only comments\n   \n", "has no prompts"),
    (b"\xff\xfe\x00bad", "is not UTF-8"),
])
def test_bad_prompt_files_are_one_line_errors(tmp_path, content, match):
    f = tmp_path / "p.txt"
    f.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ValueError, match=match) as e:
        prompts.from_config({"kind": "file", "path": str(f)})
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        prompts.read_prompt_file(str(tmp_path / "nope.txt"))


def test_unknown_classes_and_kinds_are_refused():
    with pytest.raises(ValueError, match=r"unknown class\(es\) \['unicorn'\]"):
        prompts.from_config({"kind": "templates", "classes": ["circle", "unicorn"]}, known_classes=shapes.CLASSES)
    with pytest.raises(ValueError, match="prompts.kind must be one of"):
        prompts.from_config({"kind": "llm"})
    with pytest.raises(ValueError, match="names no"):
        prompts.TemplatePrompts(classes=ANIMALS, templates=("a photo",))


def test_shapes_prompts_use_the_caption_grammar_and_vocabulary():
    src = prompts.from_config({"kind": "shapes", "seed": 1, "domain": "shifted"}, known_classes=shapes.CLASSES)
    vocab = set(shapes.caption_vocabulary())
    seen = [src[i] for i in range(50)]
    for p in seen:
        assert set(p.text.replace(",", "").split()) <= vocab
        assert p.text.endswith("background")
        assert all(c in p.text for c in p.classes)
        assert " on a plain background" not in p.text  # the shifted domain never shows light flat
    assert len({p.text for p in seen}) > 40
    assert src[5] == prompts.ShapesPrompts(seed=1, domain="shifted")[5]


def test_templates_default_to_the_decoders_classes_and_spell_them_by_words():
    known = ("background", "person", "dining table")
    src = prompts.from_config({"kind": "templates", "classes": ()}, known_classes=known)
    assert src.classes == ("person", "dining table") and src.describe()["classes"] == ["person", "dining table"]
    voc = prompts.from_config({"kind": "templates", "classes": ("pottedplant",), "words": {"pottedplant": "potted plant"}},
                              known_classes=("background", "pottedplant"))
    assert voc[0] == prompts.Prompt("a photo of a potted plant", ("pottedplant",))
    assert voc.describe()["words"] == {"pottedplant": "potted plant"}
    assert "words" not in src.describe()                      # manifests of folders made without it stay equal
    # a depth dataset has no classes: scene names are not checked against it
    rooms = prompts.from_config({"kind": "templates", "classes": ("kitchen",)}, known_classes=())
    assert rooms[3].text == "a photo of a kitchen"
