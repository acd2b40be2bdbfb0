"""Text -> syntax tree. Lark is used here and nowhere else: its trees and errors never leave this module."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import unicodedata
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Tree
from lark.grammar import Rule
from lark.lexer import TerminalDef
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from recipec.diagnostics import Diagnostic, RecipeErrors, Span, printable
from recipec.syntax import ast

GRAMMAR_PACKAGE = "recipec.grammar"
GRAMMAR_FILE = "recipe.lark"


def grammar_text() -> str:
    return resources.files(GRAMMAR_PACKAGE).joinpath(GRAMMAR_FILE).read_text(encoding="utf-8")


def build_parser(*, parser: str = "lalr", strict: bool = False) -> Lark:
    """A fresh Lark parser over the recipe grammar (the benchmark builds an Earley one too)."""
    options = dict(parser=parser, propagate_positions=True, maybe_placeholders=False)
    if parser == "lalr":
        options["strict"] = strict
    return Lark(grammar_text(), **options)


@lru_cache(maxsize=1)
def _parser() -> Lark:
    """The LALR parser, loaded from the tables cached for this grammar when they exist.

    Building the tables takes a quarter of a second, longer than the rest of `recipec check`; the
    cache is JSON (never pickle), keyed by the grammar's and lark's versions, written atomically,
    and ignored whenever it cannot be read.
    """
    import lark

    text = grammar_text()
    key = hashlib.sha256(f"{lark.__version__}\n{text}".encode()).hexdigest()[:20]
    cache = _cache_dir() / f"grammar-{key}.json"
    try:
        stored = _decode(json.loads(cache.read_text(encoding="utf-8")))
        return Lark._load_from_dict(stored["data"], stored["memo"])
    except Exception:  # missing, stale or damaged: rebuild
        pass
    parser = build_parser()
    try:
        data, memo = parser.memo_serialize([TerminalDef, Rule])
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(_encode({"data": data, "memo": memo})), encoding="utf-8")
        os.replace(temporary, cache)
    except (OSError, TypeError):
        pass  # a read-only home is no reason to fail
    return parser


def _cache_dir() -> Path:
    if os.environ.get("RECIPEC_CACHE_DIR"):
        return Path(os.environ["RECIPEC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "recipec"


def _encode(value):
    """JSON for lark's serialized tables: they hold tuples and dicts with integer keys."""
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"__pairs__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot cache {type(value).__name__}")


def _decode(value):
    if isinstance(value, dict):
        if "__pairs__" in value:
            return {_decode(k): _decode(v) for k, v in value["__pairs__"]}
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


# ---- syntax errors ------------------------------------------------------------------------------

# Labelled messages for parse failures: each entry maps the parser state a snippet fails in to a
# message and a hint (lark's `match_examples`). tests/test_syntax_errors.py holds one case per entry.
SYNTAX_EXAMPLES: dict[tuple[str, str, str], list[str]] = {
    ("E002", "expected `=` or `{` after a name", "set a value with `key = value`, or open a block with `kind name { ... }`"): [
        "seed 42",
        "recipe { seed 42 }",
        "source a { format llava_json }",
    ],
    ("E003", "missing value after `=`", "a value is a string, a number such as `10M` or `5%`, a name, a list `[a, b]` or a call like `file(\"x\")`"): [
        "seed =",
        "recipe { seed = }",
        "source a { b = = }",
        "x = ]",
        "x = )",
        "x = ,",
    ],
    ("E004", "a block is missing its closing `}`", "add `}` to close the block"): [
        "recipe {",
        "recipe { seed = 1",
        "stage s1 { mix { a = 1 }",
    ],
    ("E005", "unexpected `}` with no block open", "remove this `}` or open the block it closes"): [
        "}",
        "recipe { } }",
    ],
    ("E006", "unclosed list", "close the list with `]`, separating items with `,`"): [
        "x = [a, b",
        "x = [a b]",
        "x = [a,",
    ],
    ("E007", "unclosed call", "close the argument list with `)`, separating arguments with `,`"): [
        "x = file(\"a\"",
        "x = part(1 3)",
    ],
    ("E008", "a rule needs a field, then a comparison or `top`/`bottom`", "write e.g. `keep score >= 8` or `drop loss top 5%`"): [
        "keep",
        "keep score",
        "drop loss 5%",
        "keep score >=",
        "drop loss top",
    ],
    ("E009", "`remove` needs a path", "write e.g. `remove source.synthetic` or, inside a block, `remove key`"): [
        "remove",
        "remove source.",
        "remove 1",
    ],
    ("E010", "a block label must be a name or a string", "write e.g. `source emu2_caption { ... }` or `recipe \"aquila\" { ... }`"): [
        "source a [ ]",
        "source a 1 { }",
    ],
    ("E011", "a recipe item must start with a name", "items are `key = value`, `kind name { ... }`, `keep ...`, `drop ...` or `remove ...`"): [
        "1 = 2",
        "\"x\" = 1",
        "= 1",
        "[a]",
    ],
}


