"""`recipec fmt FILE... [--check]`: rewrite recipes in their canonical layout (comments kept)."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile

from recipec.cli.common import print_diagnostics
from recipec.compiler import Compiled
from recipec.diagnostics import Diagnostic, RecipeErrors, Sources
from recipec.fmt import format_text


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file would change")
    parser.add_argument("--diff", action="store_true", help="with --check, show what would change")


def _write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".recipec-fmt-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.chmod(temporary, os.stat(path).st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def run(args: argparse.Namespace) -> int:
    changed = errors = 0
    for path in args.files:
        sources = Sources()
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as error:
            reason = "is not UTF-8 text" if isinstance(error, UnicodeDecodeError) else (error.strerror or str(error)).lower()
            print_diagnostics(Compiled(path, None, [Diagnostic("E402", f"cannot read `{path}`: {reason}", None)], sources))
            errors += 1
            continue
        sources.add(path, text)
        try:
            formatted = format_text(text, path)
        except RecipeErrors as failure:
            print_diagnostics(Compiled(path, None, failure.diagnostics, sources))
            errors += 1
            continue
        if formatted == text:
            continue
        changed += 1
        if args.check:
            print(f"would reformat {path}", file=sys.stderr)
            if args.diff:
                sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), formatted.splitlines(True), path, path))
        else:
            _write_atomically(path, formatted)
            print(f"reformatted {path}", file=sys.stderr)
    if errors:
        return 2
    return 1 if (args.check and changed) else 0
