"""`recipec diff`: two recipes compared by meaning, as files or as they were in git revisions.

    recipec diff A B                 A and B are paths or REV:PATH (`HEAD~1:recipes/x.recipe`, `:x` the index)
    recipec diff REV [PATH...]       each PATH as it was at REV against the working tree; without PATH,
                                     every recipe whose file, or whose base's file, changed since REV
    recipec diff --textconv FILE     the canonical form of FILE (a git `textconv` filter)
    recipec diff --git-external ...  git's GIT_EXTERNAL_DIFF arguments (a `diff.<driver>.command`)

Output: tables in a terminal, plain text when piped or with `--no-color`, `--json` (the keys are
documented in `recipec.diff`; REV mode prints a list, one object per recipe), `--markdown` for a pull
request. Exit 0 when equal, 1 when they differ, 2 on error, with a side that does not compile
reported exactly as `recipec check` reports it.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from recipec import ir
from recipec.cli.common import add_root_option, json_text, print_diagnostics, say
from recipec.diagnostics import printable
from recipec.compiler import compile_file
from recipec.compiler.files import IncludeError, read_bytes
from recipec.diff import ADDED, CHANGED, REMOVED, RENAMED, UNCHANGED, Change, RecipeDiff, Row, StageDiff, diff, empty_recipe

EXIT_EQUAL, EXIT_DIFFER, EXIT_ERROR = 0, 1, 2
NONE_LABEL = "/dev/null"  # the side of a recipe that does not exist there, as git names it
MARKERS = {ADDED: "+", REMOVED: "-", CHANGED: "~", RENAMED: "~", UNCHANGED: " "}
VALUE_WIDTH = 72


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sides", nargs="*", metavar="SIDE",
                        help="A B (paths or REV:PATH), or REV [PATH...] against the working tree")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON (keys documented in recipec.diff)")
    output.add_argument("--markdown", action="store_true", help="print Markdown for a pull-request comment")
    parser.add_argument("--no-color", action="store_true", help="plain text even in a terminal")
    parser.add_argument("--path", metavar="PATH",
                        help="compile file sides as if they were at PATH, for `extends` and included files "
                             "(difftool passes temporary copies)")
    add_root_option(parser)
    parser.add_argument("--textconv", metavar="FILE", help="print FILE in canonical form (for git's textconv)")
    parser.add_argument("--git-external", action="store_true",
                        help="take git's GIT_EXTERNAL_DIFF arguments: PATH OLD-FILE OLD-HEX OLD-MODE NEW-FILE NEW-HEX NEW-MODE")


class UsageError(Exception):
    pass


def run(args: argparse.Namespace) -> int:
    try:
        if args.textconv:
            return textconv(args.textconv)
        if args.git_external:
            return git_external(args.sides)
        pairs = _pairs(args)
    except (UsageError, GitError) as error:
        say(f"recipec diff: {error}")
        return EXIT_ERROR

    diffs: list[RecipeDiff] = []
    locks: list[list[str]] = []  # per pair, what changed between the recipes' lock files
    failed = False
    for a, b in pairs:
        result = _compare(a, b, args.root)
        if result is None:
            failed = True
        else:
            diffs.append(result)
            locks.append(_lock_changes(a, b))
    if args.json:
        objects = [{**d.to_json(), "lock": lock} for d, lock in zip(diffs, locks)]
        data: Any = objects if args.sides and _is_revision_mode(args.sides) else (objects[0] if objects else None)
        if data is not None:
            print(json_text(data))
    else:
        render = markdown if args.markdown else plain
        if not args.markdown and not args.no_color and sys.stdout.isatty():
            render = _rich
        for index, (d, lock) in enumerate(zip(diffs, locks)):
            if index:
                print()
            render(d)
            if lock:
                sys.stdout.write(printable(_lock_text(lock, args.markdown), newlines=True))
    if failed:
        return EXIT_ERROR
    return EXIT_DIFFER if any(not d.equal or lock for d, lock in zip(diffs, locks)) else EXIT_EQUAL


# ---- lock files -----------------------------------------------------------------------------------


def _lock_of(side: Side) -> dict[str, Any] | None:
    """The lock file beside a side's recipe (`FILE.recipe.lock`), if it has one."""
    from recipec.lockfile import lock_path

    if side.path is None:
        return None
    path = lock_path(side.path)
    try:
        text = side.read(path) if side.read is not None else (_read_text(str(path)) if path.is_file() else None)
    except (OSError, IncludeError, GitError, UsageError, ValueError):
        return None
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return {"unreadable": True}
    return data if isinstance(data, dict) else {"unreadable": True}


