"""export: a stage's mixture as files that trainers and `datasets` load as they are.

Params: `stage`; `export` (the recipe's `ir.Export`: `formats`, `images`, `embed_images`); `roots`
(each dataset of the stage -> its image folder, relative to the recipe directory); `training` (the
stage's training settings). The input is the stage's mix output, in the stage's order. The records
pass through unchanged (records out = records in), so the store keeps them too. Files, by format:

    llava       <stage>.json           the mixture as one LLaVA JSON list, in the stage's order
                                       (LLaVA-NeXT's `--data_path` takes it directly); the runtime
                                       adds <stage>.yaml, LLaVA-NeXT's data YAML, whose `json_path`
                                       is absolute (LLaVA-NeXT opens it relative to its working
                                       directory, so nothing else works from its checkout)
    hf_dataset  hf/...                 a saved HF dataset (`datasets.load_from_disk`): the layout of
                                       `save_to_disk` (data-0000i-of-0000N.arrow, state.json,
                                       dataset_info.json), written with pyarrow (byte-deterministic,
                                       no `datasets` needed)
    parquet     parquet/<stage>-0000i-of-0000N.parquet   the same table as Parquet shards
    messages    <stage>.messages.jsonl  chat format for TRL-style trainers: `messages` (role
                                       user/assistant, `content` a list of `{"type": "image"}` and
                                       `{"type": "text", "text": ...}` parts, one image part where
                                       the LLaVA text had `<image>`) and `images` (paths)
    always      <stage>.training.json  the stage's training settings (trainable parts, learning
                                       rates, grid, token budget, ...) and the matching LLaVA-NeXT
                                       arguments
                images.sha256          every image the stage's records reference, once, as
                                       `sha256sum` lines (`<sha256>  <source>/<path>`), sorted: the
                                       runtime fills the image folder from it, and
                                       `cd images && sha256sum -c ../images.sha256` checks a copy

Images. Paths in every format are `<source>/<path>`, relative to the stage's image folder
(`OUT/<stage>/images`, LLaVA-NeXT's `--image_folder`), which the runtime fills with exactly the
images in `images.sha256` (runtime/report.py), never a link to a whole source root. With
`embed_images` the HF dataset and the Parquet shards hold the bytes instead: `image` is then a list
of `{"bytes", "path"}` with the feature `Sequence(Image())`, self-contained (the op reads every
image, checks its sha256 against the one ingest recorded, and fails if an image changed).

One type per field, in every file: `image`/`images` is always a list of strings (LLaVA-NeXT reads a
list of one image as that image; a text-only record has no `image` key in the LLaVA JSON, as
LLaVA-NeXT tells text-only samples by the key's absence, and an empty list elsewhere). So
`datasets.load_dataset("json")` loads each file on datasets 2.19 as on the newest.

Ids: `id` is recipec's content id, `source_id` the id the record had in its data set (null when it
had none), in every format.

Table columns (HF dataset, Parquet): id, source_id, source, origin, category, data_type, image,
conversations, image_tags, instruction_tags and, when any record has scores, `scores` as a struct
with one float field per score name (missing = null).

JSON is deterministic: one entry per line, sorted keys, `ensure_ascii=False`, fixed separators,
a trailing newline.

Streaming. The op reads its input a batch at a time and writes every format as it goes, into the
step's work folder (the files are then moved into the store whole; in memory when the op runs
without a work folder, as in tests), so memory holds a batch whatever the stage's size. The records
are re-cut into pieces of BATCH_ROWS, each one Arrow record batch of the HF dataset, one Parquet row
group, one pass of the JSON writers and of image embedding; a shard is closed once the bytes written
to it reach its budget (HF_SHARD_BYTES, PARQUET_SHARD_BYTES: it may pass it by up to a piece). So
every file depends only on the records and their order, never on how the input was batched. Two
things need the whole stage and are kept compact: the score names (one pass over the `scores`
column before writing, as the `scores` struct has one field per name) and the distinct images, for
images.sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recipec import records
from recipec.ops import images as imaging
from recipec.ops.base import Chunk, OperationError, StepContext
from recipec.ops.collect import Rebatcher, Records
from recipec.ops.export_layout import IMAGE_LIST, format_image_list

FORMATS = ("llava", "hf_dataset", "parquet", "messages")
DEFAULT_FORMATS = ("llava",)
# The HF dataset and the Parquet files are written a piece of BATCH_ROWS records at a time (one
# Arrow record batch / Parquet row group each); a shard is closed once it holds its format's byte
# budget, measured on the bytes written, so shards depend only on the records.
HF_SHARD_BYTES = 500 * 1024 * 1024  # what `save_to_disk` uses by default
PARQUET_SHARD_BYTES = 500 * 1024 * 1024
BATCH_ROWS = 10_000
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3, "use_dictionary": True,
                                   "write_statistics": True, "version": "2.6", "data_page_version": "1.0"}
LLAVA_FIELDS = ("id", "source_id", "source", "category", "data_type", "conversations", "image")
_IMAGE_TOKEN = re.compile(re.escape(records.IMAGE_TOKEN))


def run(ctx: StepContext, inputs: list[Any]) -> Iterator[Chunk]:
    recs = Records(inputs)
    params = ctx.params
    settings = params.get("export") or {}
    formats = tuple(settings.get("formats") or DEFAULT_FORMATS)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise OperationError(f"unknown export format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    stage = params["stage"]
    work_dir = Path(ctx.work_dir) if getattr(ctx, "work_dir", None) is not None else None
    sinks: dict[str, _Sink] = {}
    if "llava" in formats:
        sinks["llava"] = _Sink(f"{stage}.json", work_dir)
    if "messages" in formats:
        sinks["messages"] = _Sink(f"{stage}.messages.jsonl", work_dir)
    shards: list[_Shards] = []
    if "hf_dataset" in formats:
        shards.append(_Shards("hf", lambda i, n: f"data-{i:05d}-of-{n:05d}.arrow", HF_SHARD_BYTES, work_dir))
    if "parquet" in formats:
        shards.append(_Shards("parquet", lambda i, n: f"{stage}-{i:05d}-of-{n:05d}.parquet", PARQUET_SHARD_BYTES,
                              work_dir))
    # the table formats' `scores` struct has a field per score name of the whole stage: one pass
    # over the scores column first
    names = score_names(recs) if shards else None
    reader = _ImageReader(Path(ctx.recipe_dir), params.get("roots") or {}) \
        if shards and settings.get("embed_images") else None

    def write(piece: pa.Table) -> None:
        if "llava" in sinks:
            sinks["llava"].write("".join(("[\n" if sinks["llava"].rows == 0 and i == 0 else ",\n") + _dumps(e)
                                         for i, e in enumerate(llava_entries(piece))))
        if "messages" in sinks:
            sinks["messages"].write("".join(_dumps(e) + "\n" for e in message_entries(piece)))
        for sink in sinks.values():
            sink.rows += piece.num_rows
        if shards:
            # a copy with buffers of exactly these rows: the IPC writer keeps a slice's trailing bytes
            table = _public(embedded(piece, reader) if reader is not None else piece)
            table = table.take(pa.array(range(table.num_rows), pa.int64()))
            for shard in shards:
                shard.write(table)

    out = Rebatcher()
    pieces = Rebatcher(BATCH_ROWS)  # the export columns, re-cut into pieces of BATCH_ROWS records
    images: dict[str, str] = {}
    total = 0
    for batch in recs.batches():
        for chunk in pieces.add(hf_table(batch, names)):
            write(chunk.records)
        _add_images(images, batch)
        total += batch.num_rows
        yield from out.add(batch, consumed=batch.num_rows)
    if pieces.pending_rows:
        for chunk in pieces.finish():
            write(chunk.records)
    if "llava" in sinks:
        sinks["llava"].write("\n]\n" if total else "[]\n")
    files = {f"{stage}.training.json": training_json(stage, params.get("training") or {}, total),
             IMAGE_LIST: format_image_list(images)}
    paths: dict[str, Path] = {}
    for sink in sinks.values():
        sink.into(files, paths)
    if shards:
        empty = _public(embedded(hf_table(records.empty_table(), names), reader) if reader is not None
                        else hf_table(records.empty_table(), names))
        for shard in shards:
            shard.finish(empty)
            shard.into(files, paths, stage)
    yield from out.add(None, files=files)
    chunks = list(out.finish())
    if chunks:
        chunks[-1].file_paths.update(paths)
    elif paths:
        chunks = [Chunk(records=None, file_paths=paths)]
    yield from chunks


run.streams = True  # type: ignore[attr-defined]


class _Sink:
    """One exported file, written as it comes: on disk in the step's work folder (moved into the
    store whole), or in memory when the op runs without one."""

    def __init__(self, name: str, work_dir: Path | None):
        self.name = name
        self.rows = 0
        self.path = work_dir / "export" / name if work_dir is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file: Any = open(self.path, "wb")
        else:
            self.file = io.BytesIO()

    def write(self, text: str) -> None:
        self.file.write(text.encode("utf-8"))

    def into(self, chunk_files: dict[str, bytes], chunk_paths: dict[str, Path]) -> None:
        if self.path is not None:
            self.file.close()
            chunk_paths[self.name] = self.path
        else:
            chunk_files[self.name] = self.file.getvalue()


class _Shards:
    """One table format's shards (`hf`: Arrow IPC streams, as `save_to_disk` writes them; `parquet`),
    written a piece at a time: on disk in the work folder, or in memory without one. A shard is
    closed once its written bytes reach `budget`; the names (`-of-N`) are given once N is known."""

    def __init__(self, folder: str, name: Any, budget: int, work_dir: Path | None):
        self.folder = folder
        self.name = name
        self.budget = budget
        self.dir = work_dir / "export" / folder if work_dir is not None else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.done: list[Path | bytes] = []  # closed shards: their file, or their bytes
        self.sink: Any = None
        self.writer: Any = None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self._open(table.schema)
        if self.folder == "hf":
            self.writer.write_table(table, max_chunksize=BATCH_ROWS)
        else:
            self.writer.write_table(table, row_group_size=BATCH_ROWS)
        if self.sink.tell() >= self.budget:
            self._close()

    def finish(self, empty: pa.Table) -> None:
        """Close the last shard (an empty stage gets one shard with no rows, as `save_to_disk` writes)."""
        if self.writer is None and not self.done:
            self.write(empty)
        if self.writer is not None:
            self._close()

    def into(self, chunk_files: dict[str, bytes], chunk_paths: dict[str, Path], stage: str) -> None:
        names = [self.name(i, len(self.done)) for i in range(len(self.done))]
        for name, shard in zip(names, self.done):
            if isinstance(shard, Path):
                chunk_paths[f"{self.folder}/{name}"] = shard
            else:
                chunk_files[f"{self.folder}/{name}"] = shard
        if self.folder == "hf":
            chunk_files.update({f"hf/{name}": data for name, data in
                                hf_metadata(names, self.done, self.schema, stage).items()})

    def _open(self, schema: pa.Schema) -> None:
        self.schema = schema
        if self.dir is not None:
            self.path: Path | None = self.dir / f"shard-{len(self.done):05d}"
            self.sink = pa.OSFile(str(self.path), "wb")
        else:
            self.path = None
            self.sink = pa.BufferOutputStream()
        if self.folder == "hf":
            self.writer = pa.ipc.new_stream(self.sink, schema)
        else:
            self.writer = pq.ParquetWriter(self.sink, schema, **PARQUET_OPTIONS)

    def _close(self) -> None:
        self.writer.close()
        if self.path is not None:
            self.sink.close()
            self.done.append(self.path)
        else:
            self.done.append(self.sink.getvalue().to_pybytes())
        self.sink = self.writer = None


def hf_metadata(names: list[str], shards: list[Path | bytes], schema: pa.Schema, stage: str) -> dict[str, bytes]:
    """state.json and dataset_info.json of `Dataset.save_to_disk` for these arrow files (deterministic)."""
    digest = hashlib.sha256()
    for shard in shards:
        if isinstance(shard, bytes):
            digest.update(shard)
        else:
            with open(shard, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": digest.hexdigest()[:16],
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    info: dict[str, Any] = {"citation": "", "description": f"Training data of stage {stage}, exported by recipec.",
                            "homepage": "", "license": ""}
    if schema.metadata and b"huggingface" in schema.metadata:
        info["features"] = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    return {"state.json": (json.dumps(state, indent=2, sort_keys=True) + "\n").encode("utf-8"),
            "dataset_info.json": (json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8")}


# ---- LLaVA --------------------------------------------------------------------------------------


def llava_entries(hf: pa.Table) -> list[dict[str, Any]]:
    entries = []
    for row in hf.select(list(LLAVA_FIELDS)).to_pylist():
        if not row["image"]:
            del row["image"]  # LLaVA-NeXT: a text-only sample is one without the key
        entries.append(row)
    return entries


def _dumps(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# ---- chat messages ------------------------------------------------------------------------------


def message_entries(hf: pa.Table) -> list[dict[str, Any]]:
    entries = []
    for row in hf.select(["id", "source_id", "source", "conversations", "image"]).to_pylist():
        messages = []
        for turn in row["conversations"]:
            role = "user" if turn["from"] == records.USER else "assistant"
            messages.append({"role": role, "content": _content_parts(turn["value"])})
        entries.append({"id": row["id"], "source_id": row["source_id"], "source": row["source"],
                        "messages": messages, "images": row["image"] or []})
    return entries


def _content_parts(text: str) -> list[dict[str, str]]:
    """`<image>\\nWhat is it?` -> an image part, then a text part (the newline next to a token goes)."""
    parts: list[dict[str, str]] = []
    pieces = _IMAGE_TOKEN.split(text)
    for i, piece in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
        if i:
            piece = piece[1:] if piece.startswith("\n") else piece
        if i < len(pieces) - 1:
            piece = piece[:-1] if piece.endswith("\n") else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


# ---- training settings --------------------------------------------------------------------------


def training_json(stage: str, training: dict[str, Any], samples: int) -> bytes:
    data = {"stage": stage, "samples": samples, **training}
    if training:
        data["llava_next_args"] = llava_next_args(training)
    data["data"] = {"llava_json": f"{stage}.json", "image_folder": "images"}
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def llava_next_args(t: dict[str, Any]) -> dict[str, Any]:
    """LLaVA-NeXT's training arguments for these settings (paths excluded: see <stage>.yaml)."""
    parts = {"vision": "mm_vision_tower", "projector": "mm_mlp_adapter", "language": "mm_language_model"}
    grid = t.get("grid") or [1, 1]
    args: dict[str, Any] = {
        "mm_tunable_parts": ",".join(parts[p] for p in ("vision", "projector", "language") if p in t.get("train", ())),
        "learning_rate": t.get("part_lr", {}).get("language", t.get("lr")),
        "num_train_epochs": t.get("epochs"),
        "warmup_ratio": t.get("warmup"),
        "lr_scheduler_type": t.get("schedule"),
        "weight_decay": t.get("weight_decay"),
        "model_max_length": t.get("max_length"),
        # a 1x1 grid is one resized tile, as recipec trains it (`square`; `pad` would letterbox first)
        "image_aspect_ratio": "square" if tuple(grid) == (1, 1) else f"anyres_max_{t.get('max_tiles') or grid[0] * grid[1]}",
        "image_grid_pinpoints": f"(1x1),...,({grid[0]}x{grid[1]})",
    }
    part_lr = t.get("part_lr") or {}
    if "vision" in part_lr:
        args["mm_vision_tower_lr"] = part_lr["vision"]
    if "projector" in part_lr:
        args["mm_projector_lr"] = part_lr["projector"]
    model = t.get("model") or {}
    if model:
        args.update({"model_name_or_path": model.get("language"), "vision_tower": model.get("vision"),
                     "mm_projector_type": model.get("projector"), "mm_vision_select_layer": model.get("vision_layer")})
    return args


