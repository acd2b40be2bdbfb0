"""recipec.ops.ingest: formats, every reject reason, origins, conservation, determinism across workers."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from recipec import records
from recipec.ops import ingest
from recipec.ops.base import OperationError, StepContext

# ---- helpers ------------------------------------------------------------------------------------


def png(w: int = 40, h: int = 30, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def qa(question: str = "What is shown?", answer: str = "A picture.", images: int = 1) -> list[dict[str, str]]:
    return [{"from": "human", "value": "<image>\n" * images + question}, {"from": "gpt", "value": answer}]


def source(name: str = "src", fmt: str = "llava_jsonl", paths: tuple[str, ...] = ("data/*.jsonl",),
           images: str | None = "images", **extra: Any) -> dict[str, Any]:
    return {"name": name, "format": fmt, "paths": list(paths), "images": images, "category": "comprehensive",
            "data_type": extra.pop("data_type", "general"), **extra}


def run(tmp_path: Path, src: dict[str, Any], workers: int = 1) -> tuple[pa.Table, list, int]:
    ctx = StepContext(step_id=f"ingest.{src['name']}", op="ingest", params={"source": src}, fingerprint="f",
                      recipe_dir=tmp_path, workers=workers)
    chunks = list(ingest.run(ctx, []))
    table = pa.concat_tables([c.records for c in chunks]) if chunks else records.empty_table()
    rejects = [r for c in chunks for r in c.rejects]
    consumed = sum(c.consumed for c in chunks)
    assert consumed == table.num_rows + len(rejects)  # conservation
    assert not any(c.skipped for c in chunks)
    assert table.schema.equals(records.SCHEMA)
    return table, rejects, consumed


def write_lines(path: Path, lines: list[bytes | dict | str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line, ensure_ascii=False)
        out.append(line if isinstance(line, bytes) else line.encode("utf-8"))
    path.write_bytes(b"\n".join(out) + b"\n")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for i in range(4):
        (root / f"ok{i}.png").write_bytes(png(seed=i))
    (root / "sub").mkdir()
    (root / "sub" / "deep.png").write_bytes(png(seed=9))
    return root


# ---- every reason -------------------------------------------------------------------------------


def test_every_reject_reason_has_a_fixture(tmp_path: Path, images: Path) -> None:
    good = png(seed=5)
    (images / "truncated.png").write_bytes(good[: len(good) // 2])
    (images / "corrupt.png").write_bytes(b"this is not an image at all" * 10)
    (images / "bomb.png").write_bytes(png_bomb(5000, 5000))
    (images / "folder.png").mkdir()  # not a regular file
    lines: list[tuple[str, bytes | dict | str]] = [
        ("ok", {"image": "ok0.png", "conversations": qa(), "id": "first"}),
        ("json_malformed", '{"image": "ok1.png", "conversations": [}'),
        ("json_malformed", '{"image": "ok1.png", "score": NaN, "conversations": []}'),
        ("utf8_invalid", b'{"image": "ok1.png", "conversations": [{"from": "human", "value": "caf\xe9"}]}'),
        ("utf8_invalid", json.dumps({"image": "ok1.png", "conversations": qa(answer="\\ud800")}).replace("\\\\ud800", "\\ud800")),
        ("record_invalid", "[1, 2, 3]"),
        ("record_invalid", {"image": 7, "conversations": qa()}),
        ("record_invalid", {"image": "ok1.png", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}),
        ("record_invalid", {"image": {"bytes": "AAAA", "path": None}, "conversations": qa()}),
        ("record_invalid", {"image": "ok1.png", "images": ["ok2.png"], "conversations": qa()}),
        ("conversation_empty", {"image": "ok1.png", "conversations": []}),
        ("conversation_empty", {"image": "ok1.png"}),
        ("conversation_not_alternating", {"image": "ok1.png", "conversations": qa()[::-1]}),
        ("conversation_not_alternating", {"image": "ok1.png", "conversations": qa() + [{"from": "human", "value": "and?"}]}),
        ("conversation_not_alternating", {"image": "ok1.png", "conversations": [{"from": "user", "value": "<image>"}, {"from": "gpt", "value": "x"}]}),
        ("image_token_mismatch", {"image": "ok1.png", "conversations": qa(images=0)}),
        ("image_token_mismatch", {"image": "ok1.png", "conversations": qa(images=2)}),
        ("image_token_mismatch", {"images": ["ok1.png", "ok2.png"], "conversations": qa(images=1)}),
        ("image_token_mismatch", {"conversations": qa(images=1)}),
        ("image_token_mismatch", {"image": "ok1.png", "conversations": qa(answer="see <image>")}),
        ("image_missing", {"image": "nowhere.png", "conversations": qa()}),
        ("image_unreadable", {"image": "folder.png", "conversations": qa()}),
        ("image_corrupt", {"image": "corrupt.png", "conversations": qa()}),
        ("image_truncated", {"image": "truncated.png", "conversations": qa()}),
        ("image_too_large", {"image": "bomb.png", "conversations": qa()}),
        ("image_path_escapes_root", {"image": "../data/src.jsonl", "conversations": qa()}),
        ("image_path_escapes_root", {"image": "/etc/passwd", "conversations": qa()}),
        ("image_path_invalid", {"image": "a\\b.png", "conversations": qa()}),
        ("image_path_invalid", {"image": "", "conversations": qa()}),
        ("ok", {"image": "sub/../ok3.png", "conversations": qa(question="Another?")}),
        ("duplicate_id", {"image": "ok2.png", "conversations": qa(question="Other?"), "id": "first"}),
    ]
    write_lines(tmp_path / "data" / "src.jsonl", [line for _, line in lines])
    table, rejects, consumed = run(tmp_path, source(max_pixels=1_000_000))
    assert consumed == len(lines)
    expected = [(n + 1, reason) for n, (reason, _) in enumerate(lines) if reason != "ok"]
    got = [(int(r.origin.split(":")[1].split()[0]), r.reason) for r in rejects]
    assert got == expected
    assert {reason for _, reason in expected} == ingest.REASONS  # every reason is exercised
    assert table.column("origin").to_pylist() == ["data/src.jsonl:1 id=first", "data/src.jsonl:30"]
    assert table.column("source_id").to_pylist() == ["first", None]
    assert table.column("images").to_pylist()[1][0]["path"] == "ok3.png"  # normalised
    for r in rejects:
        assert r.source == "src" and r.detail and r.record
    dup = rejects[-1]
    assert dup.origin == "data/src.jsonl:31 id=first" and dup.id == ""
    assert dup.detail == "id 'first' is already the id of the record at data/src.jsonl:1 id=first"


def test_same_content_is_kept_for_dedup_with_unique_ids(tmp_path: Path, images: Path) -> None:
    """Identical records are the dedup step's business: ingest keeps them, with distinct ids."""
    same = {"image": "ok0.png", "conversations": qa()}
    write_lines(tmp_path / "data" / "src.jsonl", [{**same, "id": "a"}, {**same, "id": 7}, same, {**same, "id": "b"}])
    table, rejects, _ = run(tmp_path, source())
    assert rejects == [] and table.num_rows == 4
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == 4
    assert ids[0] == records.record_id("src", table.column("images").to_pylist()[0], qa())  # the content id
    assert ids[1] == records.record_id("src", table.column("images").to_pylist()[0], qa(), copy=1)
    assert table.column("source_id").to_pylist() == ["a", "7", None, "b"]