def _lock_changes(a: Side, b: Side) -> list[str]:
    from recipec.lockfile import compare

    old, new = _lock_of(a), _lock_of(b)
    if old is None and new is None:
        return []
    if old is None or new is None:
        return [f"the lock file is {'new' if old is None else 'gone'} ({b.label if old is None else a.label})"]
    if old.get("unreadable") or new.get("unreadable"):
        return ["a lock file is not valid JSON"] if old != new else []
    return compare(old, new)


def _lock_text(lines: list[str], markdown_mode: bool) -> str:
    if markdown_mode:
        fence = _md_fence([f"~ {line}" for line in lines])
        return "\n".join([f"**lock ({len(lines)})**", "", f"{fence}diff", *(f"~ {line}" for line in lines), fence, ""]) + "\n"
    return "\n".join(["", f"lock ({len(lines)})", *(f"  ~ {line}" for line in lines)]) + "\n"


# ---- sides ----------------------------------------------------------------------------------------


@dataclass
class Side:
    """One recipe to compare: where it is read from and how it is shown."""

    label: str
    path: str | None  # the file path it compiles as; None: it does not exist on this side
    text: str | None = None
    read: Callable[[Path], str] | None = None


def _compile(side: Side, root: str | None = None) -> ir.Recipe | None:
    if side.path is None:
        return empty_recipe()
    result = compile_file(side.path, text=side.text, read=side.read, root=root)
    if not result.ok:
        if side.label != side.path:
            say(f"recipec diff: `{side.label}` does not compile")
        print_diagnostics(result)
        return None
    return result.recipe


def _compare(a: Side, b: Side, root: str | None = None) -> RecipeDiff | None:
    recipe_a, recipe_b = _compile(a, root), _compile(b, root)
    if recipe_a is None or recipe_b is None:
        return None
    return diff(recipe_a, recipe_b, a_label=a.label, b_label=b.label)


def _is_revision_spec(spec: str) -> bool:
    return ":" in spec and not os.path.exists(spec)


def _is_revision_mode(sides: list[str]) -> bool:
    first = sides[0]
    return not (os.path.exists(first) or ":" in first)


def _pairs(args: argparse.Namespace) -> list[tuple[Side, Side]]:
    sides = args.sides
    if not sides:
        raise UsageError("give two recipes (A B) or a revision (REV [PATH...])")
    if not _is_revision_mode(sides):
        if len(sides) != 2:
            raise UsageError(f"give two recipes to compare, not {len(sides)}")
        return [(_side(sides[0], args.path), _side(sides[1], args.path))]
    git = Git()
    rev = sides[0]
    if not git.is_revision(rev):
        raise UsageError(f"`{rev}` is neither a file nor a git revision")
    paths = [git.repo_path(p) for p in sides[1:]] or git.changed_recipes(rev)
    pairs = []
    for path in paths:
        local = git.local_path(path)
        a = Side(f"{rev}:{path}", local, read=git.reader(rev)) if git.exists(rev, path) else Side(NONE_LABEL, None)
        b = Side(local, local) if os.path.exists(local) else Side(NONE_LABEL, None)
        if a.path is None and b.path is None:
            raise UsageError(f"`{path}` is neither at {rev} nor in the working tree")
        pairs.append((a, b))
    return pairs


def _side(spec: str, as_path: str | None) -> Side:
    if _is_revision_spec(spec):
        rev, _, path = spec.partition(":")
        git = Git()
        if rev and not git.is_revision(rev):  # an empty revision is the index, as in `git show :path`
            raise UsageError(f"`{rev}` in `{spec}` is not a git revision")
        # like git: a path starting with ./ or ../ is relative to the current directory, else to the top
        repo_path = git.repo_path(path) if path.startswith(("./", "../")) else path
        return Side(spec, git.local_path(repo_path), read=git.reader(rev))
    if as_path and os.path.exists(spec):
        return Side(spec, as_path, text=_read_text(spec))
    return Side(spec, spec)


