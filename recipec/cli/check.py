"""`recipec check FILE...`: every problem of every file, as `path:line:col: error[CODE]: message`.

Exit 0 when every file is clean, 1 when a recipe has problems, 2 when a file cannot be read.
"""

from __future__ import annotations

import argparse
import sys

from recipec.cli.common import EXIT_ERROR, EXIT_OK, EXIT_PROBLEMS, add_root_option, compile_reporting


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when a file is clean")
    add_root_option(parser)


def run(args: argparse.Namespace) -> int:
    failed = unreadable = 0
    errors = warnings = 0
    for path in args.files:
        result = compile_reporting(path, args.root)
        errors += sum(d.is_error for d in result.diagnostics)
        warnings += sum(not d.is_error for d in result.diagnostics)
        if not result.ok:
            failed += 1
        unreadable += result.unreadable
    if not args.quiet or failed:
        summary = f"{len(args.files)} file(s) checked: {errors} error(s), {warnings} warning(s)"
        print(summary, file=sys.stderr if failed else sys.stdout)
    if unreadable:
        return EXIT_ERROR
    return EXIT_PROBLEMS if failed else EXIT_OK
