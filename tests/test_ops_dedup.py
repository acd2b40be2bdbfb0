"""recipec.ops.dedup: exact and pHash duplicates, which copy is kept, conservation, determinism."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from recipec import records
from recipec.ops import dedup, hamming
from recipec.ops.base import OperationError, StepContext


def smooth(seed: int, size: int = 128) -> Image.Image:
    """A smooth random picture: low-resolution noise scaled up, so resized copies keep their pHash."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return small.resize((size, size), Image.BICUBIC)


def save(img: Image.Image, path: Path, fmt: str = "PNG", **options: Any) -> dict[str, Any]:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return {"path": path.name, "sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "width": img.width,
            "height": img.height}


def rec(source: str, i: int, images: list[dict[str, Any]] | None = None, text: str | None = None) -> dict[str, Any]:
    images = images or []
    conv = [{"from": "human", "value": "<image>\n" * len(images) + (text or f"question {i}")},
            {"from": "gpt", "value": f"answer {text or i}"}]
    return {"id": records.record_id(source, images, conv), "source": source, "origin": f"{source}:{i}",
            "images": images, "conversations": conv, "category": "other", "data_type": "general", "image_tags": [],
            "instruction_tags": [], "scores": [], "provenance": ["ingest"]}


def run(op, params: dict[str, Any], rows: list[dict[str, Any]], recipe_dir: Path, workers: int = 1):
    ctx = StepContext(f"filter.{params.get('name', 'x')}", "dedup", params, "f", recipe_dir, workers=workers)
    table = pa.Table.from_pylist(rows, schema=records.SCHEMA)
    chunks = list(op(ctx, [table]))
    out = pa.concat_tables([c.records for c in chunks])
    rejects = [r for c in chunks for r in c.rejects]
    assert sum(c.consumed for c in chunks) == len(rows) == out.num_rows + len(rejects)  # conservation
    return out, rejects


def fake_image(name: str) -> dict[str, Any]:
    return {"path": f"{name}.png", "sha256": hashlib.sha256(name.encode()).hexdigest(), "width": 10, "height": 10}


# ---- exact --------------------------------------------------------------------------------------


def test_exact_keeps_the_first_in_collect_order(tmp_path: Path) -> None:
    cat, dog = fake_image("cat"), fake_image("dog")
    rows = [rec("a", 0, [cat], "same"), rec("a", 1, [dog], "same"), rec("b", 0, [cat], "same"),
            rec("b", 1, [cat], "other"), rec("c", 0, [cat], "same"), rec("b", 2, None, "t"), rec("a", 2, None, "t")]
    out, rejects = run(dedup.run_exact, {"by": ["image", "text"], "on": ["a", "b"]}, rows, tmp_path)
    assert [(r.origin, r.reason) for r in rejects] == [("b:0", "exact_duplicate"), ("a:2", "exact_duplicate")]
    assert rejects[0].detail == f"same image and text as {rows[0]['id']} (earlier in input order)"
    assert "c:0" in out.column("origin").to_pylist()  # not in `on`: untouched
    provenance = dict(zip(out.column("origin").to_pylist(), out.column("provenance").to_pylist()))
    assert provenance["a:0"] == ["ingest", "filter.x"] and provenance["c:0"] == ["ingest"]


def test_exact_keeps_the_copy_of_the_preferred_source(tmp_path: Path) -> None:
    cat = fake_image("cat")
    rows = [rec("a", 0, [cat], "same"), rec("b", 0, [cat], "same"), rec("c", 0, [cat], "same")]
    _, rejects = run(dedup.run_exact, {"by": ["image", "text"], "on": None, "prefer_sources": ["c", "b"]}, rows, tmp_path)
    assert [r.origin for r in rejects] == ["a:0", "b:0"]
    assert rejects[0].detail == f"same image and text as {rows[2]['id']} (source `c` is preferred to `a` (prefer_sources))"


