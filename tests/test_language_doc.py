"""docs/language.md is what the compiler's tables say; a key the compiler accepts is documented."""

from __future__ import annotations

import pytest

from recipec.compiler import reference


def test_the_language_reference_is_current() -> None:
    text = reference.render()
    assert reference.DOC.read_text(encoding="utf-8") == text, (
        "docs/language.md is stale: run `python -m recipec.compiler.reference --write`")


def test_every_accepted_key_is_described_and_no_other() -> None:
    keys, _ = reference.compiler_tables()
    for kind, accepted in keys.items():
        assert set(reference.KEYS[kind]) == accepted, kind
    assert {"recipe", "export", "source", "columns", "dedup phash", "stage", "balance", "rule"} <= set(keys)


def test_an_undocumented_key_fails_the_rendering(monkeypatch) -> None:
    monkeypatch.setitem(reference.KEYS, "pool", {"sources": "list"})  # `category` left out
    with pytest.raises(reference.StaleReference, match="`pool` accepts category"):
        reference.render()


def test_the_defaults_come_from_the_compiler() -> None:
    text = reference.render()
    assert "| `max_distance` | integer 0..32;" in text and "| `prefer` | `best`" in text
    row = next(line for line in text.splitlines() if line.startswith("| `prefer` |"))
    assert row.endswith("| best |")
    assert "`tiny://siglip`" in text and "`google/siglip-so400m-patch14-384`" in text


def test_check_lists_the_shipped_models_for_an_unknown_reference(tmp_path) -> None:
    from recipec.compiler import compile_file

    path = tmp_path / "b.recipe"
    path.write_text('recipe "b" {}\nmodel m {\n  architecture = llava_onevision\n'
                    '  vision = "google/siglip-so400m-patch14-38"\n  language = "tiny://qwen2"\n}\n')
    (problem,) = [d for d in compile_file(str(path)).diagnostics if d.code == "E501"]
    assert problem.hint.startswith("did you mean `google/siglip-so400m-patch14-384`? Otherwise use")
    assert "tiny://siglip" in problem.hint and "Qwen/Qwen2.5-1.5B-Instruct" in problem.hint
