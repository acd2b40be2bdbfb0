"""`recipec lock FILE`: write FILE.lock, every source, model and included file pinned by digest.

    recipec lock FILE... [--store DIR] [--check]

--store  the store whose file-digest cache saves re-reading unchanged files, and where the image
         lists are kept so `run --locked` can name a changed image (default as `recipec run`)
--check  write nothing; exit 1 when a lock is missing or out of date, naming what drifted

See recipec/lockfile.py for what the lock holds. Exit codes: 0 written (or up to date); 1 with
--check, a lock out of date; 2 a recipe with errors or an unreadable input.
"""

from __future__ import annotations

import argparse
import os

from recipec.cli.common import add_root_option, compile_reporting, say

EXIT_OK, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--store", metavar="DIR", help="the step store (default $RECIPEC_STORE, else .recipec/store)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a lock is out of date")
    add_root_option(parser)


def open_store(path: str | None):
    from recipec.cli.run import DEFAULT_STORE
    from recipec.runtime.store import Store

    return Store(path or os.environ.get("RECIPEC_STORE") or DEFAULT_STORE)


def run(args: argparse.Namespace) -> int:
    from recipec.lockfile import drift, lock_path, write_lock

    store = open_store(args.store)
    status = EXIT_OK
    for file in args.files:
        compiled = compile_reporting(file, args.root)
        if not compiled.ok:
            return EXIT_ERROR
        try:
            if args.check:
                problems = drift(compiled.recipe, file, compiled.chain, store)
                for line in problems:
                    say(f"{lock_path(file)}: {line}")
                if problems:
                    status = max(status, EXIT_DRIFT)
                else:
                    print(f"{lock_path(file)}: up to date")
                continue
            path, changed = write_lock(compiled.recipe, file, compiled.chain, store)
        except OSError as e:
            say(f"recipec lock: {e.strerror or e}: {e.filename}" if e.filename else f"recipec lock: {e}")
            return EXIT_ERROR
        print(f"{path}: {'written' if changed else 'unchanged'}")
    return status