def test_pixel_limit_comes_from_the_source(tmp_path: Path, images: Path) -> None:
    write_lines(tmp_path / "data" / "a.jsonl", [{"image": "ok0.png", "conversations": qa()}])
    _, rejects, _ = run(tmp_path, source(max_pixels=40 * 30 - 1))
    assert [r.reason for r in rejects] == ["image_too_large"]
    table, rejects, _ = run(tmp_path, source(max_pixels=40 * 30))
    assert table.num_rows == 1 and not rejects


def test_a_source_without_an_image_root_rejects_its_images(tmp_path: Path) -> None:
    write_lines(tmp_path / "data" / "a.jsonl", [{"image": "x.png", "conversations": qa()},
                                                {"conversations": qa(images=0)}])
    table, rejects, _ = run(tmp_path, source(images=None))
    assert [r.reason for r in rejects] == ["image_path_invalid"]
    assert table.num_rows == 1


# ---- records ------------------------------------------------------------------------------------


def test_record_fields(tmp_path: Path, images: Path) -> None:
    write_lines(tmp_path / "data" / "a.jsonl", [
        {"id": "r1", "image": "ok0.png", "conversations": qa(), "loss": 0.5, "score": 8, "flag": True,
         "data_type": "ocr", "image_tags": ["cat"], "scores": {"relevance": 0.9}},
        "",  # a blank line is not a record
        {"images": ["ok1.png", "ok2.png"], "conversations": qa(images=2), "data_type": "bogus"},
        {"conversations": qa(images=0), "category": "caption"},
    ])
    table, rejects, consumed = run(tmp_path, source())
    assert not rejects and consumed == 3
    rows = table.to_pylist()
    first = rows[0]
    assert first["origin"] == "data/a.jsonl:1 id=r1"
    assert first["id"] == records.record_id("src", first["images"], first["conversations"])
    assert first["images"][0]["width"] == 40 and first["images"][0]["height"] == 30
    assert len(first["images"][0]["sha256"]) == 64
    assert dict(first["scores"]) == {"loss": 0.5, "score": 8.0, "relevance": 0.9}
    assert first["data_type"] == "ocr" and first["image_tags"] == ["cat"] and first["provenance"] == ["ingest.src"]
    assert rows[1]["origin"] == "data/a.jsonl:3" and len(rows[1]["images"]) == 2
    assert rows[1]["data_type"] == "general"  # an unknown type falls back to the source's
    assert rows[2]["images"] == [] and rows[2]["category"] == "comprehensive"  # category: the source's


