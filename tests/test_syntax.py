"""Grammar and parser: LALR without conflicts, spans, and a labelled message for every catalogued mistake."""

import pytest
from lark import Lark

from recipec.diagnostics import RecipeErrors
from recipec.syntax import ast
from recipec.syntax.parser import SYNTAX_EXAMPLES, build_parser, grammar_text, parse


def test_grammar_is_lalr_without_conflicts():
    # strict mode turns shift/reduce and terminal collisions into errors
    build_parser(strict=True)


def test_grammar_ships_as_package_data():
    from importlib import resources

    assert resources.files("recipec.grammar").joinpath("recipe.lark").read_text() == grammar_text()


def test_cached_tables_parse_like_a_fresh_parser(tmp_path, monkeypatch):
    from recipec.syntax import parser as module

    monkeypatch.setenv("RECIPEC_CACHE_DIR", str(tmp_path))
    module._parser.cache_clear()
    try:
        first = module._parser()  # builds and writes the cache
        assert list(tmp_path.glob("grammar-*.json"))
        module._parser.cache_clear()
        cached = module._parser()  # loads it
        text = 'recipe "x" { a = [1, 2x2, "s"]  keep s >= 3  drop l top 5% { m = f("x") } remove a.b }'
        assert cached.parse(text) == first.parse(text) == Lark(grammar_text(), parser="lalr").parse(text)
    finally:
        module._parser.cache_clear()


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    from recipec.syntax import parser as module

    monkeypatch.setenv("RECIPEC_CACHE_DIR", str(tmp_path))
    module._parser.cache_clear()
    module._parser()
    for cached in tmp_path.glob("grammar-*.json"):
        cached.write_text("{not json")
    module._parser.cache_clear()
    try:
        assert parse('recipe "x" {}').items[0].kind == "recipe"
    finally:
        module._parser.cache_clear()


def test_spans_and_values():
    document = parse('recipe "x" {\n  seed = 42\n  grid = 2x2\n  l = [a, "b", 5%]\n  f = part(1, 3)\n}\n', "r.recipe")
    block = document.items[0]
    assert (block.kind, block.labels, block.quoted) == ("recipe", ("x",), (True,))
    seed, grid, lst, call = block.items
    assert (seed.key_span.line, seed.key_span.column) == (2, 3)
    assert (seed.value.span.line, seed.value.span.column) == (2, 10)
    assert grid.value == ast.Dims(2, 2)
    assert lst.value == ast.ListValue((ast.Name("a"), ast.String("b"), ast.Number("5%")))
    assert call.value == ast.Call("part", (ast.Number("1"), ast.Number("3")))


def test_keywords_do_not_swallow_longer_names():
    document = parse("keep_ratio = 1\ntop = 2\nremoved = 3\n")
    assert [i.key for i in document.items] == ["keep_ratio", "top", "removed"]


def test_comments_are_collected_with_positions():
    document = parse('# a\nrecipe "x" { seed = 1 }  // b\n')
    assert [(c.text, c.line) for c in document.comments] == [("# a", 1), ("// b", 2)]


CATALOGUE = [(label, snippet) for label, snippets in SYNTAX_EXAMPLES.items() for snippet in snippets]


@pytest.mark.parametrize("label,snippet", CATALOGUE, ids=[s for _, s in CATALOGUE])
def test_every_catalogued_mistake_gets_its_label(label, snippet):
    with pytest.raises(RecipeErrors) as caught:
        parse(snippet, "bad.recipe")
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.code == label[0]
    assert diagnostic.message.startswith(label[1]) or diagnostic.code == "E004"
    assert diagnostic.span.path == "bad.recipe"


@pytest.mark.parametrize("snippet,code,line,column", [
    ("x = 'a'", "E001", 1, 5),
    ('x = "abc', "E012", 1, 5),
    ('x = "a\\q"', "E013", 1, 5),
    ("stage s {\n  mix {\n    a = [b c]\n  }\n}", "E006", 3, 12),
    ("stage s {\n  mix {\n    a =\n  }\n}", "E003", 4, 3),
    ("a {\n  b {\n    c = 1\n", "E004", 2, 5),
])
def test_labelled_errors_point_at_the_mistake(snippet, code, line, column):
    with pytest.raises(RecipeErrors) as caught:
        parse(snippet, "bad.recipe")
    (diagnostic,) = caught.value.diagnostics
    assert (diagnostic.code, diagnostic.span.line, diagnostic.span.column) == (code, line, column)


def test_several_syntax_errors_are_reported_in_one_pass():
    text = 'recipe "t" {\n  seed 42\n}\nsource a {\n  format = llava_jsonl\n  expect = = 3\n}\nstage s {\n  lr 1e-5\n}\n'
    with pytest.raises(RecipeErrors) as caught:
        parse(text, "bad.recipe")
    found = [(d.code, d.span.line, d.span.column) for d in caught.value.diagnostics]
    assert found == [("E002", 2, 8), ("E003", 6, 12), ("E002", 9, 6)]


def test_recovery_stops_where_blanking_would_invent_errors():
    # the faulty line opens a block: blanking it would leave a stray `}` behind
    with pytest.raises(RecipeErrors) as caught:
        parse('recipe "t" {\n  x = [a b] {\n}\n}\n', "bad.recipe")
    assert [d.code for d in caught.value.diagnostics] == ["E006"]
