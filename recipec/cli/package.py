"""`recipec package OUT DEST`: a finished run's open-science package (recipec/package.py).

    recipec package OUT DEST [--recipe FILE] [--store DIR] [--root DIR]

OUT is the run's output folder (its report.json names the recipe and the store; --recipe and
--store override them). DEST is written anew, and DEST.tar.gz beside it.

Exit codes: 0 written; 2 the run cannot be packaged (no report, a failed run, a recipe that is not
the one the run used).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recipec.cli.common import add_root_option, say


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="the run's output folder")
    parser.add_argument("dest", metavar="DEST", help="the package folder to write (replaced if it exists)")
    parser.add_argument("--recipe", metavar="FILE", help="the recipe the run used (default: the one report.json names)")
    parser.add_argument("--store", metavar="DIR", help="the run's store (default: the one report.json names)")
    add_root_option(parser)


def run(args: argparse.Namespace) -> int:
    from recipec.package import PackageError, build_package

    try:
        result = build_package(Path(args.out), Path(args.dest), recipe_file=args.recipe, store_dir=args.store,
                               root=args.root)
    except PackageError as e:
        say(f"recipec package: {e}")
        return 2
    except OSError as e:
        say(f"recipec package: {e.strerror or e}: {e.filename}" if e.filename else f"recipec package: {e}")
        return 2
    c = result["checklist"]
    print(f"{result['dest']} and {result['archive']}: MOF components {c['present']} present, {c['missing']} missing, "
          f"{c['not_applicable']} not applicable")
    for i in c["components"]:
        if i["license"] == "MISSING":
            say(f"  license missing: {i['component']}")
    return 0
