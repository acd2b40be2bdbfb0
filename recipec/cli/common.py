"""What the commands share: compiling with diagnostics printed the way `check` prints them."""

from __future__ import annotations

import argparse
import json
import re
import sys

from recipec.compiler import Compiled, compile_file
from recipec.diagnostics import printable, render_all

EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2


def add_root_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", metavar="DIR",
                        help="the folder included files (extends, prompts, taxonomies) must lie in "
                             "(default $RECIPEC_ROOT, else the recipe's git repository, else its folder)")


def print_diagnostics(result: Compiled, *, stream=None, warnings: bool = True) -> None:
    stream = stream or sys.stderr
    shown = [d for d in result.diagnostics if warnings or d.is_error]
    if shown:
        print(render_all(shown, result.sources), file=stream)


def compile_reporting(path: str, root: str | None = None) -> Compiled:
    """Compile `path`; print its diagnostics to stderr."""
    result = compile_file(path, root=root)
    print_diagnostics(result)
    return result


def failure_code(result: Compiled) -> int:
    """2 when the input itself could not be read, 1 for problems in the recipe."""
    return EXIT_ERROR if result.unreadable else EXIT_PROBLEMS


def say(text: str, *, stream=None) -> None:
    """One line for a terminal, with anything that could drive it escaped."""
    print(printable(text), file=stream or sys.stderr)


# JSON escapes C0 controls itself; these pass through it raw and would still reach a terminal
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u200e\u200f\u202a-\u202e\u2028\u2029\u2066-\u2069\ufeff\ud800-\udfff]")


def json_text(data, *, indent: int | None = 2) -> str:
    """JSON for stdout: UTF-8 kept readable, terminal controls escaped, never NaN or Infinity."""
    text = json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
