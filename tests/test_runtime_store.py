"""The store (keys, atomic steps, digests, deterministic shards) and its lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pytest

from recipec import records
from recipec.runtime.lock import StoreInUse, StoreLock
from recipec.runtime.store import (DataDigests, FileDigests, Store, StoreError, safe_artifact_name, step_key,
                                   write_parquet)


def sample_table(n: int = 3) -> pa.Table:
    return pa.Table.from_pylist([{
        "id": f"r{i}", "source": "a", "origin": f"a.jsonl:{i + 1}",
        "images": [{"path": f"{i}.png", "sha256": "0" * 64, "width": 4, "height": 3}],
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": str(i)}],
        "category": "caption", "data_type": "general", "image_tags": ["cat"], "instruction_tags": [],
        "scores": [("loss", 0.5 * i)], "provenance": ["ingest"]} for i in range(n)], schema=records.SCHEMA)


def commit(store: Store, key: str, table: pa.Table | None = None) -> dict:
    writer = store.writer(key)
    writer.add_records(table if table is not None else sample_table())
    writer.add_file("stage/data.jsonl", b"{}\n")
    return writer.commit({"step": "s", "op": "collect", "records_in": 3, "records_out": 3, "dropped": {}})


def test_keys_chain_everything_an_op_sees():
    def key(fingerprint="f" * 64, inputs=("a" * 64,), data=None, step_id="collect", seed=1):
        return step_key(fingerprint, list(inputs), data, step_id=step_id, seed=seed)

    base = key()
    assert base == key()
    assert base != key(fingerprint="e" * 64)
    assert base != key(inputs=["b" * 64])
    assert base != key(data="d" * 64)
    assert base != key(step_id="collect.2")
    assert base != key(seed=2)


def test_a_committed_step_is_complete_and_round_trips(tmp_path):
    store = Store(tmp_path)
    with store.locked():
        manifest = commit(store, "ab" * 32)
    assert store.done("ab" * 32) == manifest
    assert store.step_dir("ab" * 32) == tmp_path / "steps" / "ab" / ("ab" * 32)
    assert store.read_records("ab" * 32).equals(sample_table())
    assert store.read_records("ab" * 32).schema == records.SCHEMA
    assert store.path("ab" * 32, "files/stage/data.jsonl").read_bytes() == b"{}\n"
    assert store.read_rejects("ab" * 32).schema == records.REJECT_SCHEMA
    assert not (tmp_path / "tmp" / ("ab" * 32)).exists()


def test_an_uncommitted_step_is_not_done_and_its_debris_is_cleared(tmp_path):
    store = Store(tmp_path)
    with store.locked():
        writer = store.writer("cd" * 32)
        writer.add_records(sample_table())  # then the process dies
    assert store.done("cd" * 32) is None
    assert (tmp_path / "tmp" / ("cd" * 32)).exists()
    with store.locked():
        assert not (tmp_path / "tmp").exists()


def test_a_missing_or_resized_file_makes_a_step_not_done(tmp_path):
    store = Store(tmp_path)
    with store.locked():
        commit(store, "ef" * 32)
    shard = store.path("ef" * 32, "shard-00000.parquet")
    shard.write_bytes(shard.read_bytes() + b"x")
    assert store.done("ef" * 32) is None
    with store.locked():
        commit(store, "ef" * 32)  # replaces the damaged copy
    assert store.done("ef" * 32, verify=True) is not None


def test_verify_checks_content(tmp_path):
    store = Store(tmp_path)
    with store.locked():
        commit(store, "01" * 32)
    path = store.path("01" * 32, "files/stage/data.jsonl")
    path.write_bytes(b"[]\n")
    assert store.done("01" * 32) is not None
    assert store.done("01" * 32, verify=True) is None


def test_parquet_shards_are_byte_identical_for_the_same_table(tmp_path):
    write_parquet(sample_table(50), tmp_path / "a.parquet")
    time.sleep(0.01)
    write_parquet(sample_table(50), tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "", "a//b", "a\\b", "./a"])
def test_artifact_names_stay_inside_the_step(name):
    with pytest.raises(StoreError):
        safe_artifact_name(name)


def test_file_digests_are_remembered_by_size_and_mtime(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("one\n")
    old = time.time_ns() - 10**10
    os.utime(data, ns=(old, old))
    digests = FileDigests(tmp_path / "cache.json")
    first = digests.sha256(str(data))
    digests.save()
    again = FileDigests(tmp_path / "cache.json")
    assert again.sha256(str(data)) == first and again.hashed == 0
    data.write_text("two\n")  # same size, new mtime
    assert again.sha256(str(data)) != first and again.hashed == 1


def test_a_freshly_written_file_is_hashed_again(tmp_path):
    """Within the racy window a same-size rewrite could keep its mtime: never trust the cache then."""
    data = tmp_path / "data.jsonl"
    data.write_text("one\n")
    digests = FileDigests(tmp_path / "cache.json")
    digests.sha256(str(data))
    stat = data.stat()
    data.write_text("two\n")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert digests.sha256(str(data)) == FileDigests(tmp_path / "other.json").sha256(str(data))


def test_source_digest_covers_data_content_and_image_listing(tmp_path):
    (tmp_path / "d/images/sub").mkdir(parents=True)
    (tmp_path / "d/x.jsonl").write_text("{}\n")
    (tmp_path / "d/images/sub/1.png").write_bytes(b"png")
    source = {"format": "llava_jsonl", "paths": ["d/*.jsonl"], "images": "d/images"}

    def digest() -> str:
        return DataDigests(FileDigests(tmp_path / "cache.json")).source(source, tmp_path)

    first = digest()
    assert digest() == first
    (tmp_path / "d/images/sub/2.png").write_bytes(b"png")
    second = digest()
    assert second != first
    (tmp_path / "d/x.jsonl").write_text("[]\n")
    assert digest() != second


def test_image_listing_follows_links_inside_the_root_only(tmp_path):
    (tmp_path / "images/a").mkdir(parents=True)
    (tmp_path / "images/b").mkdir()
    (tmp_path / "images/a/1.png").write_bytes(b"png")
    (tmp_path / "images/a/loop").symlink_to(tmp_path / "images")
    (tmp_path / "images/a/to_b").symlink_to(tmp_path / "images/b")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "images/linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "images/everything").symlink_to("/")  # must not walk the filesystem
    digests = DataDigests(FileDigests(tmp_path / "cache.json"))
    first = digests.listing(str(tmp_path / "images"))
    (tmp_path / "elsewhere/2.png").write_bytes(b"png")  # outside the root: not its data
    assert DataDigests(FileDigests(tmp_path / "cache.json")).listing(str(tmp_path / "images")) == first
    (tmp_path / "images/b/3.png").write_bytes(b"png")  # inside, reached directly and through a link
    assert DataDigests(FileDigests(tmp_path / "cache.json")).listing(str(tmp_path / "images")) != first
    from recipec.runtime.store import _walk

    assert [rel for rel, _ in _walk(str(tmp_path / "images"))] == ["a/1.png", "a/to_b/3.png"]  # each real folder once


def test_a_linked_image_root_is_followed(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real/1.png").write_bytes(b"png")
    (tmp_path / "images").symlink_to(tmp_path / "real")
    from recipec.runtime.store import _walk

    assert [rel for rel, _ in _walk(str(tmp_path / "images"))] == ["1.png"]


def test_source_digest_does_not_depend_on_where_the_project_is(tmp_path):
    for name in ("one", "two"):
        (tmp_path / name / "d").mkdir(parents=True)
        (tmp_path / name / "d/x.jsonl").write_text("{}\n")
    source = {"format": "llava_jsonl", "paths": ["d/*.jsonl"], "images": None}
    digests = DataDigests(FileDigests(tmp_path / "cache.json"))
    assert digests.source(source, tmp_path / "one") == digests.source(source, tmp_path / "two")


# ---- the lock -----------------------------------------------------------------------------------


def test_a_second_holder_is_refused_with_the_pid(tmp_path):
    with StoreLock(tmp_path):
        with pytest.raises(StoreInUse) as error:
            StoreLock(tmp_path).acquire()
    assert str(error.value) == f"store {tmp_path} is in use by another recipec run (pid {os.getpid()})"
    with StoreLock(tmp_path):  # released
        pass


def test_the_lock_is_reentrant_for_its_holder(tmp_path):
    store = Store(tmp_path)
    with store.locked():
        with store.locked():
            assert store.lock.held
        assert store.lock.held
    assert not store.lock.held


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from recipec.runtime.lock import StoreLock
        StoreLock({str(tmp_path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(StoreInUse, match=f"pid {child.pid}"):
            StoreLock(tmp_path).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with StoreLock(tmp_path):
        pass
