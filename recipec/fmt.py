"""The canonical layout of a recipe: two-space indents, one item per line, comments kept.

`format_text` prints the syntax tree again and then proves it changed nothing but layout: the output
parses to an equal tree (spans are not compared) and formatting the output once more gives the same
text. Comments are never dropped: own-line comments stay before the item that follows them, end-of-
line comments stay on the line of the item they follow.
"""

from __future__ import annotations

import json
import re

from recipec.diagnostics import Diagnostic, RecipeErrors
from recipec.syntax import ast
from recipec.syntax.parser import parse

INDENT = "  "
MAX_WIDTH = 100
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")
_KEYWORDS = {"keep", "drop", "remove"}


class FormatError(RecipeErrors):
    """Formatting would change the recipe's meaning or is unstable: a bug, reported instead of written."""


def value_text(value: ast.Value, indent: str = "") -> str:
    if isinstance(value, ast.String):
        return f'"""{value.value}"""' if value.long else json.dumps(value.value, ensure_ascii=False)
    if isinstance(value, ast.Number):
        return value.text
    if isinstance(value, ast.Dims):
        return value.text
    if isinstance(value, ast.Name):
        return value.name
    if isinstance(value, ast.Call):
        return f"{value.name}({', '.join(value_text(a, indent) for a in value.args)})"
    if isinstance(value, ast.ListValue):
        flat = f"[{', '.join(value_text(i, indent) for i in value.items)}]"
        if len(indent) + len(flat) <= MAX_WIDTH or not value.items:
            return flat
        inner = indent + INDENT
        lines = [f"{inner}{value_text(i, inner)}," for i in value.items]
        return "[\n" + "\n".join(lines) + f"\n{indent}]"
    raise TypeError(value)


def _label(text: str, quoted: bool) -> str:
    if quoted or not _IDENT.match(text) or text in _KEYWORDS:
        return json.dumps(text, ensure_ascii=False)
    return text