def _read_text(path: str) -> str:
    return _read_bytes(path).decode("utf-8", errors="replace")


def _read_bytes(path: str) -> bytes:
    """A regular file's bytes, size-capped: a FIFO or a device is refused, never read."""
    try:
        return read_bytes(path)
    except IncludeError as error:
        raise UsageError(f"cannot read `{path}`: {error.reason}") from None


# ---- git ------------------------------------------------------------------------------------------


class GitError(Exception):
    pass


class Git:
    """The repository holding the current directory, through the git command line."""

    def __init__(self) -> None:
        self.top = Path(self._run("rev-parse", "--show-toplevel", cwd=".").decode().strip())

    @staticmethod
    def _run(*args: str, cwd: str | Path) -> bytes:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
        except OSError as error:
            raise GitError(f"cannot run git: {error.strerror or error}") from None
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip().splitlines()
            raise GitError(message[0] if message else f"git {args[0]} failed")
        return done.stdout

    def git(self, *args: str) -> bytes:
        return self._run(*args, cwd=self.top)

    def repo_path(self, path: str | Path) -> str:
        """A path in the working tree, relative to the top of the repository (posix)."""
        absolute = Path(os.path.abspath(path))
        real = Path(os.path.realpath(absolute.parent)) / absolute.name  # the top is a real path
        return Path(os.path.relpath(real, os.path.realpath(self.top))).as_posix()

    def local_path(self, repo_path: str) -> str:
        """A path relative to the top, as the user would type it from the current directory."""
        return os.path.relpath(self.top / repo_path)

    def is_revision(self, rev: str) -> bool:
        try:
            self.git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
        except GitError:
            return False
        return True

    def exists(self, rev: str, path: str) -> bool:
        try:
            self.git("cat-file", "-e", f"{rev}:{path}")
        except GitError:
            return False
        return True

    def reader(self, rev: str) -> Callable[[Path], str]:
        """Reads files as they were at `rev`: what `extends`, prompts and taxonomies see there."""
        cache: dict[str, str] = {}

        def read(path: Path) -> str:
            relative = self.repo_path(path)
            if relative.startswith("../"):
                raise FileNotFoundError(errno.ENOENT, "outside the repository")
            if relative not in cache:
                try:
                    data = self.git("cat-file", "blob", f"{rev}:{relative}")
                except GitError:
                    raise FileNotFoundError(errno.ENOENT, "no such file in that revision") from None
                cache[relative] = data.decode("utf-8")
            return cache[relative]

        return read

    def changed_recipes(self, rev: str) -> list[str]:
        """Recipes whose file changed since `rev`, and those of the working tree that extend one of them."""
        names = self.git("diff", "--name-only", "--no-renames", "-z", rev, "--").decode().split("\0")
        changed = {n for n in names if n.endswith(".recipe")}
        tracked = self.git("ls-files", "-z", "--", "*.recipe").decode().split("\0")
        changed_files = {str((self.top / n).resolve()) for n in changed}
        derived = set()
        for name in tracked:
            if name and name not in changed and (self.top / name).exists():
                chain = compile_file(self.local_path(name)).chain
                if changed_files & set(chain):
                    derived.add(name)
        return sorted(changed | derived)


# ---- git's textconv and external diff ------------------------------------------------------------


def textconv(path: str) -> int:
    """The canonical form of a recipe, or its text unchanged when it cannot be formatted."""
    try:
        data = read_bytes(path)
    except IncludeError as error:
        say(f"recipec diff: cannot read `{path}`: {error.reason}")
        return EXIT_ERROR
    try:
        text = data.decode("utf-8")
        from recipec.fmt import format_text  # only what textconv needs

        out = format_text(text, path)
    except Exception:  # a syntax error or no formatter: git still shows the text as it is
        sys.stdout.buffer.write(data)
        return EXIT_EQUAL
    sys.stdout.write(out)
    return EXIT_EQUAL