# ---- images -------------------------------------------------------------------------------------


def _add_images(seen: dict[str, str], table: pa.Table) -> None:
    for source, images in zip(table.column("source").to_pylist(), table.column("images").to_pylist()):
        for image in images or ():
            seen.setdefault(f"{source}/{image['path']}", image["sha256"])


class _ImageReader:
    """Reads a stage's images inside their sources' roots, checking each against its sha256."""

    def __init__(self, recipe_dir: Path, roots: dict[str, str | None]):
        self.recipe_dir = recipe_dir
        self.roots = roots

    def read(self, source: str, path: str, sha256: str) -> bytes:
        root = self.roots.get(source)
        if root is None:
            raise OperationError(f"cannot embed the images of source `{source}`: no image folder is known for it")
        base = Path(root) if Path(root).is_absolute() else self.recipe_dir / root
        try:
            real = imaging.resolve_inside(base, path)
            data = real.read_bytes()
        except imaging.ImageReject as e:
            raise OperationError(f"cannot embed {source}/{path}: {e.detail}") from None
        except OSError as e:
            raise OperationError(f"cannot embed {source}/{path}: {e.strerror or e}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise OperationError(f"image {source}/{path} changed since it was ingested; run again to ingest it anew")
        return data


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def embedded(hf: pa.Table, reader: _ImageReader) -> pa.Table:
    """`hf` with `image` as lists of {bytes, path} (each distinct image of `hf` read once: the op
    embeds a piece of BATCH_ROWS records at a time, so only that piece's images are in memory)."""
    cache: dict[str, bytes] = {}
    values: list[list[dict[str, Any]]] = []
    sources = hf.column("source").to_pylist()
    for source, paths, shas in zip(sources, hf.column("image").to_pylist(), _shas(hf)):
        row = []
        for path, sha in zip(paths, shas):
            if path not in cache:
                cache[path] = reader.read(source, path.removeprefix(f"{source}/"), sha)
            row.append({"bytes": cache[path], "path": path})
        values.append(row)
    column = pa.array(values, pa.list_(IMAGE_STRUCT))
    index = hf.schema.get_field_index("image")
    table = hf.set_column(index, pa.field("image", pa.list_(IMAGE_STRUCT)), column).drop_columns(["_sha256"])
    return table.replace_schema_metadata({b"huggingface": json.dumps(
        {"info": {"features": features(table.schema, images="image")}}, sort_keys=True).encode("utf-8")})


def _shas(hf: pa.Table) -> list[list[str]]:
    return hf.column("_sha256").to_pylist()


def features(schema: pa.Schema, images: str | None = None) -> dict[str, Any]:
    """The `datasets` feature dict of `schema`, in the JSON form every version since 2.x reads."""
    return {f.name: ({"feature": {"_type": "Image"}, "_type": "Sequence"} if f.name == images else _feature(f.type))
            for f in schema}


def _feature(t: pa.DataType) -> Any:
    if pa.types.is_struct(t):
        return {t.field(i).name: _feature(t.field(i).type) for i in range(t.num_fields)}
    if pa.types.is_list(t):
        if pa.types.is_struct(t.value_type):
            return [_feature(t.value_type)]  # a list of dicts (Sequence(dict) would mean dict of lists)
        return {"feature": _feature(t.value_type), "_type": "Sequence"}
    names = {pa.string(): "string", pa.float64(): "float64", pa.int64(): "int64", pa.int32(): "int32",
             pa.binary(): "binary", pa.bool_(): "bool"}
    return {"dtype": names[t], "_type": "Value"}


# ---- HF datasets and Parquet --------------------------------------------------------------------


def score_names(recs: Records) -> list[str]:
    """Every score name of the stage, sorted (read from the scores column alone)."""
    names: set[str] = set()
    for batch in recs.batches(["scores"]):
        names.update(_score_names(batch.column("scores").combine_chunks()))
    return sorted(names)


def _score_names(scores: pa.MapArray) -> set[str]:
    offsets = scores.offsets.to_numpy()
    keys = scores.keys.slice(offsets[0], offsets[-1] - offsets[0])  # `keys` ignores the array's slice
    return set(pc.unique(keys).to_pylist()) if len(keys) else set()


def hf_table(table: pa.Table, score_names: list[str] | None = None) -> pa.Table:
    """The export columns: image paths prefixed with their source, scores as a struct of floats
    (a field per name of `score_names`: the whole stage's, so every batch has the same columns;
    those of `table` when None).

    A `_sha256` column (the images' digests) rides along for `embedded`; the writers drop it.
    """
    n = table.num_rows
    images = table.column("images").combine_chunks() if n else pa.array([], records.SCHEMA.field("images").type)
    offsets = images.offsets.to_numpy()
    offsets = offsets - offsets[0]
    flat = images.flatten()
    paths = flat.field("path")
    parents = pc.list_parent_indices(images) if len(paths) else pa.array([], pa.int64())
    owners = table.column("source").combine_chunks().take(parents) if len(paths) else pa.array([], pa.string())
    joined = pc.binary_join_element_wise(owners, paths, "/") if len(paths) else pa.array([], pa.string())
    image = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), joined)
    shas = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat.field("sha256") if len(paths) else pa.array([], pa.string()))

    columns: dict[str, Any] = {name: table.column(name) for name in ("id", "source_id", "source", "origin", "category",
                                                                       "data_type")}
    columns["image"] = image
    for name in ("conversations", "image_tags", "instruction_tags"):
        # one spelling of the list fields (`item`), whether the records came from Parquet (`element`) or not
        columns[name] = table.column(name).cast(records.SCHEMA.field(name).type)
    scores = table.column("scores").combine_chunks() if n else None
    names = score_names if score_names is not None else sorted(_score_names(scores)) if scores is not None else []
    if names:
        fields = [pc.map_lookup(scores, pa.scalar(name, pa.string()), "first").cast(pa.float64()) if n
                  else pa.array([], pa.float64()) for name in names]
        columns["scores"] = pa.StructArray.from_arrays(fields, names=names)
    columns["_sha256"] = shas
    return pa.table(columns)


def _public(table: pa.Table) -> pa.Table:
    return table.drop_columns(["_sha256"]) if "_sha256" in table.column_names else table
