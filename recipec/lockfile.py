"""`FILE.lock`: what a recipe read, pinned by content digest (`recipec lock`, `recipec run --locked`).

Not the store's process lock (recipec/runtime/lock.py). The lock file sits beside the recipe, is
JSON with sorted keys and one entry a line where it matters, and holds only digests, so it is small,
the same bytes when nothing changed, and reviewable in a pull request:

- `sources`: per source, the sha256 of each data file its `path` matches, and for its image folder
  the number of files and one digest of their list (`sha256  path` lines, sorted by path, the
  format of `sha256sum`). The list itself is kept in the store (`STORE/locks/<digest>.sha256`), so
  `run --locked` can name the image that changed; without it, it says how many changed.
- `models`: per model (the recipe's `model` blocks and the towers of its architectures), its
  reference, revision and engine, and the sha256 of its weights (`*.safetensors` and `config.json`
  of a local folder or of the Hugging Face cache snapshot it resolves to, with the snapshot's commit
  as the revision). A `tiny://` model is built by recipec from its own config and is pinned by
  recipec's version; a served model (`engine = openai`) has no weights here and says so.
- `includes`: the sha256 of every file the recipe includes: the recipes it extends, taxonomies,
  prompt files, tag vocabularies.

File hashes go through the store's digest cache (by path, size and mtime), so re-locking or a
`--locked` run over unchanged data reads no file again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from recipec import __version__, ir

LOCK_VERSION = 1


def lock_path(recipe_file: str | os.PathLike) -> Path:
    return Path(str(recipe_file) + ".lock")


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _walk_files(root: Path) -> Iterator[Path]:
    """Regular files under `root`, not following links to directories (they could leave it)."""
    for directory, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(directory) / name
            if path.is_file():
                yield path


def _data_files(source: ir.Source, base: Path) -> list[Path]:
    import glob

    found: set[Path] = set()
    for pattern in source.paths:
        full = pattern if os.path.isabs(pattern) else str(base / pattern)
        for match in glob.glob(full, recursive=True):
            p = Path(match)
            if p.is_dir():
                found.update(_walk_files(p))
            elif p.is_file():
                found.add(p)
    return sorted(found)


class Locker:
    def __init__(self, recipe: ir.Recipe, recipe_file: str | os.PathLike, chain: list[str], store: Any):
        self.recipe = recipe
        self.file = Path(recipe_file)
        self.base = self.file.parent.absolute()
        self.chain = chain
        self.store = store
        self.digests = store.file_digests()
        self.listings: dict[str, str] = {}  # digest -> the image list it is the digest of

    def sha(self, path: Path) -> str:
        return self.digests.sha256(str(path.absolute()))

    def build(self) -> dict[str, Any]:
        import hashlib

        sources: dict[str, Any] = {}
        for name, source in sorted(self.recipe.sources.items()):
            entry: dict[str, Any] = {"files": {_rel(p, self.base): self.sha(p) for p in _data_files(source, self.base)}}
            if source.license:
                entry["license"] = source.license
            if source.images:
                root = self.base / source.images
                lines = "".join(f"{self.sha(p)}  {_rel(p, root)}\n" for p in _walk_files(root)) if root.is_dir() else ""
                digest = hashlib.sha256(lines.encode("utf-8")).hexdigest()
                self.listings[digest] = lines
                entry["images"] = {"root": source.images, "count": lines.count("\n"), "sha256": digest}
            sources[name] = entry
        models = {name: self.model(use) for name, use in sorted(self.model_uses().items())}
        includes = {_rel(p, self.base): self.sha(p) for p in self.includes()}
        self.digests.save()
        return {"lock_version": LOCK_VERSION, "recipe": self.recipe.name, "sources": sources, "models": models,
                "includes": includes}

    def save_listings(self) -> None:
        folder = self.store.root / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        for digest, lines in self.listings.items():
            path = folder / f"{digest}.sha256"
            if not path.exists():
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                tmp.write_text(lines, encoding="utf-8")
                os.replace(tmp, path)

    def model_uses(self) -> dict[str, ir.ModelUse]:
        uses: dict[str, ir.ModelUse] = dict(self.recipe.model_refs)
        for name, arch in self.recipe.models.items():
            uses[f"{name}.vision"] = arch.vision
            uses[f"{name}.language"] = arch.language
        # models named inline in rules and steps (`model = "Qwen/..."`) under their reference
        for use in _inline_models(self.recipe):
            if not any(u.ref == use.ref and u.revision == use.revision for u in uses.values()):
                uses[use.ref] = use
        return uses

    def model(self, use: ir.ModelUse) -> dict[str, Any]:
        from recipec.models import configs

        entry: dict[str, Any] = {"ref": use.ref, "engine": use.engine}
        if use.revision:
            entry["revision"] = use.revision
        if use.engine == "openai":
            entry["weights"] = None
            entry["note"] = f"served at {use.endpoint or 'an HTTP endpoint'}: its weights cannot be pinned from here"
            return entry
        if use.ref.startswith("tiny://"):
            entry["weights"] = f"built by recipec {__version__} from its own config (random weights, fixed seed)"
            return entry
        folder: Path | None = None
        local = configs._local_candidate(use.ref, self.base)
        if local is not None and local.is_dir():
            folder = local
        else:
            found = configs._hf_cache_config(use.ref, use.revision)
            if found is not None:
                folder = found.parent
                entry["revision"] = folder.name  # the snapshot's commit
        if folder is None:
            entry["weights"] = None
            entry["note"] = "not found locally (a local folder or the Hugging Face cache): weights not pinned"
            return entry
        files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name == "config.json"))
        entry["files"] = {p.name: self.sha(p.resolve()) for p in files}
        return entry

    def includes(self) -> list[Path]:
        paths: set[Path] = set()
        for path in self.chain:
            p = Path(path).absolute()
            if p != self.file.absolute():
                paths.add(p)
        for tax in self.recipe.taxonomies.values():
            paths.add(self.base / tax.file)
        for tagger in self.recipe.image_taggers.values():
            if tagger.vocabulary:
                paths.add(self.base / tagger.vocabulary)
        for prompt in _prompts(self.recipe):
            if prompt.file:
                paths.add(self.base / prompt.file)
        return sorted(p for p in paths if p.is_file())


def _prompts(recipe: ir.Recipe) -> Iterator[ir.Prompt]:
    yield from recipe.prompts.values()
    for syn in recipe.syntheses.values():
        yield from syn.prompts.values()
        yield from (c.prompt for c in syn.rules if c.prompt)
    for tagger in recipe.instruction_taggers.values():
        if tagger.prompt:
            yield tagger.prompt
    for f in recipe.filters:
        for op in f.ops:
            condition = getattr(op, "condition", None)
            if condition is not None and condition.prompt:
                yield condition.prompt


def _inline_models(recipe: ir.Recipe) -> Iterator[ir.ModelUse]:
    for tagger in (*recipe.image_taggers.values(), *recipe.instruction_taggers.values()):
        yield tagger.model
    for syn in recipe.syntheses.values():
        yield syn.model
        yield from (c.model for c in syn.rules if c.model)
    for f in recipe.filters:
        for op in f.ops:
            condition = getattr(op, "condition", None)
            if condition is not None and condition.model:
                yield condition.model


def dumps(lock: dict[str, Any]) -> str:
    return json.dumps(lock, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_lock(recipe: ir.Recipe, recipe_file: str | os.PathLike, chain: list[str], store: Any) -> tuple[Path, bool]:
    """Write FILE.lock; returns its path and whether it changed."""
    locker = Locker(recipe, recipe_file, chain, store)
    text = dumps(locker.build())
    locker.save_listings()
    path = lock_path(recipe_file)
    try:
        old = path.read_text("utf-8")
    except OSError:
        old = None
    if old != text:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path, old != text


def drift(recipe: ir.Recipe, recipe_file: str | os.PathLike, chain: list[str], store: Any) -> list[str]:
    """What changed since FILE.lock was written, one line each; empty when nothing did."""
    path = lock_path(recipe_file)
    try:
        locked = json.loads(path.read_text("utf-8"))
    except OSError:
        return [f"no lock file {path}: run `recipec lock {recipe_file}` first"]
    except ValueError as e:
        return [f"{path} is not valid JSON ({e}); run `recipec lock {recipe_file}` again"]
    locker = Locker(recipe, recipe_file, chain, store)
    now = locker.build()
    locker.save_listings()  # so the comparison can name the images that changed
    return compare(locked, now, store)


def compare(old: dict[str, Any], new: dict[str, Any], store: Any = None) -> list[str]:
    """The differences between two locks, as lines a person can act on."""
    problems: list[str] = []
    for name in sorted(set(old.get("sources", {})) | set(new.get("sources", {}))):
        a, b = old.get("sources", {}).get(name), new.get("sources", {}).get(name)
        if a is None:
            problems.append(f"source {name}: not in the lock (new in the recipe)")
            continue
        if b is None:
            problems.append(f"source {name}: in the lock, no longer in the recipe")
            continue
        problems.extend(_files_changed(f"source {name}: data file", a.get("files", {}), b.get("files", {})))
        ia, ib = a.get("images"), b.get("images")
        if (ia or {}).get("sha256") != (ib or {}).get("sha256"):
            problems.extend(_images_changed(name, ia, ib, store))
        if a.get("license") != b.get("license"):
            problems.append(f"source {name}: license {a.get('license')} -> {b.get('license')}")
    for name in sorted(set(old.get("models", {})) | set(new.get("models", {}))):
        a, b = old.get("models", {}).get(name), new.get("models", {}).get(name)
        if a == b:
            continue
        if a is None or b is None:
            problems.append(f"model {name}: {'not in the lock' if a is None else 'no longer in the recipe'}")
            continue
        for key in sorted(set(a) | set(b)):
            if key == "files":
                problems.extend(_files_changed(f"model {name}: weights file", a.get("files", {}), b.get("files", {})))
            elif a.get(key) != b.get(key) and key != "note":
                problems.append(f"model {name}: {key} {a.get(key)} -> {b.get(key)}")
    problems.extend(_files_changed("included file", old.get("includes", {}), new.get("includes", {})))
    return problems


def _files_changed(what: str, a: dict[str, str], b: dict[str, str]) -> list[str]:
    lines = []
    for path in sorted(set(a) | set(b)):
        if path not in b:
            lines.append(f"{what} {path}: gone")
        elif path not in a:
            lines.append(f"{what} {path}: new")
        elif a[path] != b[path]:
            lines.append(f"{what} {path}: changed (sha256 {a[path][:12]} -> {b[path][:12]})")
    return lines


def _listing(store: Any, digest: str | None) -> dict[str, str] | None:
    if store is None or not digest:
        return None
    try:
        text = (store.root / "locks" / f"{digest}.sha256").read_text("utf-8")
    except OSError:
        return None
    return {line[66:]: line[:64] for line in text.splitlines() if len(line) > 66}


def _images_changed(name: str, a: dict | None, b: dict | None, store: Any) -> list[str]:
    if a is None or b is None:
        return [f"source {name}: image folder {'added' if a is None else 'removed'}"]
    before, after = _listing(store, a.get("sha256")), _listing(store, b.get("sha256"))
    root = b.get("root") or a.get("root")
    if before is None or after is None:
        return [f"source {name}: images under {root} changed ({a.get('count')} -> {b.get('count')} files); "
                "the locked list is not in this store, so which ones cannot be said"]
    return [f"source {name}: image {root}/{line}" for line in _files_changed("", before, after)
            for line in [line.removeprefix(" ")]] or [f"source {name}: images under {root} changed"]
