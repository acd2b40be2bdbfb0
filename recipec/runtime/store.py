"""The content-addressed store: each step's result kept under a key of everything that shapes it.

Layout::

    STORE/
      lock                               held by the running `recipec run` (lock.py)
      steps/<key[:2]>/<key>/             one finished step; never modified once there
        manifest.json                    what the step is and what it holds (written last)
        shard-00000.parquet ...          output records, one shard per chunk the op yielded
        rejects-00000.parquet ...        dropped records with their reasons (records.REJECT_SCHEMA)
        files/<name>                     artifacts a chunk carried (an export's files)
      tmp/<key>/                         the step being computed, renamed into steps/ when complete
      cache/file-sha256.json             sha256 of data files by (path, size, mtime_ns)
      outputs/<digest of OUT path>.json  what the last run wrote to that --out folder (report.py)

Keys. An ingest step: `key = sha256(store format, step fingerprint, step id, seed, data digest)`.
Any other step: `key = sha256(store format, its own op, version and params, step id, seed, the
output digests of its inputs)` (`content_key`): early cutoff. An upstream edit that recomputes an
input with the same content (a threshold moved where no record sits) leaves the step's key, so it
stays cached, and so does everything below it whose inputs did not change. A step whose inputs are
still to run has no key yet; the executor settles it when they are done. The step
id and the recipe's seed are in the key because an op sees them too (`ctx.step_id`, which ops
write into records' provenance, and `ctx.seed`): a step is computed once, whichever recipe asks
for it, as long as it is the same step under the same name. An ingest step's
data digest covers the content of its source's data files (sha256 of each, remembered by
(path, size, mtime_ns) so an unchanged file is not read again) and the listing of its image root
(relative path, size, mtime_ns of every file: hashing every image on every run would be too slow;
the ingest op records each image's own sha256). Paths enter keys relative to the recipe's folder,
so moving a project does not invalidate its store.

Atomicity. A step is written into `tmp/<key>/`, every file fsync'd, `manifest.json` last, then the
folder is renamed into `steps/` (one atomic rename) and the parent fsync'd. So a folder under
`steps/` is complete or absent; a killed run leaves only `tmp/` debris, cleared by the next run
while it holds the lock. A step is done iff its manifest is there and every file it lists exists
with its recorded size (`verify=True` checks the sha256 too). An unfinished step is computed again
from its beginning; a finished one never is.

Parquet is written with fixed options, so the same table gives the same bytes (pyarrow stamps its
version into `created_by`, which is stable for one installation). pyarrow is imported only by the
functions that read or write shards: a run that finds everything cached never loads it.
"""

from __future__ import annotations

import collections
import errno
import glob
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

from recipec.diagnostics import RecipecError
from recipec.runtime.lock import StoreLock

if TYPE_CHECKING:
    import pyarrow as pa

    from recipec.plan import Plan

STORE_FORMAT = 1
MANIFEST = "manifest.json"
# zstd's level 1: a step's shards are written once and read a few times; against level 3 it
# encodes 1M text records in 2.2 s instead of 3.8 s for 6% more bytes (the exports keep level 3)
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 1,
    "use_dictionary": True,
    "write_statistics": True,
    "version": "2.6",
    "data_page_version": "1.0",
    "row_group_size": 65_536,
}
# columns nearly unique per record: a dictionary or min/max statistics of them are work wasted
_UNIQUE_COLUMNS = frozenset({"id", "origin", "conversations", "source_id", "record", "detail"})


def shard_options(table: "pa.Table") -> dict[str, Any]:
    """PARQUET_OPTIONS for one shard: dictionaries and statistics for its columns that repeat."""
    repeating = [name for name in table.column_names if name not in _UNIQUE_COLUMNS]
    return {**PARQUET_OPTIONS, "use_dictionary": repeating, "write_statistics": repeating}
_HASH_BLOCK = 1 << 20


class StoreError(RecipecError):
    """The store cannot do what was asked (a damaged step, a bad artifact name)."""


# ---- keys ---------------------------------------------------------------------------------------


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def step_key(fingerprint: str, input_keys: Sequence[str], data: str | None = None, *, step_id: str,
             seed: int) -> str:
    payload = {"format": STORE_FORMAT, "fingerprint": fingerprint, "step": step_id, "seed": seed,
               "inputs": list(input_keys), "data": data}
    return hashlib.sha256(canonical(payload).encode("utf-8")).hexdigest()


def local_fingerprint(step: Any) -> str:
    """What shapes a step apart from its inputs' content: its op, the op's version and its params."""
    from recipec.plan import OP_VERSIONS

    payload = {"op": step.op, "version": OP_VERSIONS.get(step.op), "params": step.params}
    return hashlib.sha256(canonical(payload).encode("utf-8")).hexdigest()


