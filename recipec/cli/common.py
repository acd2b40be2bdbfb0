"""What the commands share: compiling with diagnostics printed the way `check` prints them."""

from __future__ import annotations

import sys

from recipec.compiler import Compiled, compile_file
from recipec.diagnostics import render_all


def print_diagnostics(result: Compiled, *, stream=None, warnings: bool = True) -> None:
    stream = stream or sys.stderr
    shown = [d for d in result.diagnostics if warnings or d.is_error]
    if shown:
        print(render_all(shown, result.sources), file=stream)


def compile_reporting(path: str) -> Compiled:
    """Compile `path`; print its diagnostics to stderr."""
    result = compile_file(path)
    print_diagnostics(result)
    return result
