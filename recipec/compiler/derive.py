"""Loading a recipe file and everything it derives from, merged into one syntax tree.

A derived recipe names its base in its header (`recipe "x" { extends = "base.recipe" }`) and then
overrides, adds or removes parts: a block with the same kind and name merges into the inherited one
(key by key, recursively), an attribute replaces the inherited value, a rule replaces the inherited
rule on the same field, and `remove kind.name` drops an inherited part.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from recipec.compiler.files import Includes, IncludeError, include_root
from recipec.diagnostics import Diagnostic, RecipeErrors, Sources, did_you_mean, printable
from recipec.syntax import ast
from recipec.syntax.parser import parse

MAX_DEPTH = 16
RECIPE_SUFFIX = ".recipe"
BOM = "\ufeff"


def identity(item: ast.Item) -> tuple:
    if isinstance(item, ast.Attribute):
        return ("attribute", item.key)
    if isinstance(item, ast.Block):
        # the header is one block whatever each recipe in the chain calls itself
        return ("block", item.kind, None if item.kind == "recipe" else item.name)
    if isinstance(item, ast.Rule):
        return ("rule", item.verb, item.field)
    return ("removal", item.path)


def _matches(item: ast.Item, path: tuple[str, ...]) -> bool:
    if len(path) == 1:
        (head,) = path
        if isinstance(item, ast.Attribute):
            return item.key == head
        if isinstance(item, ast.Block):
            return item.kind == head and not item.labels
        if isinstance(item, ast.Rule):
            return item.field == head
        return False
    if len(path) == 2:
        kind, label = path
        if isinstance(item, ast.Block):
            return item.kind == kind and item.name == label
        if isinstance(item, ast.Rule):
            return item.verb == kind and item.field == label
    return False


def merge_items(base: tuple[ast.Item, ...], derived: tuple[ast.Item, ...],
                problems: list[Diagnostic]) -> tuple[ast.Item, ...]:
    """The base's items with the derived ones merged in; linear in their numbers (an index by identity)."""
    merged: list[ast.Item | None] = list(base)
    where: dict[tuple, int] = {}
    for index, existing in enumerate(merged):
        where.setdefault(identity(existing), index)
    for item in derived:
        if isinstance(item, ast.Removal):
            hits = [i for i, existing in enumerate(merged) if existing is not None and _matches(existing, item.path)]
            if not hits:
                inherited = sorted({".".join(str(p) for p in identity(m)[1:] if p) for m in merged if m is not None})
                problems.append(Diagnostic("E403", f"nothing named `{'.'.join(item.path)}` to remove", item.span,
                                           did_you_mean(".".join(item.path), inherited)))
                continue
            for index in hits:
                key = identity(merged[index])
                merged[index] = None  # removed; positions of the others stay valid
                if where.get(key) == index:
                    del where[key]
            continue
        key = identity(item)
        position = where.get(key)
        if position is None:
            where[key] = len(merged)
            merged.append(item)
            continue
        existing = merged[position]
        if isinstance(item, ast.Block) and isinstance(existing, ast.Block):
            merged[position] = replace(item, items=merge_items(existing.items, item.items, problems))
        else:
            merged[position] = item
    return tuple(m for m in merged if m is not None)


def _header(document: ast.Document) -> ast.Block | None:
    return next((i for i in document.items if isinstance(i, ast.Block) and i.kind == "recipe"), None)


def _extends(header: ast.Block | None) -> ast.Attribute | None:
    if header is None:
        return None
    return next((i for i in header.items if isinstance(i, ast.Attribute) and i.key == "extends"), None)


class UnreadableInput(RecipeErrors):
    """The recipe named on the command line cannot be read (an input error, not a recipe problem)."""


def load(path: str | Path, sources: Sources | None = None, *, text: str | None = None,
         includes: Includes | None = None) -> tuple[ast.Document, Sources, list[str]]:
    """Parse `path` and the recipes it derives from; return the merged tree, the texts read and the chain.

    `includes` says where included recipes may lie and how they are read (`recipec diff` reads a git
    revision's files through it). Raises UnreadableInput when `path` itself cannot be read, and
    RecipeErrors for unreadable bases, syntax errors, derivation cycles and bad removals.
    """
    includes = includes or Includes(include_root(path))
    sources = sources or Sources()
    chain: list[str] = []
    documents: list[ast.Document] = []
    current = Path(path)
    current_text = text
    via: ast.Attribute | None = None
    while True:
        shown = str(current)
        if len(chain) >= MAX_DEPTH:
            raise RecipeErrors([Diagnostic("E401", f"derivation is deeper than {MAX_DEPTH} recipes", via.value.span if via else None)])
        try:
            resolved = str(current.resolve()) if current_text is None else shown
        except (OSError, RuntimeError, ValueError):
            resolved = shown
        if resolved in chain:
            cycle = " -> ".join([*(Path(c).name for c in chain), Path(resolved).name])
            raise RecipeErrors([Diagnostic("E401", f"derivation cycle: {cycle}", via.value.span if via else None,
                                           "a recipe cannot extend itself, directly or through others")])
        try:
            body = current_text if current_text is not None else includes.read(current, confined=via is not None)
        except IncludeError as error:
            if via is None:
                raise UnreadableInput([Diagnostic("E402", f"cannot read recipe `{printable(shown)}`: {error.reason}", None,
                                                  error.hint)]) from None
            raise RecipeErrors([Diagnostic("E402", f"cannot read recipe `{printable(via.value.value)}`: {error.reason}",
                                           via.value.span, error.hint)]) from None
        if body.startswith(BOM):
            body = body[1:]
        quote = shown.endswith(RECIPE_SUFFIX) or current_text is not None
        sources.add(shown, body, quote=quote)
        try:
            document = parse(body, shown)
        except RecipeErrors as errors:
            if quote:
                raise
            # what is not a recipe may be anything: say where it fails, quote nothing of it
            first = errors.diagnostics[0]
            raise RecipeErrors([Diagnostic(first.code, f"`{printable(shown)}` is not a recipe (a syntax error here)",
                                           first.span, f"recipe files end in `{RECIPE_SUFFIX}`")]) from None
        chain.append(resolved)
        documents.append(document)
        extends = _extends(_header(document))
        if extends is None:
            break
        if not isinstance(extends.value, ast.String):
            raise RecipeErrors([Diagnostic("E201", "`extends` takes the base recipe's path as a string",
                                           extends.value.span, 'write `extends = "base.recipe"`')])
        if not extends.value.value.endswith(RECIPE_SUFFIX):
            raise RecipeErrors([Diagnostic("E402", f"`extends` names a recipe, and `{printable(extends.value.value)}` "
                                           f"does not end in `{RECIPE_SUFFIX}`", extends.value.span,
                                           'write `extends = "base.recipe"`')])
        via = extends
        current = Path(os.path.normpath(Path(shown).parent / extends.value.value))
        current_text = None

    problems: list[Diagnostic] = []
    merged = documents[-1].items
    for document in reversed(documents[:-1]):
        merged = merge_items(merged, document.items, problems)
    if problems:
        raise RecipeErrors(problems)
    top = documents[0]
    return ast.Document(top.path, merged, top.comments, top.text), sources, chain