def output_digest(manifest: Mapping[str, Any]) -> str:
    """What a finished step hands on: the digests of its record shards and files (its rejects stay
    with it, and their details name its thresholds: they are no input of a later step)."""
    content = [[e["name"], e["sha256"]] for e in (*manifest.get("records", ()), *manifest.get("files", ()))]
    return hashlib.sha256(canonical(content).encode("utf-8")).hexdigest()


def content_key(step: Any, input_digests: Sequence[str], *, seed: int) -> str:
    """The key of a step that has inputs (early cutoff): its own fingerprint and its inputs' output
    digests, not their keys. An upstream edit that gives an input the same content leaves it."""
    payload = {"format": STORE_FORMAT, "cutoff": 1, "local": local_fingerprint(step), "step": step.id, "seed": seed,
               "inputs": list(input_digests)}
    return hashlib.sha256(canonical(payload).encode("utf-8")).hexdigest()


def plan_keys(plan: "Plan", step_ids: Iterable[str], recipe_dir: Path, data: "DataDigests",
              store: "Store | None" = None) -> dict[str, str]:
    """Store keys of `step_ids` and of everything upstream of them.

    An ingest step is keyed on its source's data. A step with inputs is keyed on its inputs' output
    digests (`content_key`) where `store` holds every input finished; otherwise its key is
    provisional (chained from its inputs' keys, never found done): the executor settles it once the
    inputs have run, and the step may then still be found cached.
    """
    needed: set[str] = set()
    for step_id in step_ids:
        needed.update(plan.upstream(step_id))
    keys: dict[str, str] = {}
    digests: dict[str, str | None] = {}
    for step in plan.steps.values():  # dependency order: inputs come first
        if step.id not in needed:
            continue
        if step.op == "ingest" or not step.inputs:
            digest = data.source(step.params["source"], recipe_dir) if step.op == "ingest" else None
            keys[step.id] = step_key(step.fingerprint, [], digest, step_id=step.id, seed=plan.recipe.seed)
        elif store is not None and all(digests.get(i) for i in step.inputs):
            keys[step.id] = content_key(step, [digests[i] for i in step.inputs], seed=plan.recipe.seed)
        else:
            keys[step.id] = step_key(step.fingerprint, [keys[i] for i in step.inputs], "provisional",
                                     step_id=step.id, seed=plan.recipe.seed)
        manifest = store.done(keys[step.id]) if store is not None else None
        digests[step.id] = output_digest(manifest) if manifest is not None else None
    return keys


def cache_status(plan: "Plan", store: "str | os.PathLike | Store", recipe_dir: str | os.PathLike = ".") -> dict[str, str]:
    """Per step of `plan`: `cached` (a run finds it done), `may stay cached` (its inputs are to be
    recomputed, and this very step, with these params, has been computed before: if its inputs come
    out unchanged it stays cached) or `runs`. Reads no data beyond unremembered data files, takes no
    lock, writes nothing."""
    store = store if isinstance(store, Store) else Store(store)
    keys = plan_keys(plan, plan.steps, Path(recipe_dir).absolute(), DataDigests(store.file_digests()), store)
    status: dict[str, str] = {}
    for step_id, key in keys.items():
        step = plan.steps[step_id]
        if store.done(key) is not None:
            status[step_id] = "cached"
        elif step.inputs and store.computed_before(step, plan.recipe.seed):
            status[step_id] = "may stay cached"
        else:
            status[step_id] = "runs"
    return status


def cached_steps(plan: "Plan", store: "str | os.PathLike | Store", recipe_dir: str | os.PathLike = ".") -> set[str]:
    """The steps of `plan` a run would find done in `store` (for `recipec plan --store`).

    `recipe_dir` is the recipe's folder, which its data paths are relative to. Reads no data
    beyond data files whose digest is not remembered yet, takes no lock, writes nothing.
    """
    return {s for s, v in cache_status(plan, store, recipe_dir).items() if v == "cached"}


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class FileDigests:
    """sha256 of files, remembered by (path, size, mtime_ns) across runs.

    As git does with its index, an entry is trusted only if the file's mtime is older than the
    moment it was hashed by more than the clock's coarseness: a file rewritten (same size) within
    the same mtime tick as its hashing would otherwise keep a stale digest.
    """

    RACY_NS = 2_000_000_000

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, list] = {}
        self._dirty = False
        self.hashed = 0  # files read this run (the no-op re-run reads none)
        try:
            self._entries = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            self._entries = {}

    def sha256(self, path: str) -> str:
        st = os.stat(path)
        entry = self._entries.get(path)
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns and st.st_mtime_ns < entry[3] - self.RACY_NS:
            return entry[2]
        hashed_at = time.time_ns()
        digest = file_sha256(path)
        self._entries[path] = [st.st_size, st.st_mtime_ns, digest, hashed_at]
        self._dirty = True
        self.hashed += 1
        return digest

    def save(self) -> None:
        if self._dirty:
            atomic_write(self.path, canonical(self._entries).encode("utf-8"))
            self._dirty = False


