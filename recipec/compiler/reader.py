"""Reading one block against the keys it allows: unknown and repeated keys, typed values, spans."""

from __future__ import annotations

import difflib
from typing import Any, Callable

from recipec.compiler.values import ValueProblem
from recipec.diagnostics import Diagnostic, Span, did_you_mean
from recipec.syntax import ast

MISSING: Any = object()


class Context:
    """Diagnostics collected over one compilation."""

    def __init__(self) -> None:
        self.diagnostics: list[Diagnostic] = []

    def error(self, code: str, message: str, span: Span | None, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(code, message, span, hint))

    def warning(self, code: str, message: str, span: Span | None, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(code, message, span, hint, severity="warning"))

    @property
    def failed(self) -> bool:
        return any(d.is_error for d in self.diagnostics)


class Reader:
    """The attributes, nested blocks and rules of one block, checked against what the block allows."""

    def __init__(self, ctx: Context, block: ast.Block | None, *, keys: set[str], blocks: set[str] = frozenset(),
                 rules: bool = False, what: str | None = None, items: tuple[ast.Item, ...] | None = None,
                 span: Span | None = None):
        self.ctx = ctx
        self.block = block
        self.what = what or (f"`{block.kind}`" if block else "this block")
        self.span = span or (block.kind_span if block else None)
        self.attributes: dict[str, ast.Attribute] = {}
        self.blocks: list[ast.Block] = []
        self.rules: list[ast.Rule] = []
        self.unknown: list[str] = []  # keys reported as unknown: a missing key may be one of them misspelt
        for item in (items if items is not None else (block.items if block else ())):
            if isinstance(item, ast.Attribute):
                if item.key not in keys:
                    self.unknown.append(item.key)
                    ctx.error("E102", f"unknown key `{item.key}` in {self.what}", item.key_span,
                              did_you_mean(item.key, keys))
                elif item.key in self.attributes:
                    ctx.error("E104", f"`{item.key}` is set twice in {self.what}", item.key_span,
                              f"first set at line {self.attributes[item.key].span.line}")
                else:
                    self.attributes[item.key] = item
            elif isinstance(item, ast.Block):
                if item.kind not in blocks:
                    hint = did_you_mean(item.kind, blocks) if blocks else f"{self.what} has no nested blocks"
                    if item.kind in keys:
                        hint = f"`{item.kind}` is a key: write `{item.kind} = ...`"
                    ctx.error("E101", f"unexpected block `{item.kind}` in {self.what}", item.kind_span, hint)
                else:
                    self.blocks.append(item)
            elif isinstance(item, ast.Rule):
                if not rules:
                    ctx.error("E101", f"`{item.verb}` rules are not allowed in {self.what}", item.span,
                              "keep/drop rules belong in `filter` and `synthesize` blocks")
                else:
                    self.rules.append(item)
            elif isinstance(item, ast.Removal):
                ctx.error("E403", f"nothing named `{'.'.join(item.path)}` to remove", item.span,
                          "`remove` drops a part inherited through `extends`")

    def has(self, key: str) -> bool:
        return key in self.attributes

    def node(self, key: str) -> ast.Attribute | None:
        return self.attributes.get(key)

    def key_span(self, key: str) -> Span | None:
        attribute = self.attributes.get(key)
        return attribute.key_span if attribute else self.span

    def value_span(self, key: str) -> Span | None:
        attribute = self.attributes.get(key)
        return attribute.value.span if attribute else self.span

    def get(self, key: str, convert: Callable[[ast.Value], Any], default: Any = MISSING) -> Any:
        """The converted value of `key`; a missing required key or a bad value is reported once."""
        attribute = self.attributes.get(key)
        if attribute is None:
            if default is MISSING:
                if not difflib.get_close_matches(key, self.unknown, n=1, cutoff=0.6):
                    self.ctx.error("E106", f"{self.what} needs `{key}`", self.span, f"add `{key} = ...`")
                # else: the misspelt key was reported, with "did you mean"
                return None
            return default
        try:
            return convert(attribute.value)
        except ValueProblem as problem:
            self.ctx.error(problem.code, f"`{key}`: {problem.message}", attribute.value.span, problem.hint)
            return None if default is MISSING else default

    def nested(self, kind: str) -> list[ast.Block]:
        return [b for b in self.blocks if b.kind == kind]
