"""Diagnostics shared by every phase: a source span, a coded message with a hint, and rendering.

A diagnostic is data; rendering it as `path:line:col: error[CODE]: message` with the source line and a
caret is a separate function, so the CLI, the tests and other tools can each use what they need.
"""

from __future__ import annotations

import difflib
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
    """The text of every file a compilation read, so diagnostics can quote their lines."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, path: str, text: str) -> None:
        self.texts[path] = text

    def line(self, path: str, line: int) -> str | None:
        text = self.texts.get(path)
        if text is None:
            return None
        lines = text.splitlines()
        return lines[line - 1] if 0 < line <= len(lines) else None


def render(diagnostic: Diagnostic, sources: Sources | None = None) -> str:
    """`path:line:col: error[CODE]: message`, then the source line with a caret, then the hint."""
    out = [diagnostic.header()]
    span = diagnostic.span
    source_line = sources.line(span.path, span.line) if (sources and span) else None
    if span and source_line is not None:
        number = str(span.line)
        pad = " " * len(number)
        width = 1
        if span.end_line == span.line and span.end_column > span.column:
            width = span.end_column - span.column
        width = max(1, min(width, len(source_line) - span.column + 1 if len(source_line) >= span.column else 1))
        prefix = source_line[: span.column - 1]
        # keep tabs so the caret lines up under the same characters
        caret_pad = "".join("\t" if ch == "\t" else " " for ch in prefix)
        out.append(f"{pad} |")
        out.append(f"{number} | {source_line}")
        out.append(f"{pad} | {caret_pad}{'^' * width}")
    if diagnostic.hint:
        out.append(f"  = hint: {diagnostic.hint}")
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