class DataDigests:
    """Digests of what an ingest step reads, for its key; one instance per run."""

    def __init__(self, files: FileDigests):
        self.files = files
        self._listings: dict[str, str] = {}  # several sources often share one image root

    def source(self, source: Mapping[str, Any], recipe_dir: Path) -> str:
        recipe_dir = Path(recipe_dir).absolute()
        listing_dirs = source.get("format") == "image_folder"  # a folder of images is data, listed
        parts: list[Any] = []
        for pattern in source.get("paths", ()):
            found = sorted(glob.glob(str(recipe_dir / pattern), recursive=True))
            entries = []
            for match in found:
                rel = _relative(match, recipe_dir)
                if os.path.isdir(match):
                    entries.append([rel, "listing", self.listing(match)] if listing_dirs
                                   else [rel, "tree", self._tree(match)])
                elif os.path.isfile(match):
                    entries.append([rel, self.files.sha256(match)])
            parts.append(["paths", pattern, entries])
        images = source.get("images")
        if images:
            root = str(recipe_dir / images)
            parts.append(["images", images, self.listing(root) if os.path.isdir(root) else "missing"])
        return hashlib.sha256(canonical(parts).encode("utf-8")).hexdigest()

    def listing(self, root: str) -> str:
        """sha256 of (relative path, size, mtime_ns) of every file under `root`."""
        root = os.path.abspath(root)
        if root not in self._listings:
            digest = hashlib.sha256()
            for rel, st in _walk(root):
                digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            self._listings[root] = digest.hexdigest()
        return self._listings[root]

    def _tree(self, root: str) -> str:
        digest = hashlib.sha256()
        for rel, _ in _walk(root):
            digest.update(f"{rel}\t{self.files.sha256(os.path.join(root, rel))}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()


def _walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every file under `root` as (POSIX path relative to it, stat), in a fixed order.

    Linked folders are followed (image roots are often links) only where they lead to a folder
    inside the root's real path, each real folder once, so a link cycle cannot loop and a link to
    `/` cannot walk the filesystem.
    """
    real_root = os.path.realpath(root)
    inside = real_root.rstrip(os.sep) + os.sep
    stack = [""]
    seen: set[tuple[int, int]] = set()
    while stack:
        rel_dir = stack.pop()
        path = os.path.join(root, rel_dir)
        try:
            if rel_dir and os.path.islink(path):
                target = os.path.realpath(path)
                if target != real_root and not target.startswith(inside):
                    continue  # a link out of the root: not part of the data
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if entry.is_dir():
                subdirs.append(rel)
            elif entry.is_file():
                yield rel, entry.stat()
        stack.extend(reversed(subdirs))


def _relative(path: str, base: Path) -> str:
    return PurePosixPath(Path(os.path.relpath(path, base))).as_posix()


# ---- files --------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `path` so that readers see the old content or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def encode_shard(table: "pa.Table") -> "pa.Buffer":
    """`table` as the bytes of a store shard (a Parquet file with `shard_options`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **shard_options(table))
    return sink.getvalue()


def write_parquet(table: "pa.Table", path: Path) -> None:
    Path(path).write_bytes(encode_shard(table))


def safe_artifact_name(name: str) -> str:
    """A chunk's file name must stay inside the step's `files/` folder."""
    pure = PurePosixPath(name)
    if not name or "\\" in name or "\x00" in name or pure.is_absolute() or any(p in ("", ".", "..") for p in name.split("/")):
        raise StoreError(f"artifact name {name!r} must be a relative POSIX path without '.' or '..' parts")
    return pure.as_posix()


# ---- the store ----------------------------------------------------------------------------------


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.steps_dir = self.root / "steps"
        self.tmp_dir = self.root / "tmp"
        self.cache_dir = self.root / "cache"
        # tiny:// models built for runs on this store (RECIPEC_MODEL_CACHE shares one folder among stores)
        self.models_dir = Path(os.environ.get("RECIPEC_MODEL_CACHE") or self.root / "models")
        self.requests_path = self.cache_dir / "requests.sqlite"  # every finished model request
        self.lock = StoreLock(self.root)

    @contextmanager
    def locked(self) -> Iterator["Store"]:
        """Hold the store for a run; anything left in tmp/ then belongs to a dead run."""
        first = not self.lock.held
        with self.lock:
            if first and self.tmp_dir.exists():
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
            yield self

    def step_dir(self, key: str) -> Path:
        return self.steps_dir / key[:2] / key

    def path(self, key: str, name: str) -> Path:
        return self.step_dir(key) / name

    def work_dir(self, key: str) -> Path:
        """Scratch space of a step that outlives a crash (training's intermediate checkpoints);
        unlike tmp/, a new run keeps it, and the step's commit removes it."""
        return self.root / "work" / key

    def _seen_path(self, step: Any, seed: int) -> Path:
        digest = hashlib.sha256(canonical([step.id, local_fingerprint(step), seed]).encode("utf-8")).hexdigest()
        return self.cache_dir / "computed" / digest[:2] / digest

    def remember_computed(self, step: Any, seed: int) -> None:
        """Note that this step (id, op, params, seed) has been computed once, for `cache_status`."""
        path = self._seen_path(step, seed)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()

    def computed_before(self, step: Any, seed: int) -> bool:
        return self._seen_path(step, seed).exists()

    def file_digests(self) -> FileDigests:
        return FileDigests(self.cache_dir / "file-sha256.json")

    def manifest(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.step_dir(key) / MANIFEST).read_text("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable: treated as not done, and recomputed

    def done(self, key: str, *, verify: bool = False) -> dict[str, Any] | None:
        """The manifest of a finished, intact step; None when it must be computed."""
        manifest = self.manifest(key)
        if manifest is None or manifest.get("key") != key:
            return None
        folder = self.step_dir(key)
        for entry in entries(manifest):
            path = folder / entry["name"]
            try:
                if path.stat().st_size != entry["bytes"]:
                    return None
            except OSError:
                return None
            if verify and file_sha256(path) != entry["sha256"]:
                return None
        return manifest

    def discard(self, key: str) -> None:
        """Remove a damaged step folder (moved aside first, so the removal need not be atomic)."""
        folder = self.step_dir(key)
        if not folder.exists():
            return
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        trash = self.tmp_dir / f"discarded-{key}-{time.time_ns()}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def writer(self, key: str) -> "StepWriter":
        return StepWriter(self, key)

    def read_records(self, key: str, manifest: Mapping[str, Any] | None = None) -> "pa.Table":
        manifest = manifest or self._require(key)
        return self._read_tables(key, manifest["records"], "records")

    def open_records(self, key: str, manifest: Mapping[str, Any] | None = None) -> "StoredTable":
        """The output records of a step, read lazily: row counts from the manifest, batches on demand."""
        manifest = manifest or self._require(key)
        return StoredTable([self.path(key, e["name"]) for e in manifest["records"]],
                           [int(e["rows"]) for e in manifest["records"]])

    def read_rejects(self, key: str, manifest: Mapping[str, Any] | None = None) -> "pa.Table":
        manifest = manifest or self._require(key)
        return self._read_tables(key, manifest["rejects"], "rejects")

    def _require(self, key: str) -> dict[str, Any]:
        manifest = self.manifest(key)
        if manifest is None:
            raise StoreError(f"step {key[:12]} is not in the store {self.root}")
        return manifest

    def _read_tables(self, key: str, shard_entries: list[dict[str, Any]], kind: str) -> "pa.Table":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from recipec import records

        tables = [pq.read_table(self.path(key, e["name"]), memory_map=True) for e in shard_entries]
        if not tables:
            return records.empty_rejects() if kind == "rejects" else records.empty_table()
        if len(tables) == 1:
            return tables[0]
        return pa.concat_tables(tables, promote_options="default")


class StoredTable:
    """A stored step's records without loading them: what streaming operations get as an input.

    `num_rows` comes from the manifest; `batches(columns)` reads the shards one at a time (only the
    columns asked for), so an operation's memory does not grow with the step's size. `read()` gives
    the whole table, for operations that need it (the model-backed ones).
    """

    def __init__(self, paths: Sequence[Path], rows: Sequence[int]):
        self.paths = list(paths)
        self.rows = list(rows)
        self.num_rows = sum(self.rows)

    @property
    def schema(self) -> "pa.Schema":
        import pyarrow.parquet as pq

        from recipec import records

        return pq.read_schema(self.paths[0]) if self.paths else records.SCHEMA

    def batches(self, columns: Sequence[str] | None = None) -> Iterator["pa.Table"]:
        """The records shard by shard, in order (a shard holds at most one chunk of an op's output)."""
        import pyarrow.parquet as pq

        for path, rows in zip(self.paths, self.rows):
            if not rows:
                continue
            wanted = None
            if columns is not None:
                names = pq.read_schema(path).names
                wanted = [c for c in columns if c in names]
            yield pq.read_table(path, columns=wanted, memory_map=True)

    def read(self, columns: Sequence[str] | None = None) -> "pa.Table":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from recipec import records

        tables = [pq.read_table(p, columns=list(columns) if columns is not None else None, memory_map=True)
                  for p in self.paths]
        if not tables:
            empty = records.empty_table()
            return empty.select(list(columns)) if columns is not None else empty
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")


def entries(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every file a manifest lists."""
    return [*manifest.get("records", ()), *manifest.get("rejects", ()), *manifest.get("files", ())]


class StepWriter:
    """Builds one step in tmp/<key>/; `commit` moves it into steps/ whole, or not at all."""

    def __init__(self, store: Store, key: str):
        self.store = store
        self.key = key
        self.dir = store.tmp_dir / key
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.records: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []
        self.files: list[dict[str, Any]] = []
        self._file_names: set[str] = set()
        self._dirs = {self.dir}
        # shards are encoded on a thread of their own (pyarrow lets go of the GIL), so the step
        # makes its next records meanwhile; at most SHARDS_AHEAD wait, which bounds the memory
        self._shards: ThreadPoolExecutor | None = None
        self._pending: collections.deque[tuple[int, Future[dict[str, Any]]]] = collections.deque()

    SHARDS_AHEAD = 2

    def add_records(self, table: "pa.Table") -> None:
        index = len(self.records)
        self.records.append({})  # filled in when the shard is written
        if self._shards is None:
            self._shards = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recipec-shards")
        while len(self._pending) >= self.SHARDS_AHEAD:
            self._finish_one()
        self._pending.append((index, self._shards.submit(self._parquet, f"shard-{index:05d}.parquet", table)))

    def _finish_one(self) -> None:
        index, future = self._pending.popleft()
        self.records[index] = future.result()

    def _finish_shards(self) -> None:
        while self._pending:
            self._finish_one()
        if self._shards is not None:
            self._shards.shutdown(wait=True)
            self._shards = None

    def add_rejects(self, table: "pa.Table") -> None:
        self.rejects.append(self._parquet(f"rejects-{len(self.rejects):05d}.parquet", table))

    def _file_path(self, name: str) -> tuple[str, Path]:
        """The checked name of an artifact and where it goes in the step (its folders made)."""
        name = safe_artifact_name(name)
        if name in self._file_names:
            raise StoreError(f"two chunks carry a file named {name!r}")
        self._file_names.add(name)
        path = self.dir / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self._dirs.update(p for p in path.parents if p.is_relative_to(self.dir))
        return name, path

    def add_file(self, name: str, data: bytes) -> None:
        name, path = self._file_path(name)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.files.append({"name": f"files/{name}", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    def move_file(self, name: str, source: Path) -> None:
        """Take a file the op wrote elsewhere (a checkpoint too large for memory) into the step."""
        name, path = self._file_path(name)
        shutil.move(str(source), path)
        _fsync_file(path)
        self.files.append({"name": f"files/{name}", "bytes": path.stat().st_size, "sha256": file_sha256(path)})

    def _parquet(self, name: str, table: "pa.Table") -> dict[str, Any]:
        data = encode_shard(table)  # hashed and written from memory: the file is not read back
        path = self.dir / name
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return {"name": name, "rows": table.num_rows, "bytes": data.size, "sha256": hashlib.sha256(data).hexdigest()}

    def commit(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        self._finish_shards()
        manifest = {"format": STORE_FORMAT, "key": self.key, **fields,
                    "records": self.records, "rejects": self.rejects, "files": self.files}
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        atomic_write(self.dir / MANIFEST, text.encode("utf-8"))
        for folder in sorted(self._dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(folder)
        target = self.store.step_dir(self.key)
        if not target.parent.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(target.parent.parent)
        if target.exists():  # a damaged copy that `done` refused
            self.store.discard(self.key)
        try:
            os.rename(self.dir, target)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise StoreError(f"step {self.key[:12]} appeared in the store while being written; is the lock honoured?") from e
            raise
        fsync_dir(target.parent)
        return json.loads(text)  # exactly what a later run reads back, key order included

    def abort(self) -> None:
        for _, future in self._pending:
            future.cancel()
        if self._shards is not None:
            self._shards.shutdown(wait=True)
        self._pending.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
