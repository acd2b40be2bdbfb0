"""`recipec why ID`: where one record came from, what touched it, and where it ended.

    recipec why ID [--out DIR] [--store DIR] [--json]

ID is recipec's id of a record (or a unique prefix of 8 characters or more), the data set's own id,
or an origin `file:line` as the rejects give it. The run is the one whose outputs are in --out
(default: the only folder under `out/` that holds a report.json); its store is the one report.json
names, or --store. The answer comes from the run's provenance index in the store (recipec/why.py),
built on the first question.

Exit codes: 0 found; 1 no record of the run matches ID; 2 no run or store to ask.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

# this command imports no compiler (pydantic, lark): an answer comes back fast


def say(text: str) -> None:
    from recipec.diagnostics import printable

    print(printable(text), file=sys.stderr)

EXIT_OK, EXIT_NOT_FOUND, EXIT_ERROR = 0, 1, 2


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", metavar="ID", help="recipec id (or a prefix), the data set's own id, or file:line")
    parser.add_argument("--out", metavar="DIR", help="the run's output folder (default: the only one under out/)")
    parser.add_argument("--store", metavar="DIR", help="the store the run used (default: the one report.json names)")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")


def find_out(out: str | None) -> Path | None:
    if out:
        return Path(out)
    candidates = sorted(p.parent for p in Path("out").glob("*/report.json"))
    return candidates[0] if len(candidates) == 1 else None


def run(args: argparse.Namespace) -> int:
    from recipec.runtime.store import Store
    from recipec.why import WhyError, ensure_index, explain, find, render_text

    out = find_out(args.out)
    if out is None:
        say("recipec why: which run? pass --out DIR (the folder with the run's report.json)")
        return EXIT_ERROR
    try:
        report = json.loads((out / "report.json").read_text("utf-8"))
    except (OSError, ValueError) as e:
        say(f"recipec why: cannot read {out / 'report.json'}: {e}")
        return EXIT_ERROR
    store_dir = args.store or (report.get("run") or {}).get("store")
    if not store_dir or not Path(store_dir).is_dir():
        say(f"recipec why: the run's store {store_dir!r} is not here; pass --store DIR")
        return EXIT_ERROR
    store = Store(store_dir)
    try:
        path = ensure_index(store, report)
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            hits = find(db, args.id)
            if not hits:
                say(f"recipec why: no record of run {report['recipe']!r} matches {args.id!r}")
                return EXIT_NOT_FOUND
            answers = [explain(store, db, hit) for hit in hits]
        finally:
            db.close()
    except (WhyError, OSError, sqlite3.Error) as e:
        say(f"recipec why: {e}")
        return EXIT_ERROR
    if args.json:
        text = json.dumps(answers[0] if len(answers) == 1 else answers, indent=2, ensure_ascii=True, allow_nan=False)
        print(text)
    else:
        if len(answers) > 1:
            print(f"{len(answers)} records match {args.id!r}:")
        from recipec.diagnostics import printable

        text = "\n\n".join(render_text(a) for a in answers)
        print("\n".join(printable(line) for line in text.split("\n")))
    return EXIT_OK
