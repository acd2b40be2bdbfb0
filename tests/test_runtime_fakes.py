"""Small but honest operations, a generated project and helpers for the runtime tests.

The real operations live in `recipec.ops` and are tested there; these fakes follow the same
contract (`run(ctx, inputs) -> Iterator[Chunk]`, the conservation law, deterministic chunks for any
number of workers) on tiny data, so the executor can be tested without them. The tests at the end
check that the fakes keep the contract, since every other runtime test trusts them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from recipec import records
from recipec.compiler import compile_or_raise
from recipec.ops.base import Chunk, OperationError, Reject, StepContext
from recipec.plan import Plan, build_plan
from recipec.runtime.executor import RunResult, execute
from recipec.runtime.report import deterministic_view, write_outputs
from recipec.runtime.store import Store

CHUNK = 4  # records per chunk, whatever the number of workers

# ---- fake operations ----------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=records.SCHEMA)


def _chunks_of(table: pa.Table) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, CHUNK):
        yield table.slice(start, CHUNK)


def _all(inputs: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(inputs) if inputs else records.empty_table()


def fake_ingest(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    src = ctx.params["source"]
    files = sorted(f for pattern in src["paths"] for f in glob.glob(str(ctx.recipe_dir / pattern)))
    if not files:
        raise OperationError(f"source {src['name']}: no file matches {src['paths']}")
    images_root = ctx.recipe_dir / src["images"] if src["images"] else None
    rows: list[dict[str, Any]] = []
    rejects: list[Reject] = []
    consumed = 0
    for path in files:
        rel = Path(path).relative_to(ctx.recipe_dir).as_posix()
        for lineno, line in enumerate(Path(path).read_text("utf-8").splitlines(), start=1):
            consumed += 1
            origin = f"{rel}:{lineno}"
            try:
                obj = json.loads(line)
            except ValueError:
                rejects.append(Reject("json_malformed", f"{origin}: not JSON", source=src["name"], origin=origin, record=line))
            else:
                images = []
                if obj.get("image"):
                    image = images_root / obj["image"]
                    if not image.is_file():
                        rejects.append(Reject("image_missing", f"{origin}: no image {obj['image']}", source=src["name"],
                                              origin=origin, record=line))
                        obj = None
                    else:
                        images = [{"path": obj["image"], "sha256": hashlib.sha256(image.read_bytes()).hexdigest(),
                                   "width": 1, "height": 1}]
                if obj is not None:
                    turns = [{"from": t["from"], "value": t["value"]} for t in obj["conversations"]]
                    rows.append({
                        "id": records.record_id(src["name"], images, turns), "source": src["name"], "origin": origin,
                        "images": images, "conversations": turns, "category": src["category"],
                        "data_type": src["data_type"], "image_tags": [], "instruction_tags": [],
                        "scores": [("loss", float(obj["loss"]))] if "loss" in obj else [],
                        "provenance": ["ingest"]})
            if consumed % CHUNK == 0:
                yield Chunk(records=_table(rows), rejects=rejects, consumed=CHUNK)
                rows, rejects = [], []
    if consumed % CHUNK:
        yield Chunk(records=_table(rows), rejects=rejects, consumed=consumed % CHUNK)


def fake_collect(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    for table in inputs:
        for part in _chunks_of(table):
            yield Chunk(records=part, consumed=part.num_rows)


def _content_digest(row: dict[str, Any]) -> str:
    text = records.text_of(row["conversations"])
    return hashlib.sha256(json.dumps([[i["sha256"] for i in row["images"]], text]).encode()).hexdigest()


def fake_dedup_exact(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    table = _all(inputs)
    rows = table.to_pylist()
    with ThreadPoolExecutor(max_workers=ctx.workers) as pool:  # ordered map: same result for any N
        digests = list(pool.map(_content_digest, rows))
    seen: dict[str, str] = {}
    for start in range(0, len(rows), CHUNK):
        kept, rejects = [], []
        for row, digest in zip(rows[start:start + CHUNK], digests[start:start + CHUNK]):
            if digest in seen:
                rejects.append(Reject("duplicate", f"same image and text as {seen[digest]}", id=row["id"],
                                      source=row["source"], origin=row["origin"], record=json.dumps(row["id"])))
            else:
                seen[digest] = row["id"]
                kept.append(row)
        ctx.progress.advance(len(rows[start:start + CHUNK]))
        yield Chunk(records=_table(kept), rejects=rejects, consumed=len(rows[start:start + CHUNK]))


_COMPARE = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, ">": lambda a, b: a > b}


def fake_threshold(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    cond = ctx.params["condition"]
    for part in _chunks_of(_all(inputs)):
        kept, rejects = [], []
        for row in part.to_pylist():
            scores = dict(row["scores"] or [])
            value = scores.get(cond["field"])
            ok = value is None or _COMPARE[cond["op"]](value, cond["value"])
            if cond["verb"] == "drop" and value is not None:
                ok = not ok
            if ok:
                kept.append(row)
            else:
                rejects.append(Reject(f"{cond['verb']}_{cond['field']}", f"{cond['field']} = {value}", id=row["id"],
                                      source=row["source"], origin=row["origin"], record=json.dumps(row["id"])))
        yield Chunk(records=_table(kept), rejects=rejects, consumed=part.num_rows)


def fake_mix(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    rows = _all(inputs).to_pylist()
    rng = random.Random(f"{ctx.seed}:{ctx.params['stage']}")
    chosen: list[dict[str, Any]] = []
    for entry in ctx.params["mix"]:
        names = set(ctx.params["pools"].get(entry["name"], [entry["name"]]))
        candidates = [r for r in rows if r["source"] in names]
        if entry["kind"] in ("random", "count", "first") and entry["count"] is not None:
            candidates = rng.sample(candidates, min(entry["count"], len(candidates)))
        chosen.extend(candidates)
    rng.shuffle(chosen)
    yield Chunk(records=_table(chosen), consumed=len(rows), skipped={"not_in_mix": len(rows) - len(chosen)})


def fake_export(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    table = _all(inputs)
    rows = table.to_pylist()
    lines = [json.dumps({"id": r["id"], "conversations": r["conversations"]}) for r in rows]
    images = sorted({(f"{r['source']}/{i['path']}", i["sha256"]) for r in rows for i in r["images"]})
    yield Chunk(records=table, consumed=table.num_rows,
                files={"data.jsonl": "".join(line + "\n" for line in lines).encode(),
                       "meta/count.txt": f"{table.num_rows}\n".encode(),
                       "images.sha256": "".join(f"{sha}  {name}\n" for name, sha in images).encode()})


FAKE_OPS = {"ingest": fake_ingest, "collect": fake_collect, "dedup_exact": fake_dedup_exact,
            "threshold": fake_threshold, "mix": fake_mix, "export": fake_export}


def slowed(operations: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The same operations, pausing after every chunk: room to kill a run in the middle of a step."""
    def wrap(op):
        def run(ctx, inputs):
            for chunk in op(ctx, inputs):
                yield chunk
                time.sleep(seconds)
        return run
    return {name: wrap(op) for name, op in operations.items()}