def git_external(argv: list[str]) -> int:
    """git's external diff: PATH OLD-FILE OLD-HEX OLD-MODE NEW-FILE NEW-HEX NEW-MODE [NEW-PATH XFRM].

    git stops at a command that exits non-zero, so differing recipes exit 0 here. The base a recipe
    extends is read from the working tree: git passes the two files, not their revisions.
    """
    if len(argv) not in (7, 9):
        print(f"recipec diff: --git-external takes git's 7 or 9 arguments, not {len(argv)}", file=sys.stderr)
        return EXIT_ERROR
    path, old_file, _, _, new_file, _, _ = argv[:7]
    new_path = argv[7] if len(argv) == 9 else path
    if not path.endswith(".recipe"):
        return _unified(path, new_path, old_file, new_file)
    recipes = []
    for file, name, prefix in ((old_file, path, "a/"), (new_file, new_path, "b/")):
        if file == os.devnull:
            recipes.append((NONE_LABEL, empty_recipe()))
            continue
        result = compile_file(name, text=_read_text(file))
        if not result.ok:
            print_diagnostics(result)
            return _unified(path, new_path, old_file, new_file)
        recipes.append((prefix + name, result.recipe))
    (label_a, a), (label_b, b) = recipes
    d = diff(a, b, a_label=label_a, b_label=label_b)
    plain(d)
    return EXIT_EQUAL


def _unified(path: str, new_path: str, old_file: str, new_file: str) -> int:
    """What `diff -u` prints, for files the semantic diff does not understand."""
    old = [] if old_file == os.devnull else _read_text(old_file).splitlines(keepends=True)
    new = [] if new_file == os.devnull else _read_text(new_file).splitlines(keepends=True)
    label_a = NONE_LABEL if old_file == os.devnull else f"a/{path}"
    label_b = NONE_LABEL if new_file == os.devnull else f"b/{new_path}"
    for line in difflib.unified_diff(old, new, label_a, label_b):
        sys.stdout.write(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return EXIT_EQUAL


# ---- rendering: one report, three printers -------------------------------------------------------


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[tuple[str, list[str]]]  # (marker, cells)
    right: set[int] = field(default_factory=set)  # columns aligned right


@dataclass
class Lines:
    title: str
    lines: list[tuple[str, str]]  # (marker, text)


@dataclass
class Heading:
    text: str


Block = Table | Lines | Heading


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _delta(n: int | None) -> str:
    return "?" if n is None else "0" if n == 0 else f"{n:+,}"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        shown = json.dumps(value, ensure_ascii=False)
        return shown if len(shown) <= VALUE_WIDTH else shown[: VALUE_WIDTH - 2] + '…"'
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) if not isinstance(v, str) else v for v in value) + "]"
    if isinstance(value, dict):
        parts = [f"{k}: {_scalar(v)}" for k, v in value.items() if k != "name" and v not in (None, [], {})]
        return "{" + ", ".join(parts) + "}"
    return str(value)