def test_exact_by_image_or_by_text(tmp_path: Path) -> None:
    cat = fake_image("cat")
    rows = [rec("a", 0, [cat], "one"), rec("a", 1, [cat], "two"), rec("a", 2, None, "t"), rec("b", 3, None, "t")]
    _, rejects = run(dedup.run_exact, {"by": ["image"], "on": None}, rows, tmp_path)
    assert [r.origin for r in rejects] == ["a:1"]  # text-only records have no image key: they pass
    _, rejects = run(dedup.run_exact, {"by": ["text"], "on": None}, rows, tmp_path)
    assert [r.origin for r in rejects] == ["b:3"]


def test_exact_keys_tell_apart_contents_that_only_separators_would_merge(tmp_path: Path) -> None:
    """Turns and images whose texts hold the bytes a naive key would put between fields: the same
    bytes cut in other places are other contents, and the very same content is still one."""
    def with_turns(i: int, turns: list[tuple[str, str]], images: list[dict[str, Any]]) -> dict[str, Any]:
        row = rec("a", i, images)
        row["conversations"] = [{"from": who, "value": said} for who, said in turns]
        return row

    cat, dog = fake_image("cat"), fake_image("dog")
    rows = [with_turns(0, [("human", "a\x00b"), ("gpt", "c")], []),
            with_turns(1, [("human", "a\x00b\x01gpt\x00c")], []),
            with_turns(2, [("human", "a"), ("gpt", "b\x00c")], []),
            with_turns(3, [("human", "ab"), ("gpt", "c")], []),
            with_turns(4, [("human", "q"), ("gpt", "r")], [cat, dog]),
            with_turns(5, [("human", "q"), ("gpt", "r")], [dog, cat]),  # the same images, in another order
            with_turns(6, [("human", "a\x00b"), ("gpt", "c")], []),  # the same as the first
            with_turns(7, [("human", "q"), ("gpt", "r")], [cat, dog])]  # the same as the fifth
    _, rejects = run(dedup.run_exact, {"by": ["image", "text"], "on": None}, rows, tmp_path)
    assert [(r.origin, r.detail) for r in rejects] == [
        ("a:6", f"same image and text as {rows[0]['id']} (earlier in input order)"),
        ("a:7", f"same image and text as {rows[4]['id']} (earlier in input order)")]


# ---- pHash --------------------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    a_dir, b_dir = tmp_path / "a_images", tmp_path / "b_images"
    originals = [smooth(s) for s in range(6)]
    a = [save(img, a_dir / f"a{i}.png") for i, img in enumerate(originals)]
    near = save(originals[0].resize((200, 200), Image.LANCZOS), b_dir / "b_big.png")  # bigger copy of a0
    jpeg = save(originals[2], b_dir / "b_jpeg.jpg", "JPEG")  # recompressed copy of a2
    fresh = save(smooth(99), b_dir / "b_new.png")
    rows = [rec("a", i, [img]) for i, img in enumerate(a)]
    rows += [rec("b", 0, [near]), rec("b", 1, [jpeg, a[3]], text="two images"), rec("b", 2, [fresh]),
             rec("b", 3, None, "text only")]
    return rows, {"a": "a_images", "b": "b_images"}


def test_phash_keeps_the_first(tmp_path: Path, corpus) -> None:
    rows, roots = corpus
    out, rejects = run(dedup.run_phash, {"max_distance": 4, "keep": "first", "on": ["a", "b"], "roots": roots},
                       rows, tmp_path)
    assert [(r.origin, r.reason) for r in rejects] == [("b:0", "near_duplicate"), ("b:1", "near_duplicate")]
    assert rejects[0].detail.startswith(f"kept {rows[0]['id']} (distance ")
    assert rejects[1].detail.startswith(f"kept {rows[2]['id']} (distance ")
    assert {"b:2", "b:3"} <= set(out.column("origin").to_pylist())