class _Printer:
    def __init__(self, document: ast.Document):
        self.comments = sorted(document.comments, key=lambda c: (c.line, c.column))
        self.next_comment = 0
        self.lines: list[str] = []
        source_lines = document.text.splitlines()
        # an own-line comment is the first thing on its line; others follow code
        self.own_line = {
            (c.line, c.column) for c in self.comments
            if c.line - 1 < len(source_lines) and not source_lines[c.line - 1][: c.column - 1].strip()
        }
        self.blank = {i + 1 for i, line in enumerate(source_lines) if not line.strip()}
        self.defer = False

    # comments --------------------------------------------------------------------------------

    def _pending(self) -> ast.Comment | None:
        return self.comments[self.next_comment] if self.next_comment < len(self.comments) else None

    def leading(self, before_line: int, indent: str) -> None:
        """Own-line comments that come before `before_line`, with the blank lines between them."""
        while (c := self._pending()) and c.line < before_line:
            if self.lines and self.lines[-1] != "" and self._blank_before(c.line) and not self.lines[-1].endswith("{"):
                self.lines.append("")
            self.lines.append(f"{indent}{c.text}")
            self.next_comment += 1
            if self._blank_before(before_line) and self._pending_line() >= before_line:
                self.lines.append("")

    def _pending_line(self) -> int:
        c = self._pending()
        return c.line if c else 10**9

    def trailing(self, through_line: int, indent: str) -> None:
        """Comments up to `through_line`: the first on the current line, any others under it."""
        if self.defer:
            self.defer = False
            return
        first = True
        while (c := self._pending()) and c.line <= through_line:
            if first and (c.line, c.column) not in self.own_line:
                self.lines[-1] += f"  {c.text}"
            else:
                self.lines.append(f"{indent}{c.text}")
            first = False
            self.next_comment += 1

    def _blank_before(self, line: int) -> bool:
        return (line - 1) in self.blank

    def _first_line(self, item: ast.Item) -> int:
        """The line where an item's leading comments start (so blank lines are judged before them)."""
        line = item.span.line
        index = self.next_comment
        first = line
        while index < len(self.comments) and self.comments[index].line < line:
            first = min(first, self.comments[index].line)
            index += 1
        return first

    # items -----------------------------------------------------------------------------------

    def items(self, items: tuple[ast.Item, ...], indent: str, top: bool = False, parent_end: int = 0) -> None:
        previous: ast.Item | None = None
        for index, item in enumerate(items):
            # an end-of-line comment belongs to the last thing ending on its line: the next item when it
            # starts on this line, or the enclosing block when its brace closes on it
            following = items[index + 1].span.line if index + 1 < len(items) else parent_end
            self.defer = following == item.span.end_line
            if previous is not None:
                separate = self._blank_before(self._first_line(item))
                if top and (isinstance(item, ast.Block) or isinstance(previous, ast.Block)):
                    separate = True
                if separate:
                    self.lines.append("")
            self.leading(item.span.line, indent)
            self.item(item, indent)
            previous = item
        self.defer = False

    def item(self, item: ast.Item, indent: str) -> None:
        if isinstance(item, ast.Attribute):
            self.lines.append(f"{indent}{item.key} = {value_text(item.value, indent)}")
            self.trailing(item.span.end_line, indent)
        elif isinstance(item, ast.Removal):
            self.lines.append(f"{indent}remove {'.'.join(item.path)}")
            self.trailing(item.span.end_line, indent)
        elif isinstance(item, ast.Rule):
            head = f"{indent}{item.verb} {item.field} {item.op} {value_text(item.value, indent)}"
            if item.body is None:
                self.lines.append(head)
                self.trailing(item.span.end_line, indent)
            else:
                self.body(head, item.body, item.span, indent)
        elif isinstance(item, ast.Block):
            labels = "".join(f" {_label(t, q)}" for t, q in zip(item.labels, item.quoted or (False,) * len(item.labels)))
            self.body(f"{indent}{item.kind}{labels}", item.items, item.span, indent)

    def body(self, head: str, items: tuple[ast.Item, ...], span, indent: str) -> None:
        inner = indent + INDENT
        if not items and not self._comments_within(span):
            self.lines.append(f"{head} {{}}")
            self.trailing(span.end_line, indent)
            return
        self.lines.append(f"{head} {{")
        first_line = items[0].span.line if items else span.end_line
        # an end-of-line comment right after `{` belongs to the header
        if (c := self._pending()) and c.line == span.line and c.line < first_line and (c.line, c.column) not in self.own_line:
            self.lines[-1] += f"  {c.text}"
            self.next_comment += 1
        defer = self.defer
        self.items(items, inner, parent_end=span.end_line)
        self.defer = False
        self.leading(span.end_line, inner)  # comments left before the closing brace
        self.lines.append(f"{indent}}}")
        self.defer = defer
        self.trailing(span.end_line, indent)

    def _comments_within(self, span) -> bool:
        c = self._pending()
        return bool(c and (span.line, span.column) <= (c.line, c.column) < (span.end_line, span.end_column))

    def document(self, document: ast.Document) -> str:
        self.items(document.items, "", top=True)
        if self._pending():
            if self.lines and self._blank_before(self._pending().line):
                self.lines.append("")
            self.leading(10**9, "")
        text = "\n".join(self.lines).rstrip("\n")
        return text + "\n" if text else ""


def format_document(document: ast.Document) -> str:
    return _Printer(document).document(document)


def format_text(text: str, path: str = "<recipe>") -> str:
    """The canonical form of `text`; raises RecipeErrors for a recipe that does not parse."""
    document = parse(text, path)
    output = format_document(document)
    # prove it: same tree, same comments, and stable under a second pass
    again = parse(output, path)
    if again != document or [c.text for c in again.comments] != [c.text for c in document.comments]:
        raise FormatError([Diagnostic("E901", "formatting would change this recipe's meaning (a recipec bug)", None,
                                      "please report it with the recipe")])
    if format_document(again) != output:
        raise FormatError([Diagnostic("E902", "formatting is not stable for this recipe (a recipec bug)", None,
                                      "please report it with the recipe")])
    return output