@lru_cache(maxsize=1)
def _catalogue() -> dict:
    """Parser state (and the token found there) -> label, learnt by parsing every catalogue snippet.

    Only the LALR state is compared, not the whole stack, so a snippet written at the top level also
    labels the same mistake inside nested blocks or after labels.
    """
    by_state_token: dict[tuple[int, str], tuple[str, str, str]] = {}
    by_state: dict[int, tuple[str, str, str]] = {}
    for label, snippets in SYNTAX_EXAMPLES.items():
        for snippet in snippets:
            try:
                _parser().parse(snippet)
            except UnexpectedToken as error:
                state = error.state.position
                by_state_token.setdefault((state, error.token.type), label)
                by_state.setdefault(state, label)
            except UnexpectedInput:
                continue
    return {"token": by_state_token, "state": by_state}


def _catalogue_match(error: UnexpectedInput, text: str) -> tuple[str, str, str] | None:
    if not isinstance(error, UnexpectedToken) or error.state is None:
        return None
    table = _catalogue()
    state = error.state.position
    return table["token"].get((state, error.token.type)) or table["state"].get(state)


_CHAR_HINTS = {
    "'": "strings use double quotes: \"...\"",
    ":": "use `=` to set a value",
    ";": "no separator is needed between items",
}


def _describe(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    return f"`{token.value}`"


def _syntax_diagnostic(error: UnexpectedInput, text: str, path: str) -> Diagnostic:
    line = getattr(error, "line", None) or 1
    column = getattr(error, "column", None) or 1
    if isinstance(error, UnexpectedEOF) or (isinstance(error, UnexpectedToken) and error.token.type == "$END"):
        lines = text.splitlines() or [""]
        line, column = len(lines), len(lines[-1]) + 1
    span = Span(path, line, column, line, column + 1)
    if isinstance(error, UnexpectedCharacters):
        char = text[error.pos_in_stream] if error.pos_in_stream < len(text) else "?"
        word = _number_word(text, error.pos_in_stream)
        if word is not None:
            start, literal = word
            at_line, at_column = line, column - (error.pos_in_stream - start)
            return Diagnostic("E015", f"`{literal}` is not a number", Span(path, at_line, at_column, at_line, at_column + len(literal)),
                              _unit_hint(literal))
        if not char.isascii() or (not char.isprintable() and char not in "\t\n"):
            return Diagnostic("E001", f"unexpected character {_code_point(char)}", span, _lookalike_hint(char))
        # `"""` never closed lexes as the empty string `""`, then an unterminated `"`
        if text.startswith('"""', max(0, error.pos_in_stream - 2)) and column > 2:
            return Diagnostic("E012", 'this """ string is never closed', Span(path, line, column - 2, line, column + 1),
                              'close it with """')
        if char == '"':
            return Diagnostic("E012", "unterminated string", span, "close the string with `\"` on the same line, or use \"\"\"...\"\"\" for text over several lines")
        hint = _CHAR_HINTS.get(char)
        return Diagnostic("E001", f"unexpected character `{char}`", span, hint)
    if isinstance(error, UnexpectedToken):
        special = _token_problem(error, text, path, span)
        if special is not None:
            return special
    matched = _catalogue_match(error, text)
    if matched and matched[0] == "E004" and (opening := _unclosed_brace(text, path)):
        return Diagnostic("E004", "this block is never closed", opening, "add `}` where the block ends")
    if matched:
        code, message, hint = matched
        if isinstance(error, UnexpectedToken) and error.token.type not in ("$END", "RBRACE"):
            message = f"{message} (found {_describe(error.token)})"
        return Diagnostic(code, message, span, hint)
    if isinstance(error, UnexpectedToken):
        expected = sorted(error.accepts or error.expected)
        names = sorted({_token_name(e) for e in expected})
        return Diagnostic("E002", f"unexpected {_describe(error.token)}", span,
                          ("expected " + ", ".join(names[:6])) if names else None)
    return Diagnostic("E002", "syntax error", span)


def _unclosed_brace(text: str, path: str) -> Span | None:
    """The `{` left open at the end of the file (the innermost one), found by lexing."""
    stack = []
    tokens = _fast_tokens(text)  # lexed as lark's root lexer lexes it
    if tokens[-1][0] == "X":
        return None
    for token in tokens:
        if token[0] == "{":
            stack.append(token)
        elif token[0] == "}" and stack:
            stack.pop()
    if not stack:
        return None
    token = stack[-1]
    return Span(path, token[2], token[3], token[2], token[3] + 1)


KEYWORDS = ("keep", "drop", "remove", "top", "bottom")

# a digit, then what a mistyped number or unit runs on with (`300KB`, `10MM`, `1.5.3`, `300k`)
_NUMBER_WORD = re.compile(r"-?[0-9][0-9A-Za-z_.%]*")
_UNIT_SPACE = re.compile(r"(?<![\w.])(-?[0-9]+(?:\.[0-9]+)?)[ \t]+([KMBT%])(?![\w%])")


def _number_word(text: str, offset: int) -> tuple[int, str] | None:
    """(start, text) of the malformed number the lexer stopped in, if it stopped in one."""
    start = offset
    while start > 0 and (text[start - 1].isascii() and (text[start - 1].isalnum() or text[start - 1] in "_.%-")):
        start -= 1
    while start < offset and not (text[start].isdigit() or (text[start] == "-" and text[start + 1: start + 2].isdigit())):
        start += 1  # back to where the number begins: `x=1.5.3` starts at `1`, not `x`
    if start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
        return None  # inside a name such as `mlp2x_gelu`
    match = _NUMBER_WORD.match(text, start)
    if match is None or match.end() <= offset:
        return None
    return start, match.group()[:40]


def _unit_hint(literal: str) -> str:
    body = re.match(r"-?[0-9.]*", literal).group()
    rest = literal[len(body):]
    if body.count(".") > 1:
        return "a number has at most one decimal point, e.g. `1.5` (versions are strings: \"1.5.3\")"
    if rest and rest[0] in "kmbt" and len(rest) == 1:
        return f"unit suffixes are upper case: `{body}{rest.upper()}`"
    if rest[:1] in ("K", "M", "B", "T") and len(rest) > 1:
        return f"a count takes one suffix, K, M, B or T, e.g. `{body}{rest[0]}` (`10M` is ten million)"
    return "counts end in K, M, B or T (`500K`, `8.6M`), shares in % (`5%`), grids are `2x2`"


_CONTROL_NAMES = {0: "NUL", 7: "BELL", 8: "BACKSPACE", 0x1B: "ESCAPE", 0x7F: "DELETE"}


def _code_point(char: str) -> str:
    name = unicodedata.name(char, "") or _CONTROL_NAMES.get(ord(char), "a control character" if not char.isprintable() else "")
    shown = f"`{char}` " if char.isprintable() and not unicodedata.category(char).startswith("Z") else ""
    return f"{shown}(U+{ord(char):04X}{' ' + name if name else ''})".replace("``", "`")


_LOOKALIKES = {
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"', "\u2018": "'", "\u2019": "'",
    "\u2013": "-", "\u2014": "-", "\u2212": "-", "\u00a0": " ", "\u2009": " ", "\u3000": " ", "\uff1d": "=",
    "\uff5b": "{", "\uff5d": "}", "\uff3b": "[", "\uff3d": "]",
}


def _lookalike_hint(char: str) -> str:
    if char in ("\u201c", "\u201d", "\u201e", "\u00ab", "\u00bb"):
        return 'strings use the ASCII double quote `"` (an editor may have turned it into a curly one)'
    if char == "\ufeff":
        return "remove the invisible byte-order mark (only one at the very start of the file is allowed)"
    if char == "\0":
        return "the file holds a NUL byte: is it a recipe?"
    if char in _LOOKALIKES:
        return f"it looks like `{_LOOKALIKES[char]}` but is not ASCII: retype it"
    base = unicodedata.normalize("NFKD", char)
    name = unicodedata.name(char, "")
    for script in ("CYRILLIC", "GREEK", "ARMENIAN"):
        if name.startswith(script):
            return f"a {script.title()} letter: names are ASCII letters, digits, `_` and `-`; retype it in ASCII"
    if base != char and base[:1].isascii():
        return f"names are ASCII: did you mean `{base[0]}`?"
    return "names are ASCII letters, digits, `_` and `-`; non-ASCII text belongs in a string"


_HEADER = re.compile(r'\s*[A-Za-z_][\w\-]*(\s+([A-Za-z_][\w\-]*|"(?:[^"\\\n]|\\.)*"))*\s*')


def _open_header(lines: list[str], index: int) -> tuple[int, str] | None:
    """(index, text) of the nearest line above `index` that reads like a block header left without `{`."""
    while index >= 0 and not lines[index].split("#")[0].split("//")[0].strip():
        index -= 1
    if index < 0:
        return None
    text = lines[index].split("#")[0].split("//")[0].rstrip()
    return (index, text) if _HEADER.fullmatch(text) else None


def _token_name(terminal: str) -> str:
    if terminal in _TOKEN_NAMES:
        return _TOKEN_NAMES[terminal]
    if terminal.lower() in KEYWORDS:
        return f"`{terminal.lower()}`"
    return "something else"


def _token_problem(error: UnexpectedToken, text: str, path: str, span: Span) -> Diagnostic | None:
    """Mistakes recognised by what surrounds the token: reserved words as names, a unit after a space."""
    lines = text.split("\n")
    token = error.token
    if token.type in ("$END",) or not 0 < span.line <= len(lines):
        return None
    current = lines[span.line - 1]
    before = current[: span.column - 1]
    keyword = re.fullmatch(r"\s*(keep|drop|remove)\s*", before)
    if keyword and token.type == "EQUAL":
        word = keyword.group(1)
        start = before.index(word) + 1
        return Diagnostic("E016", f"`{word}` is a reserved word: it starts a rule, so it cannot be a key or a name",
                          Span(path, span.line, start, span.line, start + len(word)),
                          f"choose another name, e.g. `{word}_set`" if word != "remove" else "choose another name")
    if token.type in ("DOT", "NUMBER", "IDENT", "DIMS") and before[-1:].isdigit():
        word = _number_word(text, token.start_pos)
        if word is not None:
            start, literal = word
            column = span.column - (token.start_pos - start)
            return Diagnostic("E015", f"`{literal}` is not a number", Span(path, span.line, column, span.line, column + len(literal)),
                              _unit_hint(literal))
    if token.type == "EQUAL" and re.fullmatch(r"\s*[A-Za-z_][\w\-]*\s*", before):
        header = _open_header(lines, span.line - 2)
        if header is not None:
            number, text = header
            column = len(text.rstrip()) + 1
            return Diagnostic("E017", f"missing `{{` after `{printable(text.strip())}`",
                              Span(path, number + 1, column, number + 1, column + 1),
                              f"open the block: `{printable(text.strip())} {{`")
    if token.type.lower() in KEYWORDS and "IDENT" in (error.accepts or error.expected):
        return Diagnostic("E016", f"`{token.value}` is a reserved word and cannot be a name here",
                          span, f"choose another name, e.g. `{token.value}_set`")
    for number in (span.line - 1, span.line - 2):
        if 0 <= number < len(lines):
            line_text = lines[number].split("#")[0].split("//")[0]
            match = _UNIT_SPACE.search(line_text)
            if match:
                column = match.start() + 1
                literal = match.group(0)
                return Diagnostic("E015", f"`{literal.strip()}`: a unit is written right after its number",
                                  Span(path, number + 1, column, number + 1, column + len(literal)),
                                  f"write `{match.group(1)}{match.group(2)}`")
    return None


_TOKEN_NAMES = {
    "IDENT": "a name", "STRING": "a string", "NUMBER": "a number", "DIMS": "a grid like `2x2`",
    "EQUAL": "`=`", "LBRACE": "`{`", "RBRACE": "`}`", "LSQB": "`[`", "RSQB": "`]`", "LPAR": "`(`",
    "RPAR": "`)`", "COMMA": "`,`", "DOT": "`.`", "CMP": "a comparison", "LONG_STRING": "a string",
    "$END": "end of file",
}


# ---- tree conversion ----------------------------------------------------------------------------


_BAD_IN_STRING = re.compile("[\x00\ud800-\udfff]")  # only reachable through \\u escapes


class _Builder:
    def __init__(self, path: str):
        self.path = path
        self.errors: list[Diagnostic] = []

    def span(self, node: Tree | Token) -> Span:
        if isinstance(node, Token):
            return Span(self.path, node.line, node.column, node.end_line, node.end_column)
        meta = node.meta
        if getattr(meta, "empty", True):
            return ast.NO_SPAN
        return Span(self.path, meta.line, meta.column, meta.end_line, meta.end_column)

    def items(self, children) -> tuple[ast.Item, ...]:
        return tuple(self.item(child) for child in children if isinstance(child, Tree))

    def item(self, tree: Tree) -> ast.Item:
        kind = tree.data
        if kind == "attribute":
            key, value = tree.children
            return ast.Attribute(str(key), self.value(value), self.span(tree), self.span(key))
        if kind == "block":
            kind_token = tree.children[0]
            labels = [c for c in tree.children[1:] if isinstance(c, Tree) and c.data == "label"]
            body = [c for c in tree.children[1:] if isinstance(c, Tree) and c.data != "label"]
            label_tokens = [lab.children[0] for lab in labels]
            end = self.span(tree)
            return ast.Block(
                kind=str(kind_token),
                labels=tuple(self.label_text(t) for t in label_tokens),
                items=self.items(body),
                quoted=tuple(t.type == "STRING" for t in label_tokens),
                span=self.span(tree),
                kind_span=self.span(kind_token),
                label_spans=tuple(self.span(t) for t in label_tokens),
                end_span=Span(self.path, end.end_line, max(1, end.end_column - 1), end.end_line, end.end_column),
            )
        if kind == "rule":
            verb, field_token, condition, *rest = tree.children
            op_node, value = condition.children
            op = str(op_node.children[0]) if isinstance(op_node, Tree) else str(op_node)
            body = self.items(rest[0].children) if rest else None
            return ast.Rule(str(verb.children[0]), str(field_token), op, self.value(value), body,
                            self.span(tree), self.span(field_token))
        if kind == "removal":
            (path_tree,) = tree.children
            return ast.Removal(tuple(str(t) for t in path_tree.children), self.span(tree))
        raise AssertionError(f"unknown syntax node {kind}")

    def label_text(self, token: Token) -> str:
        return self.string(token) if token.type == "STRING" else str(token)

    def string(self, token: Token) -> str:
        return self.string_text(str(token), self.span(token))

    def string_text(self, raw: str, span: Span) -> str:
        """The text of a string literal `raw` written at `span`; E013 for what it may not hold."""
        if "\\" not in raw:
            text = raw[1:-1]  # nothing escaped: the common case, without a JSON decoder
        else:
            try:
                text = json.loads(raw, strict=False)
            except json.JSONDecodeError:
                self.errors.append(Diagnostic("E013", "invalid escape in string", span,
                                              "use \\\" \\\\ \\n \\t or \\uXXXX"))
                return raw[1:-1]
        found = _BAD_IN_STRING.search(text)
        if found is not None:
            bad = found.group()
            what = "a NUL character" if bad == "\0" else f"a lone surrogate `\\u{ord(bad):04x}`"
            self.errors.append(Diagnostic("E013", f"a string cannot hold {what}", span,
                                          "write the character itself, or a surrogate pair \\ud83d\\ude00 for one above U+FFFF"
                                          if bad != "\0" else "remove the NUL character"))
        return text

    def value(self, node: Tree | Token) -> ast.Value:
        span = self.span(node)
        kind = node.data
        if kind == "string":
            return ast.String(self.string(node.children[0]), False, span)
        if kind == "long_string":
            return ast.String(str(node.children[0])[3:-3], True, span)
        if kind == "number":
            return ast.Number(str(node.children[0]), span)
        if kind == "dims":
            return self.dims(str(node.children[0]), span)
        if kind == "name":
            return ast.Name(str(node.children[0]), span)
        if kind == "list":
            return ast.ListValue(tuple(self.value(c) for c in node.children if c is not None), span)
        if kind == "call":
            name, *args = node.children
            return ast.Call(str(name), tuple(self.value(a) for a in args if a is not None), span)
        raise AssertionError(f"unknown value node {kind}")

    def dims(self, text: str, span: Span) -> ast.Dims:
        first, second = text.split("x")
        if len(first) > 18 or len(second) > 18:  # past any grid or budget; int() of 5,000 digits fails
            self.errors.append(Diagnostic("E202", f"`{first[:10]}...x...` is out of range", span,
                                          "a grid is `2x2`, a token budget `10x729`"))
            return ast.Dims(1, 1, span)
        return ast.Dims(int(first), int(second), span)


MAX_NESTING = 64  # blocks, lists and calls inside one another; real recipes use four or five


def normalise(text: str) -> str:
    """What the parser reads: without a leading UTF-8 BOM, with `\\r\\n` and lone `\\r` line ends as `\\n`."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


@contextmanager
def collector_paused():
    """Python's cycle collector held off while a tree is built.

    A tree holds no cycles (reference counting frees it), but building one allocates millions of
    objects that all survive, and each collection the allocations trigger walks everything that
    survived so far: with the collector on, a 5 MB recipe takes three times as long to read.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse(text: str, path: str = "<recipe>") -> ast.Document:
    """Parse recipe text; raise RecipeErrors (never a lark exception) when it is not well formed."""
    text = normalise(text)
    comments = _comments(text, path)
    with collector_paused():
        starts: list[int] = []
        try:
            items, errors = _parse_fast(text, path, starts)
        except (_GiveUp, IndexError):
            items, errors = _parse_lark(text, path, starts)
    if errors:
        raise RecipeErrors(errors)
    return ast.Document(path, items, tuple(comments), text)


def _parse_lark(text: str, path: str, starts: list[int] | None = None) -> tuple[tuple[ast.Item, ...], list[Diagnostic]]:
    """The items through lark (every syntax error is reported from here) and the builder's errors.

    `starts`: what the fast path, having given up on this text, found (see `_lark_error`).
    """
    error = _lark_error(text, starts)
    if error is not None:
        raise RecipeErrors(_syntax_errors(error, text, path)) from None
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as error:  # not reached: _lark_error parsed the same text
        raise RecipeErrors(_syntax_errors(error, text, path)) from None
    builder = _Builder(path)
    items = builder.items(tree.children)
    return items, builder.errors


# ---- the fast path: tokens straight to the syntax tree ------------------------------------------
#
# Lark's LALR parser with propagated positions costs about 8 s per megabyte; almost all of it is the
# generic machinery (a token object, a rule callback and a position walk per node). The grammar is
# small and LL(1), so valid recipes are read by one regular expression and a recursive descent that
# builds the tree and takes every span from the tokens themselves. It accepts a subset of what the
# grammar accepts, with the same tree and the same spans (tests/test_syntax.py compares both on the
# shipped recipes, the catalogues and mutated recipes); on anything it does not accept (every syntax
# error, and a few legal oddities such as `drop loss top5%`, which lark's contextual lexer splits) it
# gives up, and the text goes through lark as before, so every error keeps its exact position,
# message and hint.
#
# Tokens are lexed as lark's root lexer would: the same terminals in lark's order (priority, then
# width), `keep`/`drop`/`remove` only at the start of an item and `top`/`bottom` only after a rule's
# field, which is where lark's contextual lexer knows them; everywhere else such a word is a name.

_SKIP = r"(?:[ \t\f\r\n]++|(?:#|//)[^\n]*+)*+"  # possessive: a long blank run never backtracks
_FAST_TOKEN = re.compile(_SKIP + "(?:" + "|".join([
    r'(?P<L>"""[\s\S]*?""")',
    r"(?P<D>[0-9]+x[0-9]+(?![A-Za-z0-9_.]))",
    r"(?P<N>-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?[KMBT%]?(?![A-Za-z0-9_]))",
    r"(?P<I>[A-Za-z_][A-Za-z0-9_\-]*)",
    r'(?P<S>"(?:[^"\\\n]|\\.)*")',
    r"(?P<C>>=|<=|==|!=|>|<)",
    r"(?P<P>[{}=.,\[\]()])",
    r"(?P<E>\Z)",
]) + ")")


class _GiveUp(Exception):
    """The fast path does not read this text; lark will."""


def _fast_tokens(text: str) -> list[tuple]:
    """(kind, text, line, column, end_line, end_column, offset) per token, lexed as lark's root lexer.

    Kinds: L long string, D dims, N number, I name or keyword, S string, C comparison, and for
    punctuation the character itself. The last token is E at the end of the text, or X where no
    terminal matches.
    """
    tokens = []
    append = tokens.append
    line, line_start, at = 1, 0, 0
    count, rfind, match_at = text.count, text.rfind, _FAST_TOKEN.match
    while True:
        match = match_at(text, at)  # anchored: a character no terminal matches costs no search
        if match is None:
            append(("X", "", line, at - line_start + 1, line, at - line_start + 1, at))
            return tokens
        kind = match.lastgroup
        start, end = match.span(kind)
        if start != at:  # skipped blanks and comments
            newlines = count("\n", at, start)
            if newlines:
                line += newlines
                line_start = rfind("\n", at, start) + 1
        value = match.group(kind)
        column = start - line_start + 1
        if kind == "P":
            append((value, value, line, column, line, column + 1, start))
        elif kind == "L" and "\n" in value:
            first = line
            line += value.count("\n")
            line_start = rfind("\n", start, end) + 1
            append((kind, value, first, column, line, end - line_start + 1, start))
        else:
            append((kind, value, line, column, line, end - line_start + 1, start))
        at = end
        if kind == "E":
            return tokens


def _parse_fast(text: str, path: str, starts: list[int] | None = None) -> tuple[tuple[ast.Item, ...], list[Diagnostic]]:
    """The items of a well-formed recipe and the builder's errors; raises _GiveUp otherwise.

    `starts` receives the offset of each top-level item begun (the last one is where it gave up).
    """
    tokens = _fast_tokens(text)
    top_level = starts if starts is not None else []
    builder = _Builder(path)
    errors = builder.errors
    string = builder.string_text
    make_span = Span
    Attribute, Block, Rule, Removal = ast.Attribute, ast.Block, ast.Rule, ast.Removal
    position = 0

    def span_of(token) -> Span:
        return make_span(path, token[2], token[3], token[4], token[5])

    def value():
        nonlocal position
        token = tokens[position]
        kind = token[0]
        position += 1
        if kind == "I":
            if tokens[position][0] == "(":
                position += 1
                args = []
                closing = tokens[position]
                if closing[0] == ")":
                    position += 1
                else:
                    while True:
                        args.append(value())
                        closing = tokens[position]
                        position += 1
                        if closing[0] == ")":
                            break
                        if closing[0] != ",":
                            raise _GiveUp
                return ast.Call(token[1], tuple(args), make_span(path, token[2], token[3], closing[4], closing[5]))
            return ast.Name(token[1], span_of(token))
        if kind == "S":
            span = span_of(token)
            return ast.String(string(token[1], span), False, span)
        if kind == "N":
            return ast.Number(token[1], span_of(token))
        if kind == "D":
            return builder.dims(token[1], span_of(token))
        if kind == "L":
            return ast.String(token[1][3:-3], True, span_of(token))
        if kind == "[":
            entries = []
            while True:
                if tokens[position][0] == "]":
                    closing = tokens[position]
                    position += 1
                    break
                entries.append(value())
                closing = tokens[position]
                position += 1
                if closing[0] == "]":
                    break
                if closing[0] != ",":
                    raise _GiveUp
            return ast.ListValue(tuple(entries), make_span(path, token[2], token[3], closing[4], closing[5]))
        raise _GiveUp

    def items(closing: str) -> tuple[tuple[ast.Item, ...], tuple]:
        """Items up to `closing` ("}" or "E"); returns them and the closing token."""
        nonlocal position
        found = []
        append = found.append
        while True:
            token = tokens[position]
            kind = token[0]
            if kind != "I":
                if kind == closing:
                    position += 1
                    return tuple(found), token
                if closing == "E":
                    top_level.append(token[6])
                raise _GiveUp
            word = token[1]
            position += 1
            if closing == "E":
                top_level.append(token[6])
            if word == "keep" or word == "drop":
                field = tokens[position]
                condition = tokens[position + 1]
                if field[0] != "I":
                    raise _GiveUp
                if condition[0] == "C":
                    op = condition[1]
                elif condition[0] == "I" and condition[1] in ("top", "bottom"):
                    op = condition[1]
                else:
                    raise _GiveUp
                position += 2
                mark = len(errors)
                rule_value = value()
                value_errors = errors[mark:]
                del errors[mark:]  # lark's builder reads the body before the value: keep its order
                body = None
                last = tokens[position - 1]
                if tokens[position][0] == "{":
                    position += 1
                    body, last = items("}")
                errors.extend(value_errors)
                end_line, end_column = (last[4], last[5]) if body is not None else (rule_value.span.end_line, rule_value.span.end_column)
                append(Rule(word, field[1], op, rule_value, body, make_span(path, token[2], token[3], end_line, end_column),
                            span_of(field)))
            elif word == "remove":
                names = []
                last = tokens[position]
                if last[0] != "I":
                    raise _GiveUp
                names.append(last[1])
                position += 1
                while tokens[position][0] == ".":
                    last = tokens[position + 1]
                    if last[0] != "I":
                        raise _GiveUp
                    names.append(last[1])
                    position += 2
                append(Removal(tuple(names), make_span(path, token[2], token[3], last[4], last[5])))
            else:
                following = tokens[position]
                if following[0] == "=":
                    position += 1
                    attribute_value = value()
                    end = attribute_value.span
                    append(Attribute(word, attribute_value, make_span(path, token[2], token[3], end.end_line, end.end_column),
                                     span_of(token)))
                    continue
                labels, quoted, label_spans = [], [], []
                while following[0] == "I" or following[0] == "S":
                    span = span_of(following)
                    if following[0] == "S":
                        labels.append(string(following[1], span))
                        quoted.append(True)
                    else:
                        labels.append(following[1])
                        quoted.append(False)
                    label_spans.append(span)
                    position += 1
                    following = tokens[position]
                if following[0] != "{":
                    raise _GiveUp
                position += 1
                body, last = items("}")
                append(Block(word, tuple(labels), body, tuple(quoted), make_span(path, token[2], token[3], last[4], last[5]),
                             span_of(token), tuple(label_spans), span_of(last)))

    try:
        document_items, _ = items("E")
    finally:
        value = items = None  # the two functions refer to each other: free them (and the tokens) now
    return document_items, errors


MAX_SYNTAX_ERRORS = 10
_OPENERS, _CLOSERS = "{[(", "}])"


def _syntax_errors(error: UnexpectedInput, text: str, path: str) -> list[Diagnostic]:
    """The first syntax error, then the next ones found by blanking each faulty line and parsing again.

    Blanking keeps every other position where it was. It stops at a line whose brackets or quotes
    do not balance (blanking it would invent errors further on) and at an unclosed block, whose
    error is at the end of the file.
    """
    found = [_syntax_diagnostic(error, text, path)]
    attempt = text
    while len(found) < MAX_SYNTAX_ERRORS:
        last = found[-1]
        lines = attempt.split("\n")
        if last.code in ("E004", "E005", "E012", "E017") or not 0 < last.span.line <= len(lines):
            break
        faulty = lines[last.span.line - 1]
        if not _balanced(faulty):
            break
        lines[last.span.line - 1] = " " * len(faulty)
        attempt = "\n".join(lines)
        next_error = _lark_error(attempt)
        if next_error is None:
            break
        token = getattr(next_error, "token", None)
        if token is not None and token.type in ("RBRACE", "$END"):
            break  # most likely a block left open by the blanked line: not a mistake of its own
        diagnostic = _syntax_diagnostic(next_error, attempt, path)
        if diagnostic.span.line <= last.span.line:
            break  # no progress: what follows depends on what was blanked
        found.append(diagnostic)
    return found


def _lark_error(text: str, starts: list[int] | None = None) -> UnexpectedInput | None:
    """lark's error for `text`, None when the fast path or lark reads it.

    lark is slow (8 s a megabyte) and only needs to read from shortly before the mistake: the fast
    path reads the text exactly as lark does up to where it gives up, so every top-level item before
    the one it gave up in is complete. The text lark is given has all of them but the last blanked
    (spaces; line ends kept, so every position stays where it was): lark reaches the failing item in
    the same parser state (after one complete item is the same state as after any number), so it
    raises the same error at the same place, with the same state for the catalogue. Blanking is
    only for lark's eyes: messages and hints read the text as written.
    """
    if starts is None:  # else the fast path has given up on this text, and found these starts
        starts = []
        try:
            _parse_fast(text, "<check>", starts)
            return None
        except (_GiveUp, IndexError):
            pass
    cut = starts[-2] if len(starts) >= 2 else 0
    blanked = _BLANK.sub(" ", text[:cut]) + text[cut:] if cut else text
    try:
        _parser().parse(blanked)
    except UnexpectedInput as error:
        return error
    return None


_BLANK = re.compile(r"[^\n]")


def _balanced(line: str) -> bool:
    code = _STRING_OR_COMMENT.sub(lambda m: "" if m.group("comment") else '""', line)
    if code.count('"') % 2:
        return False
    return all(code.count(o) == code.count(c) for o, c in zip(_OPENERS, _CLOSERS))


# strings first, so that `#` or `//` inside one is not taken for a comment
_STRING_OR_COMMENT = re.compile(r'"""[\s\S]*?"""|"(?:[^"\\\n]|\\.)*"|(?P<comment>(?:#|//)[^\n]*)')


# the same, and the brackets outside strings and comments
_SCAN = re.compile(r'"""[\s\S]*?"""|"(?:[^"\\\n]|\\.)*"|(?P<comment>(?:#|//)[^\n]*)|(?P<open>[{\[(])|(?P<close>[}\])])')


def _comments(text: str, path: str = "<recipe>") -> list[ast.Comment]:
    """Comments with their positions, in one regular-expression pass over the text.

    The same pass measures how deeply blocks, lists and calls nest: past MAX_NESTING levels it raises
    RecipeErrors at the bracket that goes too deep, before anything recursive sees the text.
    """
    found: list[ast.Comment] = []
    depth = 0
    line, counted = 1, 0  # lines counted up to offset `counted`: one pass, however many comments

    def position(offset: int) -> tuple[int, int]:
        nonlocal line, counted
        line += text.count("\n", counted, offset)
        counted = offset
        return line, offset - (text.rfind("\n", 0, offset) + 1) + 1

    for match in _SCAN.finditer(text):
        group = match.lastgroup
        if group == "open":
            depth += 1
            if depth > MAX_NESTING:
                at, column = position(match.start())
                raise RecipeErrors([Diagnostic("E014", f"blocks, lists and calls nest more than {MAX_NESTING} deep here",
                                               Span(path, at, column, at, column + 1),
                                               "flatten the recipe: no recipe needs this depth")])
        elif group == "close":
            depth = max(0, depth - 1)
        elif group == "comment":
            at, column = position(match.start())
            found.append(ast.Comment(match.group("comment").rstrip(), at, column, at))
    return found