def test_phash_keeps_the_largest(tmp_path: Path, corpus) -> None:
    rows, roots = corpus
    _, rejects = run(dedup.run_phash, {"max_distance": 4, "keep": "largest", "on": None, "roots": roots},
                     rows, tmp_path)
    assert rejects[0].origin == "a:0" and rejects[0].detail.startswith(f"kept {rows[6]['id']}")


def test_phash_only_judges_on(tmp_path: Path, corpus) -> None:
    rows, roots = corpus
    _, rejects = run(dedup.run_phash, {"max_distance": 4, "keep": "first", "on": ["b"], "roots": roots}, rows, tmp_path)
    assert rejects == []


def test_phash_same_output_for_any_number_of_workers(tmp_path: Path, corpus) -> None:
    rows, roots = corpus
    params = {"max_distance": 4, "keep": "first", "on": None, "roots": roots}
    one = run(dedup.run_phash, params, rows, tmp_path, workers=1)
    two = run(dedup.run_phash, params, rows, tmp_path, workers=2)
    assert one[0].equals(two[0]) and [r.detail for r in one[1]] == [r.detail for r in two[1]]


def test_phash_rejects_an_image_gone_since_ingest(tmp_path: Path, corpus) -> None:
    rows, roots = corpus
    (tmp_path / "a_images" / "a4.png").unlink()
    (tmp_path / "a_images" / "a5.png").write_bytes(b"garbage")
    _, rejects = run(dedup.run_phash, {"max_distance": 4, "keep": "first", "on": None, "roots": roots}, rows, tmp_path)
    reasons = {r.origin: r.reason for r in rejects}
    assert reasons["a:4"] == "image_missing" and reasons["a:5"] == "image_corrupt"


def test_phash_needs_the_roots(tmp_path: Path, corpus) -> None:
    rows, _ = corpus
    with pytest.raises(OperationError, match="no image folder"):
        run(dedup.run_phash, {"max_distance": 4, "keep": "first", "on": None, "roots": {"a": "a_images"}}, rows, tmp_path)


# ---- the keep rule and the radius search --------------------------------------------------------


def test_a_dropped_record_does_not_drop_its_neighbours() -> None:
    a = 0
    b = a ^ 0b111  # 3 bits from a
    c = b ^ (0b111 << 10)  # 3 bits from b, 6 from a
    result = dedup.near_duplicates(np.array([a, b, c], dtype=np.uint64), 4)
    assert result == [(1, 0, 3)]  # b goes (kept a); c stays: b, its only near neighbour, is gone


def test_largest_first_priority() -> None:
    hashes = np.array([0, 1, 3], dtype=np.uint64)
    assert dedup.near_duplicates(hashes, 2, areas=np.array([10, 30, 20])) == [(2, 1, 1), (0, 1, 1)]


def test_chains_and_clusters_agree_when_pairs_are_isolated() -> None:
    rng = np.random.default_rng(7)
    hashes = rng.integers(0, 2**63, size=200, dtype=np.uint64)
    copies = hashes[:40] ^ np.uint64(0b101)  # 2 bits away; random hashes are ~32 bits apart
    everything = np.concatenate([hashes, copies])
    dropped = {loser for loser, _, _ in dedup.near_duplicates(everything, 4)}
    kept = hamming.duplicate_clusters(everything, 4, np.arange(len(everything)))
    assert dropped == {i for i in range(len(everything)) if kept[i] != i} == set(range(200, 240))


# ---- the best copy ------------------------------------------------------------------------------


def save_jpeg(img: Image.Image, path: Path, quality: int) -> dict[str, Any]:
    return save(img, path, "JPEG", quality=quality)


