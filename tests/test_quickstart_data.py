"""The quickstart dataset: its generator is deterministic, its planted lists match what is on disk."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from recipec.ops.images import ImageReject, inspect_image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "make_quickstart_data.py"
DATA = REPO / "examples" / "quickstart"
SOURCES = {  # source -> data file
    "captions": "captions.jsonl",
    "general": "general.json",
    "ocr_docs": "ocr_docs.jsonl",
    "math": "math.parquet",
    "text": "text.jsonl",
    "seed": "seed.jsonl",
}


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_quickstart_data", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _run(out: Path, scale: float) -> None:
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--scale", str(scale)],
                   check=True, capture_output=True, timeout=120)


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rejects() -> list[dict[str, Any]]:
    return json.loads((DATA / "planted_rejects.json").read_text())["rejects"]


def _duplicates() -> dict[str, list[list[str]]]:
    return json.loads((DATA / "planted_duplicates.json").read_text())


def _lines(source: str) -> list[bytes]:
    return (DATA / source / SOURCES[source]).read_bytes().split(b"\n")


def _records(source: str) -> list[dict[str, Any] | None]:
    """Records in file order; None where a line does not parse (the planted bad lines)."""
    if source == "math":
        return pq.read_table(DATA / "math" / "math.parquet").to_pylist()
    out: list[dict[str, Any] | None] = []
    lines = _lines(source)
    if source == "general":  # a JSON array written one record per line
        lines = [line.rstrip(b",") for line in lines[1:-2]]
    for line in lines:
        if not line:
            continue
        try:
            out.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            out.append(None)
    return out


def _image_list(record: dict[str, Any]) -> list[str]:
    image = record.get("image")
    return [] if image is None else [image] if isinstance(image, str) else list(image)


def _valid_images() -> list[str]:
    """Paths (relative to DATA) of the images of every record that is not a planted reject."""
    bad = {(r["source"], r.get("id")) for r in _rejects()}
    out = []
    for source in SOURCES:
        for rec in _records(source):
            if rec is not None and (source, rec["id"]) not in bad:
                out += [f"{source}/images/{name}" for name in _image_list(rec)]
    return out


# --------------------------------------------------------------------------------------------
# the generator


def test_generator_is_deterministic_and_owns_only_its_folders(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, 0.1)
    (a / "captions" / "images" / "stale.png").write_bytes(b"left over from an older version")
    (a / "notes.txt").write_text("not the generator's")
    _run(a, 0.1)  # again over the first output: same files, stale one gone, foreign one kept
    _run(b, 0.1)
    assert (a / "notes.txt").exists()
    (a / "notes.txt").unlink()
    ha, hb = _hashes(a), _hashes(b)
    assert ha == hb
    assert "captions/images/stale.png" not in ha
    assert {"planted_duplicates.json", "planted_rejects.json"} <= set(ha)
    assert sum("/images/" in name for name in ha) > 30


def test_committed_data_is_what_the_generator_writes(tmp_path: Path) -> None:
    # Names of every file, and the bytes of every data file. Image bytes depend on the codec
    # versions (Pillow's zlib and libjpeg), so they are compared by name only.
    _run(tmp_path, 1.0)
    fresh = _hashes(tmp_path)
    # written by hand, not generated: the data's README, the tag vocabulary and the taxonomy
    committed = {k: v for k, v in _hashes(DATA).items() if k not in ("README.md", "tags.txt", "taxonomy.yaml")}
    assert sorted(fresh) == sorted(committed)
    for name in fresh:
        if "/images/" not in name and not name.endswith(".parquet"):
            assert fresh[name] == committed[name], name


# --------------------------------------------------------------------------------------------
# the committed planted lists


def test_sources_have_their_files_and_fields() -> None:
    for source, data_file in SOURCES.items():
        assert (DATA / source / data_file).is_file()
    for source in ("general", "ocr_docs", "math"):
        recs = [r for r in _records(source) if r is not None]
        assert all(isinstance(r["loss"], float) for r in recs if "loss" in r)
        assert sum("loss" in r for r in recs) == len(recs)
    assert {r["data_type"] for r in _records("ocr_docs") if r} == {"ocr", "doc_chart_screen"}
    assert {r["data_type"] for r in _records("math")} == {"math_reasoning"}
    assert all(1 <= r["score"] <= 10 for r in _records("seed") if r)
    assert all("image" not in r for r in _records("text") if r)
    # multi-turn records exist
    assert any(len(r["conversations"]) >= 4 for r in _records("ocr_docs") if r)


def test_every_planted_reject_is_where_the_list_says() -> None:
    rejects = _rejects()
    assert len(rejects) == 18
    for r in rejects:
        source = r["source"]
        assert r["file"] == f"{source}/{SOURCES[source]}"
        if "row" in r:
            rec: dict[str, Any] | None = pq.read_table(DATA / r["file"]).to_pylist()[r["row"]]
        else:
            raw = _lines(source)[r["line"] - 1]
            if r["reason"] == "utf8_invalid":
                with pytest.raises(UnicodeDecodeError):
                    raw.decode("utf-8")
                continue
            if r["reason"] == "json_malformed":
                with pytest.raises(json.JSONDecodeError):
                    json.loads(raw.decode("utf-8"))
                continue
            rec = json.loads(raw.decode("utf-8").rstrip(","))
        assert rec is not None and rec["id"] == r["id"]
        conv = rec["conversations"]
        if r["reason"] == "conversation_empty":
            assert conv == []
        elif r["reason"] == "conversation_not_alternating":
            roles = [t["from"] for t in conv]
            assert roles != ["human", "gpt"] * (len(roles) // 2) + ["human"] * (len(roles) % 2)
        elif r["reason"] == "image_token_mismatch":
            tokens = sum(t["value"].count("<image>") for t in conv)
            assert tokens != len(_image_list(rec))
        else:
            assert r["reason"].startswith("image_")
            assert rec.get("image") == r["image"]


def test_listed_files_exist_or_are_missing_on_purpose() -> None:
    for r in _rejects():
        for name in ([r["image"]] if isinstance(r.get("image"), str) else r.get("image", [])):
            path = DATA / r["source"] / "images" / name
            if r["reason"] == "image_missing":
                assert not path.exists(), path
            elif r["reason"] != "image_path_escapes_root":
                assert path.is_file(), path
    dups = _duplicates()
    assert len(dups["exact"]) >= 5 and len(dups["near"]) >= 20
    for a, b in dups["exact"]:
        assert a != b and (DATA / a).read_bytes() == (DATA / b).read_bytes()
    for a, b, how in dups["near"]:
        assert how in ("resize", "recompress", "crop")
        assert (DATA / a).read_bytes() != (DATA / b).read_bytes()
    # every planted duplicate belongs to a valid record, so dedup sees it
    valid = set(_valid_images())
    assert {x for pair in dups["exact"] for x in pair} <= valid
    assert {x for a, b, _ in dups["near"] for x in (a, b)} <= valid


def test_inspect_image_rejects_each_planted_broken_image_with_its_reason() -> None:
    image_rejects = [r for r in _rejects() if r["reason"].startswith("image_") and r["reason"] != "image_token_mismatch"]
    assert len(image_rejects) == 9
    for r in image_rejects:
        with pytest.raises(ImageReject) as info:
            inspect_image(DATA / r["source"] / "images", r["image"])
        assert info.value.reason == r["reason"], r


def test_every_other_image_is_valid_and_small() -> None:
    images = _valid_images()
    assert len(images) > 250
    for rel in images:
        source, _, name = rel.split("/", 2)
        info = inspect_image(DATA / source / "images", name)
        assert 96 <= min(info.width, info.height) and max(info.width, info.height) <= 320, rel
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 6_000_000


def test_phash_separates_planted_near_duplicates_from_everything_else() -> None:
    gen = _generator()
    images = sorted(set(_valid_images()))
    bits = np.stack([gen.phash(Image.open(DATA / rel)) for rel in images])
    index = {rel: i for i, rel in enumerate(images)}
    dups = _duplicates()
    planted = {frozenset(p[:2]) for p in dups["exact"] + dups["near"]}
    for a, b in (p[:2] for p in dups["exact"] + dups["near"]):
        assert (bits[index[a]] != bits[index[b]]).sum() <= gen.MAX_NEAR, (a, b)
    distance = (bits[:, None, :] != bits[None, :, :]).sum(axis=-1)
    for i, j in zip(*np.nonzero(distance < gen.MIN_APART)):
        if i < j:
            assert frozenset((images[i], images[j])) in planted, (images[i], images[j], distance[i, j])
