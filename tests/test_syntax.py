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


# ---- the fast path: tokens straight to the tree, lark for everything else -----------------------

def _everything(node):
    """A node as nested tuples of every field, spans included (the tree's equality leaves spans out)."""
    import dataclasses

    if dataclasses.is_dataclass(node):
        return (type(node).__name__,) + tuple(_everything(getattr(node, f.name)) for f in dataclasses.fields(node))
    if isinstance(node, (tuple, list)):
        return tuple(_everything(n) for n in node)
    return node


def _corpus() -> list[tuple[str, str]]:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    files = [*root.glob("recipes/**/*.recipe"), *root.glob("examples/**/*.recipe"), *root.glob("tests/**/*.recipe")]
    return [(str(f.relative_to(root)), f.read_text(encoding="utf-8", errors="replace")) for f in sorted(files)]


ODD_BUT_LEGAL = [
    'source keep drop remove top { top = keep  bottom = [drop, remove] }',  # keywords as names
    'filter f { drop loss top5%\n keep score>=8  keep x==1 drop y bottom -2 { a = b(1, [c,], "\\u00e9") } }',
    'source """x""" { }',  # lark's label lexer has no long strings: three labels
    'a = """multi\nline""" b = 2x2 c = f() d = [] e = -1.5e-3K  # comment\n// other\nremove a.b.c',
    'x = "é\\"q" y = "a\\tb"',
    'x = "\\ud800"',  # an error of the tree builder, not of the grammar
]


def _mutations(text: str, count: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    pieces = ["{", "}", "[", "]", "(", ")", ",", "=", ".", '"', '"""', "#", "keep", "top", "remove", " ", "\n", "1", "2x2",
              "5%", "-", ">=", "x", "\\"]
    out = []
    for _ in range(count):
        at = rng.randrange(len(text) + 1)
        kind = rng.randrange(3)
        if kind == 0:
            out.append(text[:at] + rng.choice(pieces) + text[at:])
        elif kind == 1:
            out.append(text[:at] + text[at + rng.randrange(1, 8):])
        else:
            out.append(text[:at] + rng.choice(pieces) + text[at + 1:])
    return out


def test_fast_path_builds_the_tree_lark_builds_with_every_span():
    from recipec.syntax import parser as module

    texts = [text for _, text in _corpus()] + ODD_BUT_LEGAL
    for index, (_, text) in enumerate(_corpus()[:12]):
        texts += _mutations(text, 40, seed=index)
    read_fast = 0
    for text in texts:
        text = module.normalise(text)
        try:
            fast = module._parse_fast(text, "t.recipe")
        except (module._GiveUp, IndexError):
            try:
                module._parse_lark(text, "t.recipe")
            except RecipeErrors:
                pass  # an error: reported by lark as before
            continue
        read_fast += 1
        slow = module._parse_lark(text, "t.recipe")  # it must accept what the fast path accepts
        assert _everything(fast[0]) == _everything(slow[0]), text
        assert fast[1] == slow[1], text
    assert read_fast > 60  # every shipped recipe and many mutations went through the fast path


def test_what_the_fast_path_gives_up_on_still_parses():
    doc = parse('filter f { drop loss top5% }')  # lark's contextual lexer reads `top` `5%`
    (block,) = doc.items
    assert (block.items[0].op, block.items[0].value.text) == ("top", "5%")
    labels = parse('source """x""" { }').items[0].labels
    assert labels == ("", "x", "")


def test_fast_path_never_backtracks_over_long_blank_runs():
    import subprocess
    import sys

    code = ("from recipec.syntax.parser import parse\nfrom recipec.diagnostics import RecipeErrors\n"
            "text = 'a = 1' + ' ' * 200_000 + '\\x0b'\n"
            "try:\n    parse(text)\nexcept RecipeErrors as e:\n    print(e.diagnostics[0].code)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "E001", result.stderr


def test_a_large_generated_recipe_checks_in_linear_time(tmp_path):
    """About 2 MB (11,000 sources): linear work checks it in a few seconds; anything quadratic in the
    number of blocks would take minutes and hit the timeout (no duration is asserted)."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("bench_compile", root / "benchmarks" / "bench_compile.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = bench.generate_size(2.0)
    assert len(text) > 1_900_000
    path = tmp_path / "large.recipe"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "recipec", "check", str(path)], capture_output=True, text=True,
                            timeout=90, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 error(s), 0 warning(s)" in result.stdout + result.stderr


def test_syntax_errors_are_the_same_when_lark_reads_only_from_before_the_mistake(monkeypatch):
    """lark is given the text with the complete items before the failing one blanked: the errors, their
    positions and messages must be those of lark reading the whole text."""
    from lark.exceptions import UnexpectedInput

    from recipec.syntax import parser as module

    texts = [text for _, text in _corpus()]
    for index, (_, text) in enumerate(_corpus()[:12]):
        texts += _mutations(text, 40, seed=100 + index)

    def diagnostics(text):
        try:
            parse(text, "t.recipe")
        except RecipeErrors as errors:
            return [(d.code, d.message, d.span, d.hint) for d in errors.diagnostics]
        return []

    fast = [diagnostics(t) for t in texts]

    def whole(text):
        try:
            module._parser().parse(text)
        except UnexpectedInput as error:
            return error
        return None

    monkeypatch.setattr(module, "_lark_error", lambda text, starts=None: whole(text))
    reference = [diagnostics(t) for t in texts]
    assert sum(1 for d in reference if d) > 100
    for text, got, expected in zip(texts, fast, reference):
        assert got == expected, text