# ---- a generated project ------------------------------------------------------------------------

RECIPE = """\
recipe "rt" {{ seed = 7 }}

model m {{
  architecture = llava_onevision
  vision = "tiny://siglip"
  language = "tiny://qwen2"
  projector = mlp2x_gelu
}}

source a {{
  format = llava_jsonl
  path = "data/a/*.jsonl"
  images = "data/a/images"
  category = caption
  type = general
  scores = [loss]
  expect = 14
}}

source b {{
  format = llava_jsonl
  path = "data/b/*.jsonl"
  category = comprehensive
  type = text
  scores = [loss]
  expect = 10
}}

filter processing {{
  on = all
  dedup exact {{
    by = [image, text]
  }}
  keep loss <= {threshold}
}}

stage s1 {{
  model = m
  train = [projector]
  grid = 1x1
  lr = 1e-3
  mix {{
    a = all
  }}
}}

stage s2 {{
  model = m
  train = all
  grid = 2x2
  lr = 1e-5
  mix {{
    a = 5
    b = all
  }}
}}
"""

DATA_STEPS = ("export.s1", "export.s2")  # the fakes have no `train`


class Project:
    """A recipe and its data in a folder: 14 captioned images and 10 text samples, a few broken."""

    def __init__(self, root: Path, threshold: float = 2.0):
        self.root = root
        self.recipe_path = root / "rt.recipe"
        root.mkdir(parents=True, exist_ok=True)
        self.write_recipe(threshold)
        images = root / "data/a/images"
        images.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(14):
            name = f"img{i:02d}.png"
            if i != 9:  # img09 is referenced but missing
                (images / name).write_bytes(hashlib.sha256(f"pixels {i % 12}".encode()).digest() * 8)
            loss = round(0.25 * (i % 10), 2)
            lines.append(json.dumps({"image": name, "loss": loss, "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": f"Picture number {i % 12}."}]}))
        lines[5] = lines[5][: len(lines[5]) // 2]  # a line cut short
        (root / "data/a/part-0.jsonl").write_text("\n".join(lines[:7]) + "\n")
        (root / "data/a/part-1.jsonl").write_text("\n".join(lines[7:]) + "\n")
        (root / "data/b").mkdir(parents=True, exist_ok=True)
        text = [json.dumps({"loss": round(0.4 * i, 2), "conversations": [
            {"from": "human", "value": f"What is {i % 8} + 1?"}, {"from": "gpt", "value": str(i % 8 + 1)}]})
            for i in range(10)]
        (root / "data/b/text.jsonl").write_text("\n".join(text) + "\n")

    def write_recipe(self, threshold: float) -> None:
        self.recipe_path.write_text(RECIPE.format(threshold=threshold))

    def plan(self) -> Plan:
        return build_plan(compile_or_raise(self.recipe_path))


def run_project(project: Project, store: Path, out: Path | None = None, *, operations=None,
                until=DATA_STEPS, **kwargs) -> RunResult:
    st = Store(store)
    with st.locked():
        result = execute(project.plan(), store=st, recipe_dir=project.root,
                         operations=FAKE_OPS if operations is None else operations, until=until, **kwargs)
        if out is not None:
            write_outputs(result, st, out)
    return result


def out_snapshot(out: Path) -> dict[str, bytes]:
    """Every file of an --out folder that must be deterministic, report.json without run details."""
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_symlink():  # relative links differ with the folder's place: compare where they lead
            files[rel] = f"-> {os.path.realpath(path)}".encode()
            continue
        if not path.is_file() or rel == "run.log":
            continue
        data = path.read_bytes()
        if path.suffix == ".yaml":  # LLaVA-NeXT's data YAML holds OUT's absolute path, by necessity
            data = data.replace(os.path.abspath(out).encode(), b"OUT")
        if rel == "report.json":
            data = json.dumps(deterministic_view(json.loads(data)), indent=1).encode()
        files[rel] = data
    return files


# ---- the quickstart data, for runs through the real operations ----------------------------------

REPO = Path(__file__).resolve().parent.parent
QUICKSTART_RECIPE = """\
recipe "qs" { seed = 3 }

model m {
  architecture = llava_onevision
  vision = "tiny://siglip"
  language = "tiny://qwen2"
}

source captions {
  format = llava_jsonl
  path = "captions/*.jsonl"
  images = "captions/images"
  category = caption
  type = general
}

source general {
  format = llava_json
  path = "general/*.json"
  images = "general/images"
  category = comprehensive
  type = general
}

source ocr_docs {
  format = llava_jsonl
  path = "ocr_docs/*.jsonl"
  images = "ocr_docs/images"
  category = comprehensive
  type = ocr
}

source math {
  format = parquet
  path = "math/*.parquet"
  images = "math/images"
  category = comprehensive
  type = math_reasoning
}

source text {
  format = llava_jsonl
  path = "text/*.jsonl"
  category = comprehensive
  type = text
}

filter processing {
  on = all
  dedup exact {
    by = [image, text]
  }
  dedup phash {
    max_distance = 4
  }
}

stage s1 {
  model = m
  train = [projector]
  grid = 1x1
  lr = 1e-3
  mix {
    captions = all
  }
}

stage s2 {
  model = m
  train = all
  grid = 2x2
  lr = 1e-5
  mix {
    general = all
    ocr_docs = 3
    math = all
    text = all
  }
}
"""


def make_quickstart(root: Path, scale: float = 0.1) -> Path:
    """The quickstart data at `scale` under `root`, with a recipe over it; returns the recipe path."""
    subprocess.run([sys.executable, str(REPO / "examples/make_quickstart_data.py"), "--out", str(root),
                    "--scale", str(scale)], check=True, capture_output=True)
    recipe = root / "qs.recipe"
    recipe.write_text(QUICKSTART_RECIPE)
    return recipe


def registry_operations() -> set[str]:
    """The op names of the real registry."""
    from recipec.ops.registry import OPERATIONS

    return set(OPERATIONS)


def recipec_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recipec", *args], capture_output=True, text=True, **kwargs)


def child_main(argv: list[str]) -> None:
    """`python tests/test_runtime_fakes.py PROJECT STORE OUT SLOW WORKERS`: one run, for kill tests."""
    root, store, out, slow, workers = argv
    project = Project.__new__(Project)
    project.root = Path(root)
    project.recipe_path = project.root / "rt.recipe"
    operations = slowed(FAKE_OPS, float(slow)) if float(slow) else FAKE_OPS
    run_project(project, Path(store), Path(out), operations=operations, workers=int(workers))


# ---- the fakes keep the contract ----------------------------------------------------------------


def test_fakes_keep_the_conservation_law_and_are_deterministic(tmp_path):
    project = Project(tmp_path / "p")
    a = run_project(project, tmp_path / "s1", workers=1)
    b = run_project(project, tmp_path / "s2", workers=3)
    assert [o.key for o in a.outcomes] == [o.key for o in b.outcomes]
    for o in a.outcomes:
        assert o.records_in == o.records_out + sum(o.dropped.values())
    by_id = {o.id: o for o in a.outcomes}
    assert by_id["ingest.a"].dropped == {"image_missing": 1, "json_malformed": 1}
    assert by_id["filter.processing.1.dedup_exact"].dropped == {"duplicate": 4}  # 2 images, 2 texts


if __name__ == "__main__":
    child_main(sys.argv[1:])
