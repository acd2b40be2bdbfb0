"""recipec.ops.export: LLaVA JSON, chat messages, a saved HF dataset, Parquet, the training settings
and the image list; one type per field, deterministic bytes, images embedded on request."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from recipec import records
from recipec.ops import export
from recipec.ops.base import OperationError, StepContext
from recipec.ops.export_layout import data_yaml, format_image_list, parse_image_list

ALL = ["llava", "hf_dataset", "parquet", "messages"]


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + seed, 8), (seed * 20 % 256, 40, 90)).save(buf, "PNG")
    return buf.getvalue()


def rec(source: str, i: int, n_images: int = 1, own_id: str | None = None, **scores: float) -> dict[str, Any]:
    images = [{"path": f"sub/{source}_{i}_{k}.png", "sha256": hashlib.sha256(png(i * 3 + k)).hexdigest(), "width": 8,
               "height": 8} for k in range(n_images)]
    conv = [{"from": "human", "value": "<image>\n" * n_images + f"Qué {i}?"}, {"from": "gpt", "value": "Ça."}]
    return {"id": records.record_id(source, images, conv), "source": source, "origin": f"{source}:{i}", "images": images,
            "conversations": conv, "category": "other", "data_type": "general", "image_tags": ["t"],
            "instruction_tags": [], "scores": list(scores.items()), "provenance": ["mix.s1"], "source_id": own_id}


def write_images(rows: list[dict[str, Any]], root: Path) -> dict[str, str]:
    for row in rows:
        for k, image in enumerate(row["images"]):
            i = int(row["origin"].split(":")[1])
            path = root / row["source"] / image["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png(i * 3 + k))
    return {"a": "a", "b": "b"}


TRAINING = {"train": ["vision", "projector", "language"], "lr": 1e-5, "part_lr": {"vision": 2e-6}, "grid": [3, 3],
            "max_tiles": 9, "max_image_tokens": 7290, "epochs": 1.0, "warmup": 0.03, "schedule": "cosine",
            "weight_decay": 0.0, "max_length": 8192, "batch": 512,
            "model": {"name": "m", "vision": "google/siglip-so400m-patch14-384", "language": "Qwen/Qwen2.5-1.5B-Instruct",
                      "projector": "mlp2x_gelu", "vision_layer": -2}}


def run(rows: list[dict[str, Any]], tmp_path: Path, formats=None, embed: bool = False,
        roots: dict[str, str] | None = None) -> tuple[pa.Table, dict[str, bytes]]:
    table = pa.Table.from_pylist(rows, schema=records.SCHEMA)
    params: dict[str, Any] = {"stage": "s1", "training": TRAINING, "roots": roots or {}}
    if formats is not None:
        params["export"] = {"formats": formats, "images": "link", "embed_images": embed}
    chunks = list(export.run(StepContext("export.s1", "export", params, "f", tmp_path), [table]))
    out = pa.concat_tables([c.records for c in chunks])
    assert sum(c.consumed for c in chunks) == len(rows) == out.num_rows and out.equals(table)  # passes through
    assert not any(c.rejects or c.skipped for c in chunks)
    return out, {k: v for c in chunks for k, v in c.files.items()}


def write(files: dict[str, bytes], root: Path) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return [rec("b", 0, own_id="b-0", loss=1.5), rec("a", 1, n_images=2, own_id="a-1"), rec("a", 2, n_images=0, score=9.0),
            rec("b", 3, own_id="b-3")]


def test_the_default_is_llava_json_with_one_type_per_field(tmp_path: Path, rows) -> None:
    _, files = run(rows, tmp_path)
    assert sorted(files) == ["images.sha256", "s1.json", "s1.training.json"]
    merged = json.loads(files["s1.json"])
    assert [e["id"] for e in merged] == [r["id"] for r in rows]  # the stage's order
    assert merged[0] == {"id": rows[0]["id"], "source_id": "b-0", "source": "b", "category": "other",
                         "data_type": "general", "image": ["b/sub/b_0_0.png"], "conversations": rows[0]["conversations"]}
    assert merged[1]["image"] == ["a/sub/a_1_0.png", "a/sub/a_1_1.png"]
    assert "image" not in merged[2] and merged[2]["source_id"] is None  # text only: LLaVA-NeXT reads no key
    for field in ("id", "source", "data_type", "category", "conversations"):
        assert len({type(e[field]) for e in merged}) == 1, field
    assert {type(e["image"]) for e in merged if "image" in e} == {list}
    assert files["s1.json"].endswith(b"]\n") and "Qué".encode() in files["s1.json"]  # not ASCII-escaped


def test_every_format_on_request(tmp_path: Path, rows) -> None:
    _, files = run(rows, tmp_path, formats=ALL)
    assert sorted(files) == ["hf/data-00000-of-00001.arrow", "hf/dataset_info.json", "hf/state.json", "images.sha256",
                             "parquet/s1-00000-of-00001.parquet", "s1.json", "s1.messages.jsonl", "s1.training.json"]
    _, files = run(rows, tmp_path, formats=["messages"])
    assert "s1.json" not in files and "s1.messages.jsonl" in files
    with pytest.raises(OperationError, match="unknown export format"):
        run(rows, tmp_path, formats=["llava", "tfrecord"])


def test_messages_split_the_image_tokens(tmp_path: Path, rows) -> None:
    _, files = run(rows, tmp_path, formats=["messages"])
    lines = [json.loads(line) for line in files["s1.messages.jsonl"].decode().splitlines()]
    assert lines[1]["images"] == ["a/sub/a_1_0.png", "a/sub/a_1_1.png"] and lines[2]["images"] == []
    assert lines[1]["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Qué 1?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Ça."}]}]
    assert lines[0]["source_id"] == "b-0" and lines[2]["messages"][0]["content"] == [{"type": "text", "text": "Qué 2?"}]
    for line in lines:  # <image> tokens and images agree
        assert sum(p["type"] == "image" for m in line["messages"] for p in m["content"]) == len(line["images"])
    assert export._content_parts("Look: <image>\nand <image> here") == [
        {"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": "and "}, {"type": "image"},
        {"type": "text", "text": " here"}]


def test_training_settings_travel_with_the_export(tmp_path: Path, rows) -> None:
    _, files = run(rows, tmp_path)
    data = json.loads(files["s1.training.json"])
    assert data["stage"] == "s1" and data["samples"] == 4 and data["lr"] == 1e-5 and data["max_image_tokens"] == 7290
    args = data["llava_next_args"]
    assert args["mm_tunable_parts"] == "mm_vision_tower,mm_mlp_adapter,mm_language_model"
    assert args["image_aspect_ratio"] == "anyres_max_9" and args["image_grid_pinpoints"] == "(1x1),...,(3x3)"
    assert args["mm_vision_tower_lr"] == 2e-6 and args["vision_tower"] == "google/siglip-so400m-patch14-384"
    assert data["data"] == {"llava_json": "s1.json", "image_folder": "images"}
    stage1 = export.llava_next_args({**TRAINING, "train": ["projector"], "grid": [1, 1], "max_tiles": None, "part_lr": {}})
    assert stage1["mm_tunable_parts"] == "mm_mlp_adapter" and stage1["image_aspect_ratio"] == "square"


def test_the_image_list_names_each_image_once(tmp_path: Path, rows) -> None:
    _, files = run(rows + [rec("b", 0, own_id="again")], tmp_path)
    entries = parse_image_list(files["images.sha256"])
    assert [f"{s}/{p}" for _, s, p in entries] == ["a/sub/a_1_0.png", "a/sub/a_1_1.png", "b/sub/b_0_0.png",
                                                   "b/sub/b_3_0.png"]
    assert entries[0][0] == rows[1]["images"][0]["sha256"]
    odd = {"a/new\nline.png": "1" * 64, "a/back\\slash.png": "2" * 64, "a/plain.png": "3" * 64}
    assert {f"{s}/{p}": d for d, s, p in parse_image_list(format_image_list(odd))} == odd


def test_hf_dataset_and_parquet_load(tmp_path: Path, rows) -> None:
    datasets = pytest.importorskip("datasets")
    _, files = run(rows, tmp_path, formats=ALL)
    write(files, tmp_path / "out")
    ds = datasets.load_from_disk(str(tmp_path / "out" / "hf"))
    assert len(ds) == 4 and ds[0]["id"] == rows[0]["id"] and ds[0]["source_id"] == "b-0"
    assert ds[1]["image"] == ["a/sub/a_1_0.png", "a/sub/a_1_1.png"] and ds[2]["image"] == []
    assert ds[0]["scores"] == {"loss": 1.5, "score": None} and ds[2]["scores"] == {"loss": None, "score": 9.0}
    assert ds[0]["conversations"] == rows[0]["conversations"]
    table = pq.read_table(tmp_path / "out" / "parquet")
    assert table.column("source_id").to_pylist() == ["b-0", "a-1", None, "b-3"] and "_sha256" not in table.column_names
    pds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out/parquet/*.parquet"), split="train",
                                cache_dir=str(tmp_path / "cache"))
    assert pds["id"] == [r["id"] for r in rows]
    for name in ("s1.json", "s1.messages.jsonl"):
        js = datasets.load_dataset("json", data_files=str(tmp_path / "out" / name), split="train",
                                   cache_dir=str(tmp_path / "cache"))
        assert js["id"] == [r["id"] for r in rows]


def test_embedded_images_are_self_contained(tmp_path: Path, rows) -> None:
    datasets = pytest.importorskip("datasets")
    roots = write_images(rows, tmp_path)
    _, files = run(rows, tmp_path, formats=["hf_dataset", "parquet"], embed=True, roots=roots)
    write(files, tmp_path / "out")
    ds = datasets.load_from_disk(str(tmp_path / "out" / "hf"))
    assert isinstance(ds.features["image"].feature, datasets.Image)
    first = ds[1]["image"]
    assert [im.size for im in first] == [(11, 8), (12, 8)] and ds[2]["image"] == []
    raw = pq.read_table(tmp_path / "out" / "parquet").column("image").to_pylist()
    assert hashlib.sha256(raw[0][0]["bytes"]).hexdigest() == rows[0]["images"][0]["sha256"]
    assert raw[0][0]["path"] == "b/sub/b_0_0.png"
    (tmp_path / "b/sub/b_3_0.png").write_bytes(png(40))  # changed since ingest
    with pytest.raises(OperationError, match="b/sub/b_3_0.png changed since it was ingested"):
        run(rows, tmp_path, formats=["hf_dataset"], embed=True, roots=roots)
    with pytest.raises(OperationError, match="no image folder"):
        run(rows, tmp_path, formats=["hf_dataset"], embed=True, roots={"a": "a"})


def test_files_are_deterministic(tmp_path: Path, rows) -> None:
    assert run(rows, tmp_path, formats=ALL)[1] == run(rows, tmp_path, formats=ALL)[1]


def test_an_empty_stage(tmp_path: Path) -> None:
    _, files = run([], tmp_path, formats=ALL)
    assert files["s1.json"] == b"[]\n" and files["s1.messages.jsonl"] == b"" and files["images.sha256"] == b""
    datasets = pytest.importorskip("datasets")
    write(files, tmp_path / "out")
    assert len(datasets.load_from_disk(str(tmp_path / "out" / "hf"))) == 0


def test_the_data_yaml_has_absolute_paths_and_says_what_to_pass() -> None:
    import yaml

    text = data_yaml("s1", "/data/out dir/s1/s1.json", "/data/out dir/s1/images", 4).decode()
    assert yaml.safe_load(text) == {"datasets": [{"json_path": "/data/out dir/s1/s1.json", "sampling_strategy": "all"}]}
    assert "--data_path '/data/out dir/s1/s1.yaml' --image_folder '/data/out dir/s1/images'" in text
    assert "no --image_folder" in data_yaml("s1", "/o/s1/s1.json", None, 4).decode()


def run_stored(rows: list[dict[str, Any]], tmp_path: Path, sizes: list[int], work: str | None, formats=ALL,
               embed: bool = False, roots: dict[str, str] | None = None) -> dict[str, bytes]:
    """The op on a stored stage cut in shards of `sizes` rows (in a work folder `work`, or in memory):
    every file it hands over, by name."""
    from recipec.runtime.store import StoredTable, write_parquet

    table = pa.Table.from_pylist(rows, schema=records.SCHEMA)
    folder = tmp_path / f"stored-{'-'.join(map(str, sizes))}"
    folder.mkdir(exist_ok=True)
    paths, start = [], 0
    for k, size in enumerate(sizes):
        paths.append(folder / f"{k}.parquet")
        write_parquet(table.slice(start, size), paths[-1])
        start += size
    assert start == len(rows)
    params: dict[str, Any] = {"stage": "s1", "training": TRAINING, "roots": roots or {},
                              "export": {"formats": formats, "images": "link", "embed_images": embed}}
    ctx = StepContext("export.s1", "export", params, "f", tmp_path, work_dir=tmp_path / work if work else None)
    chunks = list(export.run(ctx, [StoredTable(paths, sizes)]))
    assert pa.concat_tables([c.records for c in chunks]).equals(table)
    files = {k: v for c in chunks for k, v in c.files.items()}
    moved = {k: p.read_bytes() for c in chunks for k, p in c.file_paths.items()}
    assert not set(files) & set(moved) and (work is not None or not moved)
    return {**files, **moved}


def test_the_table_formats_stream_into_shards_that_load_in_order(tmp_path: Path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(export, "BATCH_ROWS", 3)
    monkeypatch.setattr(export, "HF_SHARD_BYTES", 1)  # a shard per piece of 3 records
    monkeypatch.setattr(export, "PARQUET_SHARD_BYTES", 1)
    rows = [rec("ab"[i % 2], i, n_images=i % 3, own_id=f"o{i}", loss=float(i)) for i in range(10)]
    rows[-1]["scores"] = [("late", 2.0)]  # a score name only the last shard has: every shard gets its field
    files = run_stored(rows, tmp_path, [4, 0, 5, 1], "work")
    assert sorted(n for n in files if n.startswith(("hf/", "parquet/"))) == [
        *(f"hf/data-{i:05d}-of-00004.arrow" for i in range(4)), "hf/dataset_info.json", "hf/state.json",
        *(f"parquet/s1-{i:05d}-of-00004.parquet" for i in range(4))]
    write(files, tmp_path / "out")
    ds = datasets.load_from_disk(str(tmp_path / "out" / "hf"))
    assert ds["id"] == [r["id"] for r in rows] and ds["source_id"] == [f"o{i}" for i in range(10)]
    assert ds[0]["scores"] == {"late": None, "loss": 0.0} and ds[9]["scores"] == {"late": 2.0, "loss": None}
    assert ds[4]["image"] == ["a/sub/a_4_0.png"] and ds[3]["image"] == []
    pds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out/parquet/*.parquet"), split="train",
                                cache_dir=str(tmp_path / "cache"))
    assert pds["id"] == [r["id"] for r in rows] and pds["scores"] == ds["scores"]
    assert [pq.ParquetFile(tmp_path / "out/parquet" / f"s1-{i:05d}-of-00004.parquet").metadata.num_rows
            for i in range(4)] == [3, 3, 3, 1]
    # the same bytes in another run, in memory, and however the stage is cut in stored shards
    assert run_stored(rows, tmp_path, [4, 0, 5, 1], "again") == files
    assert run_stored(rows, tmp_path, [10], None) == files
    assert run_stored(rows, tmp_path, [1, 2, 7], "other") == files
    assert run(rows, tmp_path, formats=ALL)[1] == files


def test_embedded_images_stream_into_shards(tmp_path: Path, monkeypatch, rows) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(export, "BATCH_ROWS", 1)
    monkeypatch.setattr(export, "HF_SHARD_BYTES", 1)
    roots = write_images(rows, tmp_path)
    files = run_stored(rows, tmp_path, [3, 1], "work", formats=["hf_dataset", "parquet"], embed=True, roots=roots)
    assert len([n for n in files if n.endswith(".arrow")]) == 4 and "parquet/s1-00000-of-00001.parquet" in files
    write(files, tmp_path / "out")
    ds = datasets.load_from_disk(str(tmp_path / "out" / "hf"))
    assert isinstance(ds.features["image"].feature, datasets.Image) and ds["id"] == [r["id"] for r in rows]
    assert [im.size for im in ds[1]["image"]] == [(11, 8), (12, 8)] and ds[2]["image"] == []
    raw = pq.read_table(tmp_path / "out" / "parquet").column("image").to_pylist()
    assert [hashlib.sha256(im["bytes"]).hexdigest() for im in raw[1]] == [im["sha256"] for im in rows[1]["images"]]
    (tmp_path / "b/sub/b_3_0.png").write_bytes(png(40))  # the last record's image changed since ingest
    with pytest.raises(OperationError, match="b/sub/b_3_0.png changed since it was ingested"):
        run_stored(rows, tmp_path, [3, 1], "broken", formats=["hf_dataset"], embed=True, roots=roots)
