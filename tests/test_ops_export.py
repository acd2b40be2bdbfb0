"""recipec.ops.export: LLaVA JSON, the LLaVA-NeXT data YAML and a saved HF dataset, deterministic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from recipec import records
from recipec.ops import export
from recipec.ops.base import StepContext


def rec(source: str, i: int, n_images: int = 1, **scores: float) -> dict[str, Any]:
    images = [{"path": f"sub/{source}_{i}_{k}.png", "sha256": f"{i}{k}", "width": 8, "height": 8} for k in range(n_images)]
    conv = [{"from": "human", "value": "<image>\n" * n_images + f"Qué {i}?"}, {"from": "gpt", "value": "Ça."}]
    return {"id": records.record_id(source, images, conv), "source": source, "origin": f"{source}:{i}", "images": images,
            "conversations": conv, "category": "other", "data_type": "general", "image_tags": ["t"],
            "instruction_tags": [], "scores": list(scores.items()), "provenance": ["mix.s1"]}


def run(rows: list[dict[str, Any]], tmp_path: Path) -> tuple[pa.Table, dict[str, bytes]]:
    table = pa.Table.from_pylist(rows, schema=records.SCHEMA)
    chunks = list(export.run(StepContext("export.s1", "export", {"stage": "s1"}, "f", tmp_path), [table]))
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
    return [rec("b", 0, loss=1.5), rec("a", 1, n_images=2), rec("a", 2, n_images=0, score=9.0), rec("b", 3)]


def test_llava_json_and_yaml(tmp_path: Path, rows) -> None:
    _, files = run(rows, tmp_path)
    assert sorted(files) == ["hf/data-00000-of-00001.arrow", "hf/dataset_info.json", "hf/state.json",
                             "s1.json", "s1.yaml", "sources/a.json", "sources/b.json"]
    merged = json.loads(files["s1.json"])
    assert [e["id"] for e in merged] == [r["id"] for r in rows]  # the stage's order
    assert merged[0] == {"id": rows[0]["id"], "source": "b", "data_type": "general", "image": "b/sub/b_0_0.png",
                         "conversations": rows[0]["conversations"]}
    assert merged[1]["image"] == ["a/sub/a_1_0.png", "a/sub/a_1_1.png"]
    assert "image" not in merged[2]
    assert files["s1.json"].endswith(b"]\n") and "Qué".encode() in files["s1.json"]  # not ASCII-escaped
    data = yaml.safe_load(files["s1.yaml"])
    assert data == {"datasets": [{"json_path": "sources/a.json", "sampling_strategy": "all"},
                                 {"json_path": "sources/b.json", "sampling_strategy": "all"}]}
    per_source = json.loads(files["sources/a.json"])
    assert [e["id"] for e in per_source] == [rows[1]["id"], rows[2]["id"]]


def test_hf_dataset_loads(tmp_path: Path, rows) -> None:
    datasets = pytest.importorskip("datasets")
    _, files = run(rows, tmp_path)
    write(files, tmp_path / "out")
    ds = datasets.load_from_disk(str(tmp_path / "out" / "hf"))
    assert len(ds) == 4 and ds[0]["id"] == rows[0]["id"]
    assert ds[1]["image"] == ["a/sub/a_1_0.png", "a/sub/a_1_1.png"]
    assert ds[0]["scores"] == {"loss": 1.5, "score": None} and ds[2]["scores"] == {"loss": None, "score": 9.0}
    assert ds[0]["conversations"] == rows[0]["conversations"]


def test_files_are_deterministic(tmp_path: Path, rows) -> None:
    assert run(rows, tmp_path)[1] == run(rows, tmp_path)[1]


def test_an_empty_stage(tmp_path: Path) -> None:
    _, files = run([], tmp_path)
    assert files["s1.json"] == b"[]\n" and yaml.safe_load(files["s1.yaml"]) == {"datasets": []}
    datasets = pytest.importorskip("datasets")
    write(files, tmp_path / "out")
    assert len(datasets.load_from_disk(str(tmp_path / "out" / "hf"))) == 0