@pytest.mark.parametrize("quality", [10, 30, 50, 75, 90, 95])
def test_jpeg_quality_is_estimated_from_the_tables(tmp_path: Path, quality: int) -> None:
    save_jpeg(smooth(1), tmp_path / "x.jpg", quality)
    fmt, estimate, size = dedup.file_fidelity(tmp_path / "x.jpg")
    assert fmt == "JPEG" and abs(estimate - quality) <= 2 and size == (tmp_path / "x.jpg").stat().st_size
    save(smooth(1), tmp_path / "x.png")
    assert dedup.file_fidelity(tmp_path / "x.png")[:2] == ("PNG", 100.0)


@pytest.fixture
def degraded(tmp_path: Path) -> tuple[list[dict[str, Any]], dict[str, str], set[str]]:
    """Originals and degraded copies (half size, low JPEG quality), in different sources and orders."""
    roots = {"orig": "orig", "copies": "copies", "more": "more"}
    originals, copies, more = [], [], []
    for k in range(6):
        img = smooth(100 + k, size=192)
        if k % 2:
            originals.append(rec("orig", k, [save_jpeg(img, tmp_path / "orig" / f"o{k}.jpg", 92)]))
        else:
            originals.append(rec("orig", k, [save(img, tmp_path / "orig" / f"o{k}.png")]))
        half = img.resize((96, 96), Image.LANCZOS)
        copies.append(rec("copies", k, [save(half, tmp_path / "copies" / f"half{k}.png")]))
        more.append(rec("more", k, [save_jpeg(img, tmp_path / "more" / f"low{k}.jpg", 25)]))
    # copies come first in input order for half of the groups, last for the others
    rows = copies[:3] + more[3:] + originals + copies[3:] + more[:3]
    return rows, roots, {r["id"] for r in originals}


def test_phash_keeps_every_original_whatever_the_order(tmp_path: Path, degraded) -> None:
    rows, roots, originals = degraded
    for order in (rows, rows[::-1]):
        out, rejects = run(dedup.run_phash, {"max_distance": 6, "on": None, "roots": roots}, order, tmp_path)
        assert set(out.column("id").to_pylist()) == originals
        assert len(rejects) == 12 and {r.reason for r in rejects} == {"near_duplicate"}
        by_source = {r.source: r for r in rejects}
        kept = {r["id"]: r for r in order}
        for r in rejects:
            winner = r.detail.split()[1]
            assert winner in originals and kept[winner]["source"] == "orig"
        assert "larger: 192x192 against 96x96 pixels" in by_source["copies"].detail
        assert "less lossy: " in by_source["more"].detail and "JPEG quality ~25" in by_source["more"].detail


def test_phash_first_keeps_degraded_copies_that_come_first(tmp_path: Path, degraded) -> None:
    rows, roots, originals = degraded
    out, rejects = run(dedup.run_phash, {"max_distance": 6, "keep": "first", "on": None, "roots": roots}, rows, tmp_path)
    assert not originals <= set(out.column("id").to_pylist())  # why `best` is the default
    assert all(r.detail.endswith("earlier in input order") for r in rejects)


