"""The recipe's syntax tree: what was written, with source spans, and nothing interpreted yet.

Spans are excluded from equality, so two trees compare equal when they say the same thing however
they were laid out (this is how `fmt` proves it changed nothing but layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from recipec.diagnostics import Span

NO_SPAN = Span("<none>", 0, 0, 0, 0)


def _span() -> Span:
    return field(default=NO_SPAN, compare=False, repr=False)  # type: ignore[return-value]


# ---- values -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class String:
    value: str
    long: bool = False  # written as """...""" (kept by the formatter)
    span: Span = _span()


@dataclass(frozen=True)
class Number:
    text: str  # as written: `10M`, `1e-5`, `5%`; units are the compiler's business
    span: Span = _span()


@dataclass(frozen=True)
class Dims:
    first: int
    second: int
    span: Span = _span()

    @property
    def text(self) -> str:
        return f"{self.first}x{self.second}"


@dataclass(frozen=True)
class Name:
    name: str
    span: Span = _span()


@dataclass(frozen=True)
class ListValue:
    items: tuple["Value", ...]
    span: Span = _span()


@dataclass(frozen=True)
class Call:
    """A constructor such as `file("x.yaml")`, `part(1, 3)` or `random(500K)`; never code."""

    name: str
    args: tuple["Value", ...]
    span: Span = _span()


Value = Union[String, Number, Dims, Name, ListValue, Call]


# ---- items --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attribute:
    key: str
    value: Value
    span: Span = _span()
    key_span: Span = _span()


@dataclass(frozen=True)
class Block:
    kind: str
    labels: tuple[str, ...]
    items: tuple["Item", ...]
    quoted: tuple[bool, ...] = ()  # which labels were written as strings
    span: Span = _span()
    kind_span: Span = _span()
    label_spans: tuple[Span, ...] = field(default=(), compare=False, repr=False)
    end_span: Span = _span()  # the closing brace

    @property
    def name(self) -> str | None:
        return self.labels[0] if self.labels else None


@dataclass(frozen=True)
class Rule:
    """`keep score >= 8` or `drop loss top 5% { ... }`."""

    verb: str  # "keep" | "drop"
    field: str
    op: str  # ">=", "<=", ">", "<", "==", "!=", "top", "bottom"
    value: Value
    body: tuple["Item", ...] | None = None
    span: Span = _span()
    field_span: Span = _span()


@dataclass(frozen=True)
class Removal:
    """`remove source.synthetic`: drops an inherited part in a derived recipe."""

    path: tuple[str, ...]
    span: Span = _span()


Item = Union[Attribute, Block, Rule, Removal]


@dataclass(frozen=True)
class Comment:
    text: str
    line: int
    column: int
    end_line: int


@dataclass(frozen=True)
class Document:
    path: str
    items: tuple[Item, ...]
    comments: tuple[Comment, ...] = field(default=(), compare=False)
    text: str = field(default="", compare=False, repr=False)
