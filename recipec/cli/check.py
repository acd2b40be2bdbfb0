"""`recipec check FILE...`: every problem of every file, as `path:line:col: error[CODE]: message`."""

from __future__ import annotations

import argparse
import sys

from recipec.cli.common import compile_reporting


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when a file is clean")


def run(args: argparse.Namespace) -> int:
    failed = 0
    errors = warnings = 0
    for path in args.files:
        result = compile_reporting(path)
        errors += sum(d.is_error for d in result.diagnostics)
        warnings += sum(not d.is_error for d in result.diagnostics)
        if not result.ok:
            failed += 1
    if not args.quiet or failed:
        summary = f"{len(args.files)} file(s) checked: {errors} error(s), {warnings} warning(s)"
        print(summary, file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0
