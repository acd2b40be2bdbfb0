"""export: a stage's mixture as the files LLaVA-NeXT's training scripts and HF `datasets` read.

Params: `stage`. The input is the stage's mix output, in the stage's order. The records pass
through unchanged (records out = records in), so the store keeps them too. Files:

    <stage>.json              the whole mixture as one LLaVA JSON list, in the stage's order
    sources/<source>.json     the same records, one LLaVA JSON list per source (stage order)
    <stage>.yaml              LLaVA-NeXT's data YAML: `datasets:` of `json_path` (relative to the
                              YAML: run training from this folder, or make them absolute) and
                              `sampling_strategy: all` (the mixture is already drawn)
    hf/...                    a saved HF dataset (`datasets.load_from_disk("hf")`): the layout of
                              `save_to_disk` (`data-0000i-of-0000N.arrow`, `dataset_info.json`,
                              `state.json`), written here with pyarrow so it is byte-deterministic
                              and needs no `datasets`; features are left to `datasets` to infer
                              from the Arrow schema, which every version does its own way

A LLaVA entry: `{"id", "source", "data_type", "conversations", "image"}`. `image` is a path for
one image and a list for several (what LLaVA-NeXT's loader reads: it takes `image` as a string or
a list; it has no `images` key); text-only records have no `image`. Image paths are
`<source>/<path>`: relative to an image folder (LLaVA-NeXT's `--image_folder`) that holds one
folder per source, linked to that source's `images` root. Recipes name roots relative to the
recipe, so the export cannot know absolute paths; the runtime makes that folder.

The HF dataset has the columns id, source, origin, category, data_type, image (list of paths as
above), conversations, image_tags, instruction_tags and, when any record has scores, `scores` as a
struct with one float field per score name (missing = null).

JSON is deterministic: one entry per line, sorted keys, `ensure_ascii=False`, fixed separators,
a trailing newline.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from recipec import records
from recipec.ops.base import Chunk, StepContext
from recipec.ops.collect import concat, emit

HF_SHARD_BYTES = 500 * 1024 * 1024  # what `save_to_disk` uses by default
HF_BATCH_ROWS = 10_000


def run(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    table = concat(inputs)
    stage = ctx.params["stage"]
    files = export_files(table, stage)
    yield from emit(table, consumed=table.num_rows, files=files)


def export_files(table: pa.Table, stage: str) -> dict[str, bytes]:
    hf = hf_table(table)
    entries = llava_entries(hf)
    by_source: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_source.setdefault(entry["source"], []).append(entry)
    files = {f"{stage}.json": json_list(entries)}
    for source in sorted(by_source):
        files[f"sources/{source}.json"] = json_list(by_source[source])
    files[f"{stage}.yaml"] = data_yaml(stage, {s: len(v) for s, v in sorted(by_source.items())})
    files.update({f"hf/{name}": data for name, data in hf_files(hf, stage).items()})
    return files


# ---- LLaVA --------------------------------------------------------------------------------------


def llava_entries(hf: pa.Table) -> list[dict[str, Any]]:
    columns = ["id", "source", "data_type", "conversations", "image"]
    entries = []
    for row in hf.select(columns).to_pylist():
        images = row.pop("image")
        if len(images) == 1:
            row["image"] = images[0]
        elif images:
            row["image"] = images
        entries.append(row)
    return entries


def json_list(entries: list[dict[str, Any]]) -> bytes:
    if not entries:
        return b"[]\n"
    lines = (json.dumps(e, sort_keys=True, ensure_ascii=False, separators=(",", ":")) for e in entries)
    return ("[\n" + ",\n".join(lines) + "\n]\n").encode("utf-8")


def data_yaml(stage: str, counts: dict[str, int]) -> bytes:
    total = sum(counts.values())
    lines = [
        f"# LLaVA-NeXT training data for stage {stage} (written by recipec): {total} samples "
        f"from {len(counts)} source{'s' if len(counts) != 1 else ''}.",
        "# json_path is relative to this file. Image paths in the JSON are <source>/<path>, relative to an",
        "# image folder (--image_folder) holding one folder per source.",
    ]
    if not counts:
        return ("\n".join(lines + ["datasets: []"]) + "\n").encode("utf-8")
    lines.append("datasets:")
    for source, n in counts.items():
        # JSON strings are YAML strings: quoting this way survives any file name
        lines += [f"  - json_path: {json.dumps(f'sources/{source}.json', ensure_ascii=False)}  # {n} samples",
                  "    sampling_strategy: all"]
    return ("\n".join(lines) + "\n").encode("utf-8")


# ---- HF datasets --------------------------------------------------------------------------------


def hf_table(table: pa.Table) -> pa.Table:
    """The export columns: image paths prefixed with their source, scores as a struct of floats."""
    n = table.num_rows
    images = table.column("images").combine_chunks() if n else pa.array([], records.SCHEMA.field("images").type)
    offsets = images.offsets.to_numpy()
    offsets = offsets - offsets[0]
    paths = images.flatten().field("path")
    parents = pc.list_parent_indices(images) if len(paths) else pa.array([], pa.int64())
    owners = table.column("source").combine_chunks().take(parents) if len(paths) else pa.array([], pa.string())
    joined = pc.binary_join_element_wise(owners, paths, "/") if len(paths) else pa.array([], pa.string())
    image = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), joined)

    columns: dict[str, Any] = {name: table.column(name) for name in ("id", "source", "origin", "category", "data_type")}
    columns["image"] = image
    for name in ("conversations", "image_tags", "instruction_tags"):
        columns[name] = table.column(name)
    scores = table.column("scores").combine_chunks() if n else None
    names = sorted(set(pc.unique(scores.keys).to_pylist())) if scores is not None and len(scores.keys) else []
    if names:
        fields = [pc.map_lookup(scores, pa.scalar(name, pa.string()), "first").cast(pa.float64()) for name in names]
        columns["scores"] = pa.StructArray.from_arrays(fields, names=names)
    return pa.table(columns)


def hf_files(hf: pa.Table, stage: str) -> dict[str, bytes]:
    """The files of `Dataset.save_to_disk`, written directly (deterministic bytes)."""
    shards = max(1, math.ceil(hf.nbytes / HF_SHARD_BYTES)) if hf.num_rows else 1
    per_shard = math.ceil(hf.num_rows / shards) if hf.num_rows else 0
    files: dict[str, bytes] = {}
    names = []
    for i in range(shards):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        part = hf.slice(i * per_shard, per_shard) if hf.num_rows else hf
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, hf.schema) as writer:
            writer.write_table(part, max_chunksize=HF_BATCH_ROWS)
        files[name] = sink.getvalue()
        names.append(name)
    digest = hashlib.sha256(b"".join(files[n] for n in names)).hexdigest()[:16]
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": digest, "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    info = {"citation": "", "description": f"Training data of stage {stage}, exported by recipec.", "homepage": "",
            "license": ""}
    files["state.json"] = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode("utf-8")
    files["dataset_info.json"] = (json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return files
