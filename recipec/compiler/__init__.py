"""Recipe text -> IR. `compile_file` is the one entry point: derivation, lowering and checks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from recipec import ir
from recipec.compiler.derive import UnreadableInput, load
from recipec.compiler.files import Includes, include_root
from recipec.compiler.lower import Lowering
from recipec.compiler.reader import Context
from recipec.diagnostics import Diagnostic, RecipeErrors, Sources
from recipec.syntax.parser import collector_paused


@dataclass
class Compiled:
    path: str
    recipe: ir.Recipe | None
    diagnostics: list[Diagnostic] = field(default_factory=list)
    sources: Sources = field(default_factory=Sources)
    chain: list[str] = field(default_factory=list)  # the recipe files read, derived first
    unreadable: bool = False  # the file itself could not be read: an input error, not a recipe problem

    @property
    def ok(self) -> bool:
        return self.recipe is not None and not any(d.is_error for d in self.diagnostics)


def compile_file(path: str | Path, *, text: str | None = None, read: Callable[[Path], str] | None = None,
                 root: str | Path | None = None) -> Compiled:
    """Compile one recipe; problems come back as diagnostics, never as exceptions.

    `read(path)` replaces reading from disk for the recipe, the recipes it extends and the files it
    includes, so a recipe can be compiled as it was in a git revision. Included files must lie in
    `root` (default: the recipe's repository, else its directory; see `recipec.compiler.files`).
    """
    with collector_paused():  # see there: lowering a large recipe builds as many objects as parsing it
        return _compile(str(path), text, read, root)


def _compile(path: str, text: str | None, read: Callable[[Path], str] | None, root: str | Path | None) -> Compiled:
    sources = Sources()
    includes = Includes(include_root(path, root), read)
    try:
        document, sources, chain = load(path, sources, text=text, includes=includes)
    except UnreadableInput as errors:
        return Compiled(path, None, errors.diagnostics, sources, unreadable=True)
    except RecipeErrors as errors:
        return Compiled(path, None, errors.diagnostics, sources)
    ctx = Context()
    base = os.path.dirname(path) or "."
    recipe = Lowering(document, ctx, Path(base), includes=includes).lower()
    diagnostics = sorted(ctx.diagnostics, key=lambda d: (d.span is None, d.span or "", d.code))
    return Compiled(path, recipe, diagnostics, sources, chain)


def compile_or_raise(path: str | Path) -> ir.Recipe:
    result = compile_file(path)
    if not result.ok:
        raise RecipeErrors([d for d in result.diagnostics if d.is_error])
    return result.recipe
