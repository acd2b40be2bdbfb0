"""The formatter: fixture files, shipped recipes, and properties over generated and mutated recipes."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, SHIPPED
from recipec.compiler import compile_file
from recipec.diagnostics import RecipecError, RecipeErrors
from recipec.fmt import format_text
from recipec.syntax import ast
from recipec.syntax.parser import parse

CASES = sorted((ROOT / "tests" / "fmt").glob("*.recipe"))


def split_case(path: Path) -> tuple[str, str]:
    text = path.read_text(encoding="utf-8")
    if "\n// output\n" in text:
        source, expected = text.split("\n// output\n", 1)
        return source + "\n", expected
    return text, text  # a case with no output section must already be formatted


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_fixture(case):
    source, expected = split_case(case)
    assert format_text(source) == expected
    assert format_text(expected) == expected


@pytest.mark.parametrize("recipe", SHIPPED + [ROOT / "examples" / "quickstart.recipe"], ids=lambda p: p.name)
def test_shipped_recipes_are_formatted(recipe):
    if not recipe.exists():
        pytest.skip("quickstart recipe not present")
    text = recipe.read_text(encoding="utf-8")
    assert format_text(text, str(recipe)) == text


def test_comments_are_never_lost():
    source, _ = split_case(ROOT / "tests" / "fmt" / "comments.recipe")
    before = [c.text for c in parse(source).comments]
    after = [c.text for c in parse(format_text(source)).comments]
    assert before == after and len(before) == 10


def test_syntax_error_is_reported_not_raised_raw():
    with pytest.raises(RecipeErrors) as caught:
        format_text('recipe "x" { seed = }', "x.recipe")
    assert caught.value.diagnostics[0].code == "E003"


# ---- properties ---------------------------------------------------------------------------------

names = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(lambda s: s not in ("keep", "drop", "remove", "true_"))
strings = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
numbers = st.from_regex(r"-?[0-9]{1,4}(\.[0-9]{1,2})?([eE]-?[0-9])?[KMB%]?", fullmatch=True)
scalars = st.one_of(
    strings.map(ast.String), numbers.map(ast.Number), names.map(ast.Name),
    st.tuples(st.integers(1, 9), st.integers(1, 9)).map(lambda d: ast.Dims(*d)),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4).map(lambda xs: ast.ListValue(tuple(xs))),
    st.tuples(names, st.lists(inner, max_size=3)).map(lambda t: ast.Call(t[0], tuple(t[1]))),
), max_leaves=6)
leaf_items = st.one_of(
    st.tuples(names, values).map(lambda t: ast.Attribute(*t)),
    st.tuples(st.sampled_from(["keep", "drop"]), names, st.sampled_from([">=", "<", "==", "top", "bottom"]), scalars)
    .map(lambda t: ast.Rule(*t)),
    st.lists(names, min_size=1, max_size=3).map(lambda p: ast.Removal(tuple(p))),
)
items = st.recursive(leaf_items, lambda inner: st.tuples(names, st.lists(names, max_size=2), st.lists(inner, max_size=4)).map(
    lambda t: ast.Block(t[0], tuple(t[1]), tuple(t[2]), (False,) * len(t[1]))), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(items, max_size=6))
def test_formatting_generated_recipes_preserves_the_tree_and_is_stable(generated):
    from recipec.fmt import format_document

    text = format_document(ast.Document("<gen>", tuple(generated)))
    parsed = parse(text)
    assert parsed.items == tuple(generated)
    assert format_text(text) == text


AQUILA = (ROOT / "recipes" / "aquila-vl-2b.recipe").read_text()


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_mutated_recipes_only_ever_produce_diagnostics(data):
    text = AQUILA
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["truncate", "delete", "insert", "duplicate_line"]))
        position = data.draw(st.integers(0, len(text)))
        if kind == "truncate":
            text = text[:position]
        elif kind == "delete":
            text = text[:position] + text[position + data.draw(st.integers(1, 30)):]
        elif kind == "insert":
            text = text[:position] + data.draw(st.sampled_from(["{", "}", "=", '"', "[", "x", "1.5M", "%", "part(", "\n"])) + text[position:]
        else:
            lines = text.splitlines(True)
            index = data.draw(st.integers(0, max(len(lines) - 1, 0)))
            text = "".join(lines[: index + 1] + lines[index:])
    result = compile_file(str(ROOT / "recipes" / "aquila-vl-2b.recipe"), text=text)
    for diagnostic in result.diagnostics:
        assert diagnostic.code and diagnostic.message
    try:
        format_text(text)
    except RecipecError:
        pass


VALUE_SWAPS = ['"text"', "nonsense", "-3", "0", "1.5M", "250%", "3x3", "[a, 1]", "part(9, 2)", "file(\"missing\")",
               "weight(0)", "first()", "true"]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_wrong_value_is_a_diagnostic_never_an_exception(data):
    """Replace one value of a shipped recipe by a value of another kind: the compiler must only report."""
    import re

    recipe = data.draw(st.sampled_from(SHIPPED + [ROOT / "examples" / "quickstart.recipe"]))
    text = recipe.read_text()
    values = [m for m in re.finditer(r"= ([^\n{]+)", text)]
    match = data.draw(st.sampled_from(values))
    replacement = data.draw(st.sampled_from(VALUE_SWAPS))
    mutated = text[: match.start(1)] + replacement + text[match.end(1):]
    result = compile_file(str(recipe), text=mutated)
    assert all(d.code and d.message for d in result.diagnostics)