def test_mixed_sources_need_a_type_per_record(tmp_path: Path, images: Path) -> None:
    write_lines(tmp_path / "data" / "a.jsonl", [{"image": "ok0.png", "conversations": qa(), "data_type": "ocr"},
                                                {"image": "ok1.png", "conversations": qa()}])
    table, rejects, _ = run(tmp_path, source(data_type="mixed"))
    assert table.column("data_type").to_pylist() == ["ocr"]
    assert [r.reason for r in rejects] == ["record_invalid"] and "mixed" in rejects[0].detail


def test_columns_map_the_source_names(tmp_path: Path, images: Path) -> None:
    write_lines(tmp_path / "data" / "a.jsonl", [
        {"uid": "u1", "picture": "ok0.png", "dialog": qa(), "kind": "caption"},
        {"uid": "u2", "picture": "ok1.png", "caption": "A red square."},
    ])
    cols = {"id": "uid", "image": "picture", "conversations": "dialog", "category": "kind", "text": "caption"}
    table, rejects, _ = run(tmp_path, source(columns=cols))
    assert not rejects
    rows = table.to_pylist()
    assert rows[0]["origin"].endswith("id=u1") and rows[0]["category"] == "caption"
    assert rows[1]["conversations"] == [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A red square."}]


def test_files_are_read_in_sorted_order(tmp_path: Path, images: Path) -> None:
    write_lines(tmp_path / "data" / "b.jsonl", [{"image": "ok1.png", "conversations": qa()}])
    write_lines(tmp_path / "data" / "a.jsonl", [{"image": "ok0.png", "conversations": qa()}])
    table, _, _ = run(tmp_path, source())
    assert table.column("origin").to_pylist() == ["data/a.jsonl:1", "data/b.jsonl:1"]


def test_nothing_matching_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OperationError, match="nothing matches"):
        run(tmp_path, source(paths=("data/none-*.jsonl",)))


# ---- formats ------------------------------------------------------------------------------------


def test_json_array_lines_and_recovery(tmp_path: Path, images: Path) -> None:
    good = [json.dumps({"image": f"ok{i}.png", "conversations": qa(question=f"Q{i}?")}) for i in range(3)]
    text = "[\n" + ",\n".join([good[0], '{"image": "ok1.png", "conversations": [oops]}', good[1],
                               "{'python': 'repr'}", good[2]]) + "\n]\n"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.json").write_text(text)
    table, rejects, consumed = run(tmp_path, source(fmt="llava_json", paths=("data/a.json",)))
    assert consumed == 5
    assert table.column("origin").to_pylist() == ["data/a.json:2", "data/a.json:4", "data/a.json:6"]
    assert [(r.origin, r.reason) for r in rejects] == [("data/a.json:3", "json_malformed"),
                                                        ("data/a.json:5", "json_malformed")]