def _clip(text: str, width: int = 2 * VALUE_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _list_edit(before: list, after: list) -> str | None:
    """`[-x, +y]` for two lists of names that only gained or lost members."""
    if not all(isinstance(v, str) for v in (*before, *after)):
        return None
    kept_a = [v for v in before if v in after]
    kept_b = [v for v in after if v in before]
    if kept_a != kept_b or len(set(before)) != len(before) or len(set(after)) != len(after):
        return None
    edits = [f"-{v}" for v in before if v not in after] + [f"+{v}" for v in after if v not in before]
    return "[" + ", ".join(edits) + "]"


def describe(change: Change) -> str:
    if change.kind == RENAMED:
        return f"{change.path} renamed to {change.after}"
    if change.kind in (ADDED, REMOVED):
        value = change.after if change.kind == ADDED else change.before
        return _clip(f"{change.path}  {_scalar(value)}")
    if isinstance(change.before, list) and isinstance(change.after, list):
        edit = _list_edit(change.before, change.after)
        if edit is not None:
            return _clip(f"{change.path}: {edit}")
    before, after = change.before, change.after
    if isinstance(before, str) and isinstance(after, str):
        before, after = _string_edit(before, after)
    return _clip(f"{change.path}: {_scalar(before)} -> {_scalar(after)}")


def _string_edit(before: str, after: str, context: int = 12) -> tuple[str, str]:
    """Two long strings cut to where they differ, so a changed prompt shows its change."""
    if len(json.dumps(before)) <= VALUE_WIDTH and len(json.dumps(after)) <= VALUE_WIDTH:
        return before, after
    start = 0
    while start < min(len(before), len(after)) and before[start] == after[start]:
        start += 1
    end = 0
    while end < min(len(before), len(after)) - start and before[-1 - end] == after[-1 - end]:
        end += 1
    start = max(0, start - context)
    end = max(0, end - context)

    def cut(text: str) -> str:
        middle = text[start:len(text) - end]
        return ("…" if start else "") + middle + ("…" if end else "")

    return cut(before), cut(after)


def _stage_heading(stage: StageDiff) -> str:
    name = f"{stage.renamed_from} -> {stage.name}" if stage.renamed_from else stage.name
    parts = [f"samples {_count(stage.samples.before)} -> {_count(stage.samples.after)} ({_delta(stage.samples.delta)})"]
    if stage.status == ADDED:
        parts = [f"{_count(stage.samples.after)} samples"]
    elif stage.status == REMOVED:
        parts = [f"{_count(stage.samples.before)} samples"]
    if stage.status == CHANGED:
        for label, quantity in (("image tokens", stage.max_image_tokens), ("trainable params", stage.trainable_params)):
            if quantity.changed:
                parts.append(f"{label} {_count(quantity.before)} -> {_count(quantity.after)}")
    return f"stage {name} ({stage.status}): " + "; ".join(parts)


def _mixture(title: str, rows: tuple[Row, ...]) -> Table:
    lines = []
    for row in rows:
        name = f"{row.renamed_from} -> {row.name}" if row.renamed_from else row.name
        marker = MARKERS[CHANGED] if row.renamed_from and row.status == UNCHANGED else MARKERS[row.status]
        lines.append((marker, [name, _count(row.before), _count(row.after), _delta(row.delta),
                               _share(row.share_before), _share(row.share_after)]))
    return Table(title, [title, "before", "after", "delta", "share before", "share after"], lines, {1, 2, 3, 4, 5})


def report(d: RecipeDiff) -> list[Block]:
    blocks: list[Block] = []
    for stage in d.stages:
        blocks.append(Heading(_stage_heading(stage)))
        for title, rows in (("source", stage.by_source), ("data type", stage.by_data_type),
                            ("category", stage.by_category)):
            if any(r.status != UNCHANGED or r.renamed_from for r in rows):
                blocks.append(_mixture(title, rows))
    if d.changes:
        blocks.append(Lines(f"changes ({len(d.changes)})", [(MARKERS[c.kind], describe(c)) for c in d.changes]))
    cost = d.cost
    total = len(cost.recompute) + len(cost.cached)
    loads = sum(s.uses_model for s in cost.recompute)
    maybe = sum(s.may_stay_cached for s in cost.recompute)
    summary = (f"cost: {len(cost.recompute)} of {total} steps to recompute ({loads} load a model"
               + (f"; {maybe} may stay cached if unchanged" if maybe else "") + "), "
               f"{len(cost.cached)} cached, {len(cost.removed)} no longer in the plan")
    if cost.recompute:
        blocks.append(Lines(summary, [("+" if s.reason == ADDED else "~", s.id + _notes(s)) for s in cost.recompute]))
    elif not d.equal:
        blocks.append(Heading(summary))
    return blocks


def _notes(step: Any) -> str:
    notes = [n for n, on in (("loads a model", step.uses_model), ("may stay cached if unchanged", step.may_stay_cached))
             if on]
    return f"  ({'; '.join(notes)})" if notes else ""


def _title(d: RecipeDiff) -> tuple[str, str]:
    def name(side) -> str:
        return f"{side.label} ({side.recipe})" if side.recipe else side.label

    return name(d.a), name(d.b)


# ---- plain text -----------------------------------------------------------------------------------


def _columns(table: Table) -> list[str]:
    cells = [table.header] + [row for _, row in table.rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(table.header))]

    def line(marker: str, row: list[str]) -> str:
        padded = [c.rjust(w) if i in table.right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return f"  {marker} " + "  ".join(padded).rstrip()

    return [line(" ", table.header)] + [line(m, r) for m, r in table.rows]


def plain_text(d: RecipeDiff) -> str:
    a, b = _title(d)
    out = [f"--- {a}", f"+++ {b}"]
    if d.equal:
        out.append("equal in meaning")
        return "\n".join(out) + "\n"
    for block in report(d):
        out.append("")
        if isinstance(block, Heading):
            out.append(block.text)
        elif isinstance(block, Table):
            out.extend(_columns(block))
        else:
            out.append(block.title)
            out.extend(f"  {m} {text}" for m, text in block.lines)
    return "\n".join(out) + "\n"


def plain(d: RecipeDiff) -> None:
    sys.stdout.write(printable(plain_text(d), newlines=True))


# ---- markdown -------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    """Text in a table cell or heading: no column breaks, no HTML."""
    return text.replace("|", "\\|").replace("<", "&lt;")


def _md_code(text: str) -> str:
    """An inline code span holding `text` whatever backticks it contains."""
    ticks = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{_md_cell(text)}{pad}{ticks}"


def _md_fence(lines: list[str]) -> str:
    """A code fence longer than any run of backticks in `lines`, so none of them can close it."""
    longest = max((len(run) for line in lines for run in re.findall("`+", line)), default=0)
    return "`" * max(3, longest + 1)


def markdown_text(d: RecipeDiff) -> str:
    a, b = _title(d)
    out = [f"### recipe diff: {_md_code(a)} → {_md_code(b)}", ""]
    if d.equal:
        out.append("Equal in meaning.")
        return "\n".join(out) + "\n"
    for block in report(d):
        if isinstance(block, Heading):
            out += [f"**{_md_cell(block.text)}**", ""]
        elif isinstance(block, Table):
            align = ["--:" if i in block.right else ":--" for i in range(len(block.header))]
            out.append("| | " + " | ".join(_md_cell(h) for h in block.header) + " |")
            out.append("|:-:| " + " | ".join(align) + " |")
            for marker, cells in block.rows:
                out.append(f"| {marker.strip() or ' '} | " + " | ".join(_md_cell(c) for c in cells) + " |")
            out.append("")
        else:
            lines = [f"{m} {text}" for m, text in block.lines]
            fence = _md_fence(lines)
            if block.title.startswith("cost"):
                out += [f"**{_md_cell(block.title)}**", "", "<details><summary>steps to recompute</summary>", ""]
                out += [f"{fence}diff", *lines, fence, "", "</details>", ""]
            else:
                out += [f"**{_md_cell(block.title)}**", "", f"{fence}diff", *lines, fence, ""]
    return "\n".join(out).rstrip("\n") + "\n"


def markdown(d: RecipeDiff) -> None:
    sys.stdout.write(printable(markdown_text(d), newlines=True))


# ---- terminal -------------------------------------------------------------------------------------

STYLES = {"+": "green", "-": "red", "~": "yellow", " ": ""}


def _rich(d: RecipeDiff) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable
    from rich.text import Text

    console = Console()
    a, b = (printable(t) for t in _title(d))
    console.print(Text(f"--- {a}", style="red"))
    console.print(Text(f"+++ {b}", style="green"))
    if d.equal:
        console.print("equal in meaning")
        return
    for block in report(d):
        console.print()
        if isinstance(block, Heading):
            console.print(Text(printable(block.text), style="bold"), soft_wrap=True)
        elif isinstance(block, Table):
            table = RichTable(box=None, pad_edge=False, show_edge=False)
            table.add_column("")
            for index, header in enumerate(block.header):
                table.add_column(header, justify="right" if index in block.right else "left")
            for marker, cells in block.rows:
                style = STYLES[marker]
                table.add_row(Text(marker, style=style), *(Text(printable(c), style=style if i == 0 else "")
                                                            for i, c in enumerate(cells)))
            console.print(table)
        else:
            console.print(Text(printable(block.title), style="bold"), soft_wrap=True)
            for marker, text in block.lines:
                line = Text(f"  {marker} ", style=STYLES[marker])
                line.append(printable(text))
                console.print(line, soft_wrap=True)
