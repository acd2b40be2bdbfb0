"""Diagnostics shared by every phase: a source span, a coded message with a hint, and rendering.

A diagnostic is data; rendering it as `path:line:col: error[CODE]: message` with the source line and a
caret is a separate function, so the CLI, the tests and other tools can each use what they need.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass(frozen=True, order=True)
class Span:
    """A region of a source file; lines and columns count from 1, the end column is exclusive."""

    path: str
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Diagnostic:
    code: str
    message: str
    span: Span | None
    hint: str | None = None
    severity: str = "error"  # "error" | "warning"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def header(self) -> str:
        where = f"{self.span}: " if self.span else ""
        return f"{where}{self.severity}[{self.code}]: {self.message}"


class RecipecError(Exception):
    """Root of every error recipec reports to a user."""


class RecipeErrors(RecipecError):
    """One or more diagnostics that stop a phase; raised once with all of them."""

    def __init__(self, diagnostics: Sequence[Diagnostic]):
        self.diagnostics = list(diagnostics)
        first = self.diagnostics[0].header() if self.diagnostics else "no diagnostics"
        more = len(self.diagnostics) - 1
        super().__init__(first + (f" ... and {more} more" if more > 0 else ""))


@dataclass
class Sources:
    """The text of every file a compilation read, so diagnostics can quote their lines.

    A file added with `quote=False` (one that is not a recipe) is never quoted: a diagnostic about it
    shows where, not what.
    """

    texts: dict[str, str] = field(default_factory=dict)
    opaque: set[str] = field(default_factory=set)
    # each file's lines, split once: splitting per diagnostic made many of them on a large file quadratic
    _lines: dict[str, list[str]] = field(default_factory=dict, compare=False, repr=False)

    def add(self, path: str, text: str, *, quote: bool = True) -> None:
        self.texts[path] = text
        self._lines.pop(path, None)
        if quote:
            self.opaque.discard(path)
        else:
            self.opaque.add(path)

    def line(self, path: str, line: int) -> str | None:
        text = self.texts.get(path)
        if text is None or path in self.opaque:
            return None
        lines = self._lines.get(path)
        if lines is None:
            lines = self._lines[path] = text.splitlines()
        return lines[line - 1] if 0 < line <= len(lines) else None


# C0 and C1 controls, DEL, bidirectional overrides and isolates, line separators, lone surrogates:
# what could move a terminal's cursor, recolour it or reorder what a reader sees
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2028\u2029"
                          "\u2066-\u2069\ufeff\ud800-\udfff]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, newlines: bool = False) -> str:
    """`text` with every character that could drive a terminal shown as an escape (`\\x1b`).

    With `newlines`, line breaks are kept (for text of several lines) and everything else is escaped.
    """
    if newlines:
        return "\n".join(_UNPRINTABLE.sub(_escape, line) for line in text.split("\n"))
    return _UNPRINTABLE.sub(_escape, text)


WINDOW = 80  # characters of a long source line shown on each side of the caret


def _window(line: str, column: int, width: int) -> tuple[str, int, int]:
    """A long line cut to a window around [column, column + width): (text, column, width) in it."""
    if len(line) <= 2 * WINDOW + width:
        return line, column, width
    width = min(width, WINDOW)
    start = max(0, column - 1 - WINDOW)
    end = min(len(line), column - 1 + width + WINDOW)
    head = "..." if start > 0 else ""
    tail = "..." if end < len(line) else ""
    return head + line[start:end] + tail, column - start + len(head), width


def render(diagnostic: Diagnostic, sources: Sources | None = None) -> str:
    """`path:line:col: error[CODE]: message`, then the source line with a caret, then the hint.

    Everything printed is passed through `printable`, and a long line is cut to a window.
    """
    out = [printable(diagnostic.header())]
    span = diagnostic.span
    source_line = sources.line(span.path, span.line) if (sources and span) else None
    if span and source_line is not None:
        number = str(span.line)
        pad = " " * len(number)
        width = 1
        if span.end_line == span.line and span.end_column > span.column:
            width = span.end_column - span.column
        width = max(1, min(width, len(source_line) - span.column + 1 if len(source_line) >= span.column else 1))
        shown, column, width = _window(source_line, span.column, width)
        prefix = printable(shown[: column - 1])
        marked = printable(shown[column - 1: column - 1 + width])
        # keep tabs so the caret lines up under the same characters
        caret_pad = "".join("\t" if ch == "\t" else " " for ch in prefix)
        out.append(f"{pad} |")
        out.append(f"{number} | {printable(shown)}")
        out.append(f"{pad} | {caret_pad}{'^' * max(1, len(marked))}")
    if diagnostic.hint:
        out.append(f"  = hint: {printable(diagnostic.hint)}")
    return "\n".join(out)


def render_all(diagnostics: Iterable[Diagnostic], sources: Sources | None = None) -> str:
    return "\n\n".join(render(d, sources) for d in diagnostics)


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """A hint naming the closest candidate, or None when nothing is close."""
    choices = sorted(set(candidates))
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if match:
        return f"did you mean `{match[0]}`?"
    if choices and len(choices) <= 12:
        return "expected one of: " + ", ".join(f"`{c}`" for c in choices)
    return None