def test_json_array_pretty_printed_and_invalid_bytes(tmp_path: Path, images: Path) -> None:
    records_ = [{"image": f"ok{i}.png", "conversations": qa(question=f"Q{i}?")} for i in range(3)]
    text = json.dumps(records_, indent=2).encode()
    bad = text.replace(b"Q1?", b"Q1\xff?")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.json").write_bytes(bad)
    table, rejects, consumed = run(tmp_path, source(fmt="llava_json", paths=("data/a.json",)))
    assert consumed == 3 and table.num_rows == 2
    assert [r.reason for r in rejects] == ["utf8_invalid"]
    assert table.column("origin").to_pylist()[0] == "data/a.json:2"


def test_json_array_cut_short(tmp_path: Path, images: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.json").write_text("[\n" + json.dumps({"image": "ok0.png", "conversations": qa()}) + ",\n")
    table, rejects, consumed = run(tmp_path, source(fmt="llava_json", paths=("data/a.json",)))
    assert table.num_rows == 1 and [r.reason for r in rejects] == ["json_malformed"] and consumed == 2


def test_parquet(tmp_path: Path, images: Path) -> None:
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    t = pa.table({"id": ["p0", "p1", "p2"], "image": ["ok0.png", "missing.png", None],
                  "conversations": pa.array([qa(), qa(), qa(images=0)], pa.list_(turn)),
                  "loss": [0.1, 0.2, float("nan")]})
    (tmp_path / "data").mkdir()
    pq.write_table(t, tmp_path / "data" / "a.parquet")
    table, rejects, consumed = run(tmp_path, source(fmt="parquet", paths=("data/*.parquet",)))
    assert consumed == 3
    assert table.column("origin").to_pylist() == ["data/a.parquet#0 id=p0", "data/a.parquet#2 id=p2"]
    assert [(r.origin, r.reason) for r in rejects] == [("data/a.parquet#1 id=p1", "image_missing")]
    assert [dict(s) for s in table.column("scores").to_pylist()] == [{"loss": 0.1}, {}]  # NaN is no score


def test_hf_dataset(tmp_path: Path, images: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"image": "ok0.png", "conversations": qa()},
                                     {"image": "ok1.png", "conversations": qa(images=0)}])
    ds.save_to_disk(str(tmp_path / "data" / "hf"))
    table, rejects, _ = run(tmp_path, source(fmt="hf_dataset", paths=("data/hf",)))
    assert table.column("origin").to_pylist() == ["data/hf#0"]
    assert [(r.origin, r.reason) for r in rejects] == [("data/hf#1", "image_token_mismatch")]


def test_image_folder(tmp_path: Path, images: Path) -> None:
    (images / "notes.txt").write_text("not an image")
    table, rejects, consumed = run(tmp_path, source(fmt="image_folder", paths=("images",), images=None))
    assert not rejects and consumed == 5
    assert [i[0]["path"] for i in table.column("images").to_pylist()] == [
        "ok0.png", "ok1.png", "ok2.png", "ok3.png", "sub/deep.png"]
    assert table.column("conversations").to_pylist() == [[]] * 5
    table, _, _ = run(tmp_path, source(fmt="image_folder", paths=("images/sub/*.png",), images="images"))
    assert table.column("images").to_pylist()[0][0]["path"] == "sub/deep.png"


# ---- determinism --------------------------------------------------------------------------------


def test_same_output_for_any_number_of_workers(tmp_path: Path, images: Path) -> None:
    lines: list[dict | str] = []
    for i in range(ingest.PIECE * 2 + 5):  # enough images for the process pool
        (images / f"w{i}.png").write_bytes(png(8, 8, seed=100 + i))
        lines.append({"image": f"w{i}.png", "conversations": qa(question=f"Q{i}")})
        if i % 17 == 0:
            lines.append({"image": f"gone{i}.png", "conversations": qa()})
    write_lines(tmp_path / "data" / "a.jsonl", lines)
    one = run(tmp_path, source(), workers=1)
    two = run(tmp_path, source(), workers=2)
    assert one[0].equals(two[0])
    assert [(r.origin, r.reason, r.detail) for r in one[1]] == [(r.origin, r.reason, r.detail) for r in two[1]]


