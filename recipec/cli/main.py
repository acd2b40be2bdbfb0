"""`recipec`: one subcommand per module in this package, each with `register(parser)` and `run(args)`.

Exit codes: 0 success (or no difference), 1 problems found (or a difference), 2 usage or input error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "check": ("recipec.cli.check", "check recipes and report every problem"),
    "fmt": ("recipec.cli.fmt", "format recipes canonically"),
    "plan": ("recipec.cli.plan", "show the steps and the per-stage composition"),
    "diff": ("recipec.cli.diff", "compare two recipes by meaning"),
    "run": ("recipec.cli.run", "run the plan: what is not cached, resumably"),
    "train": ("recipec.cli.train", "write the launch script of a training stage (torchrun, Slurm)"),
    "why": ("recipec.cli.why", "trace one record of a run: its origin, the steps that touched it, its fate"),
    "lock": ("recipec.cli.lock", "pin every source, model and included file of a recipe by digest"),
    "package": ("recipec.cli.package", "gather a finished run's open-science package (Model Openness Framework)"),
}

EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported, so start-up stays fast."""
    from recipec import __version__

    parser = argparse.ArgumentParser(prog="recipec", description="The data strategy of a vision-language model, as one recipe.")
    parser.add_argument("--version", action="version", version=f"recipec {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.register(sub)
            sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("recipec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