def save_tagged(img: Image.Image, path: Path, tag: str) -> dict[str, Any]:
    """The same pixels and file size as another copy, other bytes: a text chunk of the same length."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("copy", tag)
    return save(img, path, pnginfo=info)


def test_records_showing_the_same_image_are_not_near_duplicates(tmp_path: Path) -> None:
    img = smooth(7)
    shared = save(img, tmp_path / "a" / "x.png")
    half = save(img.resize((img.width // 2, img.height // 2)), tmp_path / "a" / "half.png")
    rows = [rec("a", 0, [shared], "how many?"), rec("a", 1, [shared], "what colour?"), rec("a", 2, [half], "where?"),
            rec("a", 3, [half], "why?")]
    out, rejects = run(dedup.run_phash, {"max_distance": 4, "on": None, "roots": {"a": "a"}}, rows, tmp_path)
    assert out.column("origin").to_pylist() == ["a:0", "a:1"]  # one image, two instructions: both kept
    assert [r.origin for r in rejects] == ["a:2", "a:3"]  # the half-size copy goes, with all its records
    assert all(r.reason == "near_duplicate" and "larger" in r.detail for r in rejects)


def test_phash_prefers_a_source_between_equal_copies(tmp_path: Path) -> None:
    img = smooth(5)
    a, b = save_tagged(img, tmp_path / "a" / "x.png", "a"), save_tagged(img, tmp_path / "b" / "x.png", "b")
    rows = [rec("a", 0, [a], "one"), rec("b", 0, [b], "two")]
    roots = {"a": "a", "b": "b"}
    _, rejects = run(dedup.run_phash, {"max_distance": 4, "on": None, "roots": roots}, rows, tmp_path)
    assert [r.origin for r in rejects] == ["b:0"] and rejects[0].detail.endswith("earlier in input order")
    _, rejects = run(dedup.run_phash, {"max_distance": 4, "on": None, "roots": roots, "prefer_sources": ["b"]},
                     rows, tmp_path)
    assert [r.origin for r in rejects] == ["a:0"]
    assert rejects[0].detail.endswith("source `b` is preferred to `a` (prefer_sources)")


def test_phash_refuses_an_unknown_rule(tmp_path: Path, corpus) -> None:
    rows, roots = corpus
    with pytest.raises(OperationError, match="best"):
        run(dedup.run_phash, {"max_distance": 4, "keep": "prettiest", "on": None, "roots": roots}, rows, tmp_path)


def test_rank_with_ties_is_made_dense() -> None:
    hashes = np.array([0, 1, 3], dtype=np.uint64)
    assert dedup.near_duplicates(hashes, 2, rank=np.array([5, 5, 1])) == \
        dedup.near_duplicates(hashes, 2, rank=np.array([1, 2, 0]))


# ---- the split the Ray executor runs ------------------------------------------------------------


def split_equals_whole(op, params: dict[str, Any], rows: list[dict[str, Any]], recipe_dir: Path,
                       bounds: list[int]) -> None:
    """The per-record pass over consecutive pieces, combined, then the decision: the op's own output."""
    ctx = StepContext("filter.x", "dedup", params, "f", recipe_dir)
    table = pa.Table.from_pylist(rows, schema=records.SCHEMA)
    pieces = [table.slice(a, b - a) for a, b in zip([0, *bounds], [*bounds, len(rows)])]
    found = op.combine([op.per_record(ctx, [p]) for p in pieces])
    split, whole = list(op.decide(ctx, [table], found)), list(op(ctx, [table]))
    assert [c.records.equals(w.records) for c, w in zip(split, whole)] == [True] * len(whole)
    assert [(r.id, r.reason, r.detail) for c in split for r in c.rejects] == \
        [(r.id, r.reason, r.detail) for c in whole for r in c.rejects]
    assert [c.consumed for c in split] == [c.consumed for c in whole]


def test_exact_in_pieces_is_exact_whole(tmp_path: Path) -> None:
    cat, dog = fake_image("cat"), fake_image("dog")
    rows = [rec("a", 0, [cat], "same"), rec("a", 1, [dog], "same"), rec("b", 0, [cat], "same"),
            rec("b", 1, [cat], "other"), rec("c", 0, [cat], "same"), rec("b", 2, None, "t"), rec("a", 2, None, "t")]
    for prefer in ((), ("c", "b")):  # the pieces see the sources in other orders than the whole
        split_equals_whole(dedup.run_exact, {"by": ["image", "text"], "on": None, "prefer_sources": list(prefer)},
                           rows, tmp_path, [3, 5])


def test_phash_in_pieces_is_phash_whole(tmp_path: Path, corpus) -> None:
    rows, roots = corpus
    rows = rows[6:] + rows[:6]  # b first: the last piece sees `a` first, the whole sees `b` first
    for keep in ("best", "first"):
        split_equals_whole(dedup.run_phash, {"max_distance": 4, "keep": keep, "on": None, "roots": roots,
                                             "prefer_sources": ["a"]}, rows, tmp_path, [2, 3, 7])