def test_blocks_prepared_in_workers_give_the_same_records_in_order(tmp_path: Path, images: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Several blocks of lines, prepared in worker processes, with everything that depends on the
    records before it: copies numbered across blocks, an id reused blocks later, images."""
    monkeypatch.setattr(ingest, "BLOCK_BYTES", 8192)  # some 80 blocks
    (images / "shared.png").write_bytes(png(8, 8, seed=7))
    n = ingest.BLOCK * 2 + 300
    lines: list[dict | str] = []
    for i in range(n):
        if i % 500 == 3:
            lines.append('{"id": "broken%d", "conversations": [' % i)
        elif i % 700 == 5:
            lines.append("")
        elif i % 400 == 9:
            lines.append({"id": f"r{i}", "image": "shared.png", "conversations": qa(question=f"Q{i}")})
        elif i % 1000 == 11:
            lines.append({"id": "r0", "conversations": qa(question="reused id", images=0)})
        else:  # every 600th line repeats the content of line 1
            q = "same" if i % 600 == 1 else f"Q{i}"
            lines.append({"id": f"r{i}", "loss": i / 10, "conversations": qa(question=q, images=0)})
    lines.append('{"id": 123456789012345678901234567890, "conversations": %s}' % json.dumps(qa(images=0)))
    write_lines(tmp_path / "data" / "a.jsonl", lines)

    one = run(tmp_path, source(), workers=1)
    two = run(tmp_path, source(), workers=2)
    assert one[0].equals(two[0])
    assert [(r.origin, r.reason, r.detail, r.record) for r in one[1]] == \
        [(r.origin, r.reason, r.detail, r.record) for r in two[1]]
    table, rejects, consumed = two
    assert consumed == n - len([i for i in range(n) if i % 700 == 5 and i % 500 != 3]) + 1
    reasons = [r.reason for r in rejects]
    assert reasons.count("json_malformed") == len([i for i in range(n) if i % 500 == 3])
    assert reasons.count("duplicate_id") == len([i for i in range(n) if i % 1000 == 11 and i % 400 != 9
                                                 and i % 500 != 3 and i % 700 != 5])
    text = (tmp_path / "data" / "a.jsonl").read_text("utf-8").split("\n")
    for r in rejects:  # a reused id's reject carries its line, found again in its block
        if r.reason == "duplicate_id":
            assert r.record == text[int(r.origin.split(":")[1].split()[0]) - 1].strip()
            assert r.detail == "id 'r0' is already the id of the record at data/a.jsonl:1 id=r0"
    origins = table.column("origin").to_pylist()
    assert origins == sorted(origins, key=lambda o: int(o.split(":")[1].split()[0]))  # input order
    rows = table.to_pylist()
    same = [r for r in rows if r["conversations"][0]["value"] == "same"]
    assert [r["id"] for r in same] == [
        records.record_id("src", [], same[0]["conversations"], copy=k) for k in range(len(same))]
    shared = [r for r in rows if r["images"]]
    assert len(shared) == len([i for i in range(n) if i % 400 == 9 and i % 500 != 3 and i % 700 != 5])
    assert len({r["id"] for r in shared}) == len(shared)  # same image, different questions
    assert rows[-1]["source_id"] == "123456789012345678901234567890"  # past 64 bits, kept exactly
    assert dict(rows[0]["scores"]) == {"loss": 0.0}


@pytest.mark.parametrize("line", [
    b'{"id": 1e400, "conversations": []}', b'{"a": NaN}', b'{"id": "x", "v": "\\ud800"}', b'\xef\xbb\xbf{"id": 1}',
    b'{"id": 12345678901234567890123}', b'[1, 2]', b'{"a": 1} {"b": 2}', b'{"id": "\xff"}', b'  {"id": 7}\r\n',
    b'{"id": 1.5, "scores": {"x": 1e308}}', b'{"id": "a", "id": "b"}', b'{"text": "tab\there"}',
])
def test_the_fast_json_reader_reads_as_the_standard_library_does(line: bytes) -> None:
    fast = list(ingest._jsonl_line(line, "f:1"))
    slow = list(ingest._jsonl_line_stdlib(line, "f:1"))
    assert [(r.origin, r.text, repr(r.value), r.problem and (r.problem.reason, r.problem.detail)) for r in fast] == \
        [(r.origin, r.text, repr(r.value), r.problem and (r.problem.reason, r.problem.detail)) for r in slow]


def test_the_one_pass_check_accepts_only_what_the_full_checks_accept() -> None:
    from hypothesis import given, settings, strategies as st

    src = ingest.ir.Source.model_validate(source(data_type="mixed"))
    plain = ingest.ir.Source.model_validate(source())
    text = st.sampled_from(["", "<image>", "<image>\nQ", "a", "\ud800", "<image><image>"])
    turn = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", 1]), "value": text | st.none()})
    value = st.fixed_dictionaries({}, optional={
        "image": st.sampled_from(["a.png", 1, ["a.png", "b.png"], [], [1], {"path": "x"}]) | st.none(),
        "images": st.sampled_from([["a.png"], "a.png", [], None]),
        "conversations": st.lists(turn, max_size=4) | st.sampled_from([None, "x", {}]),
        "data_type": st.sampled_from(["ocr", "nope", 3, None]),
        "image_tags": st.sampled_from([["t"], "t", [1], None, ["\ud800"]]),
        "loss": st.sampled_from([1, 2.5, True, float("inf"), "1", None]),
        "scores": st.sampled_from([{"a": 1}, {"a": "x"}, [], None, {"b": float("nan")}]),
    })

    @settings(max_examples=3000, deadline=None)
    @given(value, st.booleans(), st.booleans())
    def check(record: dict[str, Any], mixed: bool, utf8: bool) -> None:
        s = src if mixed else plain
        if utf8 and any("\ud800" in json.dumps(record, ensure_ascii=False, default=str) for _ in [0]):
            utf8 = False  # the flag is only ever set for text orjson read, which has no lone surrogates
        fast = ingest._plain_candidate(record, s, "o", "t", utf8)
        try:
            full = ingest._candidate(record, s, "o", "t")
        except ingest._Bad:
            assert fast is None
            return
        assert fast is None or fast == full

    check()


def test_seen_in_bulk_counts_as_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_Seen` against its definition, a dict per key: times seen before, and the reference of the
    first sighting while fewer than RECENT new keys came after it (then they are forgotten)."""
    monkeypatch.setattr(ingest._Seen, "RECENT", 64)  # merges into the sorted arrays happen often
    monkeypatch.setattr(ingest._Seen, "RUNS", 3)
    rng = np.random.default_rng(5)
    keys = [int(k).to_bytes(2, "big") * 8 for k in rng.integers(0, 300, size=3000)]
    # keys that share their first 8 bytes with others, keys whose first halves `_halves` maps to one
    # value (equal keys sorted side by side), and digest-like ones the filter rules out
    keys += [int(a).to_bytes(8, "big") + int(b).to_bytes(8, "big") for a, b in rng.integers(0, 12, size=(2000, 2))]
    mix = np.uint64(0x9E3779B97F4A7C15)
    lows = rng.integers(0, 12, size=2000).astype(np.uint64)
    keys += [np.array([high, low], dtype=np.uint64).tobytes() for high, low in zip(np.uint64(7) ^ (lows * mix), lows)]
    assert len({ingest._halves(np.array([k], dtype="V16"))[0, 0] for k in keys[-2000:]}) == 1
    keys += [rng.bytes(16) for _ in range(2000)]
    keys = [keys[i] for i in rng.permutation(len(keys))]

    counts: dict[bytes, int] = {}
    recent: dict[bytes, int] = {}
    expected = []
    for ref, key in enumerate(keys):
        times = counts.get(key, 0)
        counts[key] = times + 1
        expected.append((times, recent.get(key, -1) if times else -1))
        if not times:
            recent[key] = ref
            if len(recent) >= 64:
                recent = {}

    for sizes in ([1], [37], [1, 200, 5, 63, 64, 65]):
        seen = ingest._Seen()
        got: list[tuple[int, int]] = []
        start, turn = 0, 0
        while start < len(keys):
            end = start + sizes[turn % len(sizes)]
            turn += 1
            times, firsts = seen.seen_all(np.array(keys[start:end], dtype="V16"), np.arange(start, min(end, len(keys))))
            got.extend(zip(times.tolist(), firsts.tolist()))
            start = end
        assert got == expected, sizes
    assert sum(t == 0 for t, _ in expected) == len(set(keys))
    assert any(f >= 0 for t, f in expected if t) and any(f < 0 for t, f in expected if t)


def test_a_json_array_read_in_small_windows_reads_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Elements, strings, numbers, multi-byte characters and bad bytes cut by window ends: the same
    records and rejects, origins included, as reading the file at once."""
    elements = []
    for i in range(40):
        element = json.dumps({"id": f"r{i}", "loss": 12345.678 + i, "conversations": qa(
            question=f"Qué {i} 日本語 " + "x" * (i * 7), images=0)}, ensure_ascii=False, indent=1 if i % 3 else None)
        if i % 9 == 4:
            element = element.replace('"from"', '"from', 1)  # malformed: resumes at the next element
        elements.append(element.replace("\n", "\n "))
    body = "\ufeff[\n " + ",\n ".join(elements) + "\n]\n"
    data = body.encode("utf-8").replace("Qué 14".encode(), b"Qu\xff 14")  # an undecodable byte
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.json").write_bytes(data)
    src = source(fmt="llava_json", paths=("data/a.json",), images=None)
    whole = run(tmp_path, src)
    monkeypatch.setattr(ingest._Text, "WINDOW", 7)
    windows = run(tmp_path, src)
    assert whole[0].equals(windows[0])
    assert [(r.origin, r.reason, r.detail, r.record) for r in whole[1]] == \
        [(r.origin, r.reason, r.detail, r.record) for r in windows[1]]
    assert whole[0].num_rows == 40 - len([i for i in range(40) if i % 9 == 4]) - 1
    assert {r.reason for r in whole[1]} == {"json_malformed", "utf8_invalid"}
    truncated = tmp_path / "data" / "a.json"
    truncated.write_bytes(data[: len(data) // 2])
    cut = run(tmp_path, src)
    assert cut[1][-1].detail == "the file ends before the array is closed"


def test_columnar_reading_gives_what_reading_line_by_line_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of lines in every shape, plain and hostile: pyarrow's columnar path and the per-line
    path prepare the same rows, texts, rejects and candidates, in the same order."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    from recipec.ops import ingest_columnar

    turn = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system"]),
                                  "value": st.sampled_from(["Q?", "A.", "<image>\nQ", "2020-01-01", "é 日本"])},
                                 optional={"extra": st.just(1)})
    plain_qa = st.just([{"from": "human", "value": "What?"}, {"from": "gpt", "value": "That."}])
    record = st.fixed_dictionaries({"conversations": plain_qa | st.lists(turn, max_size=4)}, optional={
        "id": st.sampled_from(["a1", "a1", 7, 2.5, True, "2020-01-01", 12345678901234567890123, None]),
        "data_type": st.sampled_from(["ocr", "math_reasoning", "nope", 3, None]),
        "image_tags": st.sampled_from([["cat"], [], ["a", None], "x", None]),
        "instruction_tags": st.sampled_from([["count"], None]),
        "loss": st.sampled_from([0.5, 2, None, "high", True, 12345678901234567]),
        "score": st.sampled_from([1.25, -3]),
        "scores": st.sampled_from([{"q": 1}, {"q": 0.5, "loss": 9, "t": "x"}, {}, [1], None]),
        "image": st.sampled_from(["a.png", ["a.png", "b.png"], [], None]),
        "category": st.sampled_from(["ocr", 5]),
    })
    QA = b'"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]'
    odd = st.sampled_from([b"", b"   ", b'{"id": "x", "conversations": [', b"[1, 2]", b'"text"',
                           b'{"a": NaN}', b'{"id": "d", "id": "e"}', b'{"a": 1} {"b": 2}', b'{"v": "\\ud800"}',
                           b'\xef\xbb\xbf{"conversations": []}', b'{"v": "\xff"}', b'{"v": "tab\x01"}',
                           b'{"a": Inf}', b'{%s, "loss": -Infinity}' % QA, b'{%s, "meta": {"v": [1.5, NaN]}}' % QA,
                           b'{%s, "loss": 1.5}' % QA, b'\xef\xbb\xbf{%s, "loss": 2.5}' % QA, b'{%s, "loss": 1e999}' % QA, b'{%s}\r' % QA, b'{%s}  ' % QA,
                           b'{"conversations": [{"from": "human", "value": "\\u003cimage>Q"}, {"from": "gpt", "value": "A"}]}'])
    line = st.one_of(record.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8")), odd)

    src = ingest.ir.Source.model_validate(source(images=None))
    mixed = ingest.ir.Source.model_validate(source(images=None, data_type="mixed"))

    def prepared(lines: list[bytes], s: Any, columnar: bool) -> tuple:
        monkeypatch.setattr(ingest_columnar, "eligible", lambda _source: columnar)
        block = ingest._Lines(b"".join(ln + b"\n" for ln in lines), "f.jsonl", 3, "id")
        p = ingest._with_block(ingest._prepare(block, s, "ingest.src"), block)
        texts = [p.text(row) for row in range(p.rows.num_rows)]
        for number, text in zip(p.rows.column("_line").to_pylist(), texts):  # the text its line read as
            assert text == next(ingest._jsonl_line(lines[number - 3] + b"\n", "o")).text
        return (p.kinds, p.rows.to_pylist(), texts, [(r.origin, r.reason, r.detail, r.record) for r in p.rejects],
                [(c.origin, c.image_paths, c.conversations, c.scores, c.source_id) for c in p.candidates])

    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(line, min_size=1, max_size=25), st.booleans())
    def check(lines: list[bytes], is_mixed: bool) -> None:
        s = mixed if is_mixed else src
        assert prepared(lines, s, True) == prepared(lines, s, False)

    check()
    many = [json.dumps({"id": f"r{i}", "loss": i / 4, "conversations": qa(images=0)}).encode() for i in range(300)]
    fast = prepared(many, src, True)
    assert fast == prepared(many, src, False) and len(fast[1]) == 300
    rows, accepted = ingest_columnar.read(b"".join(line + b"\n" for line in many), np.cumsum(
        [0] + [len(line) + 1 for line in many]), np.arange(1, 301), "f.jsonl", src, "ingest.src", ingest._KNOWN_FIELDS)
    assert accepted.all() and rows.num_rows == 300  # the plain records are all read columnar


def test_own_id_keys_built_whole_match_one_by_one() -> None:
    """The columnar keys of data set ids are `own_key`'s, for short ids (their own bytes), long ones
    (hashed) and nulls, in a sliced array too; distinct ids get distinct keys across the boundary."""
    from hypothesis import given, settings, strategies as st

    from recipec.ops import ingest_columnar

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.one_of(st.none(), st.text(max_size=20), st.text(alphabet="ab\x00é", max_size=17))),
           st.integers(0, 3))
    def check(ids: list[str | None], skip: int) -> None:
        want = b"".join(bytes(16) if i is None else ingest_columnar.own_key(i) for i in ids[skip:])
        assert ingest_columnar.own_keys(pa.array(ids, pa.string())[skip:]) == want

    check()
    ids = ["a" * k for k in range(40)] + ["a\x00", "a\x00\x00", "", "\x00"] + ["é" * k for k in range(12)]
    assert len({ingest_columnar.own_key(i) for i in ids}) == len(set(ids))


def test_a_reused_id_names_its_first_record_while_that_is_recent(tmp_path: Path, images: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With ids forgotten every RECENT new ones, a reused id's reject names the first record's origin
    exactly while that id is among the recent ones, rows and records with images alike, across
    blocks, and says "an earlier record" after: the definition, kept by the step."""
    monkeypatch.setattr(ingest._Seen, "RECENT", 40)
    monkeypatch.setattr(ingest, "BLOCK_BYTES", 2048)
    (images / "one.png").write_bytes(png(8, 8, seed=3))
    rng = np.random.default_rng(11)
    lines, expected = [], []
    first_line: dict[str, int] = {}
    new_before: dict[str, int] = {}  # id -> new ids seen before its first record
    for number in range(1, 601):
        reuse = first_line and rng.random() < 0.3
        sid = str(rng.choice(list(first_line))) if reuse else f"id{number}"
        image = rng.random() < 0.2
        lines.append({"id": sid, "conversations": qa(question=f"Q{number}", images=int(image)),
                      **({"image": "one.png"} if image else {})})
        if sid in first_line:
            recent = new_before[sid] // 40 == len(first_line) // 40
            where = f"record at data/a.jsonl:{first_line[sid]} id={sid}" if recent else "an earlier record of the source"
            expected.append((f"data/a.jsonl:{number} id={sid}", f"id {sid!r} is already the id of the {where}"))
        else:
            new_before[sid] = len(first_line)
            first_line[sid] = number
    write_lines(tmp_path / "data" / "a.jsonl", lines)
    for workers in (1, 2):
        _, rejects, _ = run(tmp_path, source(), workers=workers)
        got = [(r.origin, r.detail) for r in rejects if r.reason == "duplicate_id"]
        assert got == expected
    assert any("record at" in d for _, d in expected) and any("an earlier" in d for _, d in expected)
