"""The `--out` folder of a run: per stage its exported data, the rejects, `report.json` and the log.

Layout::

    OUT/
      <stage>/...              the files of the stage's export step (its record shards if it has none):
                               per the recipe's `export` setting, <stage>.json, hf/, parquet/,
                               <stage>.messages.jsonl, and always <stage>.training.json and
                               images.sha256 (recipec/ops/export.py)
      <stage>/<stage>.yaml     LLaVA-NeXT's data YAML, written here because its `json_path` is
                               absolute (the one file in OUT that depends on where OUT is); its
                               first lines give the `--data_path` and `--image_folder` to pass
      <stage>/images/<source>/<path>
                               the stage's image folder (`--image_folder`): exactly the images the
                               stage's records reference (images.sha256), never a whole source root,
                               each one per the recipe's `export.images`: `link` (default; a
                               relative symbolic link to the file inside its source's root, so a
                               moved OUT breaks every link at once and loaders fail loudly),
                               `copy` (checked against its sha256 while copied; OUT can then be
                               moved or copied to a cluster) or `hardlink` (a copy where the file
                               system cannot link). An image that is missing or resolves outside
                               its source's root fails the run's outputs (exit 1), naming it.
      <stage>/STALE.txt        only in a stage folder that this run did not write and that an
                               earlier version of the recipe did: why it is stale
      rejects/<step id>.jsonl  every record a step dropped with a reason: one JSON object a line with
                               step, id, source, origin, reason, detail, record (the record as JSON
                               text, or the raw input line when it never became a record)
      report.json              what ran and what came out (below)
      report.html              the same as one self-contained page with charts (report_html.py),
                               rewritten only when report.json's deterministic part changes
      run.log                  the log of every run into this folder, appended (cli/run.py)

`report.json` holds `recipe`, `fingerprint`, `seed`, `selection` (the run's --until/--only),
`status` (`complete`; `partial` for --until/--only/--data-only; `failed`, with `failed_step`: its
`id`, `op` and `message`), `steps` (per step that finished: `id`, `op`, `key`, `records_in`,
`records_out`, `dropped` by reason, `rejects` (the file, or null), `seconds`, `cached`), `stages`
(per stage: `planned` and `realised` composition by source, data type and category,
`max_image_tokens`, `trainable_params`, `outputs`, `exports` (format -> its path), `training`,
`image_folder`, `data_path`), `stale` (stage folders left from an earlier recipe), `warnings`
(`shortfalls`: a stage that realised fewer samples than planned, or none, and a filter that dropped
every record it got; each with `kind`, `message` and the stage or step; `run --strict` exits 1 on
any) and `run` (with `recipe_file`, the recipe's absolute path, for `recipec package`). For
every step `records_in == records_out + sum(dropped.values())`. A failed run writes the report and
the outputs of every step that finished before the failure.

Stale stages. The index (below) remembers, per stage folder, the plan fingerprint of the export
that wrote it. A full run rewrites every stage and removes the folders of stages the recipe no
longer has. A partial or failed run leaves the stages it did not export alone, but one whose stage
is gone from the recipe, or whose export the recipe now plans differently, gets `STALE.txt` and is
listed in `stale`, until a run exports it again (or a full run removes it).

Determinism: everything in OUT is a function of the recipe, the data and the seed, except what
describes this particular run: `run.log`, in `report.json` the `run` object (total seconds,
workers, store) and each step's `seconds` and `cached`, and the absolute paths in `<stage>.yaml`.
`RUN_SPECIFIC` names those report keys and `deterministic_view` removes them.

Rewriting the outputs on every run would make a no-op re-run slow on big data, so the store keeps an
index per OUT folder (`STORE/outputs/<digest of its path>.json`): for each file written, what it
was made from and its (size, mtime_ns, inode) right after writing; for each image folder, a digest
of its list, mode and roots. A file whose stat and origin still match is left alone; anything else
is written again (temporary file, then rename). Files recorded there and no longer produced are
removed: all of them after a full run, and within the stages and steps it covered after an
`--until`/`--only` run. Files recipec did not write are never touched, except inside an image
folder, which holds exactly the stage's images.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from recipec import ir
from recipec.diagnostics import RecipecError
from recipec.ops.export_layout import IMAGE_LIST, data_yaml, parse_image_list  # no pyarrow
from recipec.runtime.executor import RunResult, StepOutcome
from recipec.runtime.progress import RunProgress, StepProgress
from recipec.runtime.store import Store, atomic_write, canonical

REPORT_VERSION = 2
RUN_SPECIFIC = ("run", "seconds", "cached", "models")
_REJECTS_FORMAT = 1  # bump when the rejects lines change shape, so existing files are rewritten
STALE_NOTE = "STALE.txt"
HTML_REPORT = "report.html"
HTML_FORMAT = 1  # bump when the page changes, so existing pages are rewritten
log = logging.getLogger("recipec.run")


class OutputError(RecipecError):
    """The outputs cannot be written as the recipe asks (an image gone or outside its root)."""


@dataclass
class Failure:
    """The step a run stopped at, for the report of a failed run."""

    step_id: str
    op: str
    message: str


class OutcomeRecorder(RunProgress):
    """A progress display that also keeps every finished step's outcome, so a run that fails
    midway can still write the outputs and the report of what finished."""

    def __init__(self, inner: RunProgress):
        self.inner = inner
        self.outcomes: list[StepOutcome] = []

    def start(self, count: int) -> None:
        self.inner.start(count)

    def step_started(self, step: Any, position: int, total: int | None) -> StepProgress:
        return self.inner.step_started(step, position, total)

    def step_finished(self, position: int, outcome: StepOutcome, progress: StepProgress | None = None) -> None:
        self.outcomes.append(outcome)
        self.inner.step_finished(position, outcome, progress)

    def message(self, text: str) -> None:
        self.inner.message(text)

    def close(self) -> None:
        self.inner.close()


def deterministic_view(report: dict[str, Any]) -> dict[str, Any]:
    """`report` without what describes one particular run (timings, cache hits, workers, store)."""
    view = {k: v for k, v in report.items() if k != "run"}
    view["steps"] = [{k: v for k, v in s.items() if k not in RUN_SPECIFIC} for s in report["steps"]]
    return view


def reserved_names() -> set[str]:
    """Names at the top of OUT that are not stage folders."""
    return {"rejects", "report.json", "report.html", "run.log"}


def image_roots(recipe: ir.Recipe) -> dict[str, str]:
    """Each dataset's image root (relative to the recipe); a synthesized set shares its seeds' one."""
    roots = {name: src.images for name, src in recipe.sources.items() if src.images}
    for name, syn in recipe.syntheses.items():
        seeds = {roots.get(s) for s in syn.from_sources}
        if len(seeds) == 1 and None not in seeds:
            roots[name] = seeds.pop()
    return roots


def build_report(result: RunResult, store: Store, *, failure: Failure | None = None,
                 stale: Sequence[dict[str, str]] = (), recipe_file: str | os.PathLike | None = None) -> dict[str, Any]:
    plan = result.plan
    recipe = plan.recipe
    outcomes = {o.id: o for o in result.outcomes}
    steps = []
    for o in result.outcomes:
        steps.append({
            "id": o.id, "op": o.op, "key": o.key, "records_in": o.records_in, "records_out": o.records_out,
            "dropped": dict(sorted(o.dropped.items())),
            "rejects": f"rejects/{o.id}.jsonl" if o.manifest["rejects"] else None,
            "seconds": round(o.seconds, 3), "cached": o.cached,
            # model steps: per model, its identity, requests (sent by the run that computed the
            # step, or answered from the request cache) and tokens
            **({"models": o.manifest["models"]} if o.manifest.get("models") else {}),
        })
    stages = []
    for stage in recipe.stages:
        mix = _stage_step(result, "mix", stage.name)
        export = _stage_step(result, "export", stage.name)
        realised = None
        if mix in outcomes:
            realised = _composition(outcomes[mix].manifest.get("composition"), outcomes[mix].records_out)
        exported = outcomes[export].manifest if export in outcomes else None
        names = _file_names(exported) if exported else set()
        stages.append({
            "name": stage.name,
            "planned": {"total": stage.composition.total, "by_source": dict(stage.composition.by_source),
                        "by_data_type": dict(stage.composition.by_data_type),
                        "by_category": dict(stage.composition.by_category)},
            "realised": realised,
            "max_image_tokens": stage.max_image_tokens,
            "trainable_params": stage.trainable_params,
            "mix_step": mix,
            "export_step": export,
            "outputs": _stage_outputs(exported, stage.name) if exported else None,
            "exports": _exports(names, stage.name) if exported else None,
            "training": f"{stage.name}/{stage.name}.training.json" if f"{stage.name}.training.json" in names else None,
            "image_folder": f"{stage.name}/images" if exported and _has_images(store, outcomes[export]) else None,
            "data_path": f"{stage.name}/{stage.name}.yaml" if f"{stage.name}.json" in names else None,
        })
    if failure is not None:
        status = "failed"
    else:
        status = "complete" if result.full else "partial"
    run = {"seconds": round(result.seconds, 3), "workers": result.workers, "store": str(store.root)}
    if recipe_file is not None:
        run["recipe_file"] = str(Path(recipe_file).absolute())
    # each trained stage's checkpoint, where the store keeps it (from_pretrained loads the folder)
    trained = {plan.steps[o.id].params["stage"]["name"]: str(store.path(o.key, "files/checkpoint"))
               for o in result.outcomes if o.op == "train" and store.path(o.key, "files/checkpoint").is_dir()}
    if trained:
        run["checkpoints"] = trained
    return {
        "report_version": REPORT_VERSION,
        "recipe": recipe.name,
        "fingerprint": ir.fingerprint(recipe),
        "seed": recipe.seed,
        "selection": {"until": result.until, "only": result.only, "data_only": result.data_only},
        "status": status,
        "failed_step": {"id": failure.step_id, "op": failure.op, "message": failure.message} if failure else None,
        "steps": steps,
        "stages": stages,
        "stale": list(stale),
        "warnings": shortfalls(steps, stages),
        "run": run,
    }


# ops that only ever remove records: one that leaves none of a non-empty input empties the data
FILTER_OPS = frozenset({"threshold", "percentile", "dedup_exact", "dedup_phash", "clean",
                        "judge_relevance", "judge_score"})


def shortfalls(steps: Sequence[dict[str, Any]], stages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Loud warnings: a filter that dropped every record it got, a stage that realised fewer samples
    than planned or none at all. `recipec run --strict` fails on any of them."""
    found: list[dict[str, Any]] = []
    for s in steps:
        if s["op"] in FILTER_OPS and s["records_in"] > 0 and s["records_out"] == 0:
            reasons = ", ".join(f"{r} {n}" for r, n in s["dropped"].items())
            found.append({"kind": "filter_emptied", "step": s["id"],
                          "message": f"step {s['id']} dropped all {s['records_in']} records it got ({reasons})"})
    for st in stages:
        realised = st["realised"]
        if realised is None:
            continue
        planned = st["planned"]["total"]
        got = realised["total"]
        if got == 0:
            want = f"planned {planned} samples" if planned is not None else f"planned {', '.join(st['planned']['by_source'])}"
            found.append({"kind": "stage_empty", "stage": st["name"], "planned": planned, "realised": 0,
                          "message": f"stage {st['name']} is empty: {want}, realised none"})
        elif planned is not None and got < planned:
            short = {src: (n, realised.get("by_source", {}).get(src, 0))
                     for src, n in st["planned"]["by_source"].items()
                     if n is not None and realised.get("by_source", {}).get(src, 0) < n}
            detail = "; ".join(f"{src} {have} of {want}" for src, (want, have) in short.items())
            found.append({"kind": "stage_short", "stage": st["name"], "planned": planned, "realised": got,
                          "short_sources": {src: {"planned": w, "realised": h} for src, (w, h) in short.items()},
                          "message": f"stage {st['name']} realised {got} of {planned} planned samples"
                                     + (f" ({detail})" if detail else "")})
    return found


def _composition(counts: dict[str, Any] | None, total: int) -> dict[str, Any]:
    """A step's output by source, data type and category (just its total for non-record outputs)."""
    if counts is None:
        return {"total": total}
    return {"total": total, **{k: dict(sorted(counts[k].items())) for k in ("by_source", "by_data_type", "by_category")}}


def _stage_step(result: RunResult, op: str, stage: str) -> str | None:
    for step in result.plan.steps.values():
        if step.op == op and step.params.get("stage") == stage:
            return step.id
    return None


def _file_names(manifest: dict[str, Any]) -> set[str]:
    return {e["name"].removeprefix("files/") for e in manifest["files"]}


def _exports(names: set[str], stage: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if f"{stage}.json" in names:
        found["llava"] = {"json": f"{stage}/{stage}.json", "yaml": f"{stage}/{stage}.yaml"}
    if any(n.startswith("hf/") for n in names):
        found["hf_dataset"] = f"{stage}/hf"
    parquet = sorted(f"{stage}/{n}" for n in names if n.startswith("parquet/"))
    if parquet:
        found["parquet"] = parquet
    if f"{stage}.messages.jsonl" in names:
        found["messages"] = f"{stage}/{stage}.messages.jsonl"
    return found


def _stage_outputs(manifest: dict[str, Any], stage: str) -> list[str]:
    """Paths under OUT of a stage's exported files."""
    if manifest["files"]:
        return [f"{stage}/{e['name'].removeprefix('files/')}" for e in manifest["files"]]
    return [f"{stage}/{e['name']}" for e in manifest["records"]]


def _image_list_entry(manifest: dict[str, Any]) -> dict[str, Any] | None:
    return next((e for e in manifest["files"] if e["name"] == f"files/{IMAGE_LIST}"), None)


def _has_images(store: Store, outcome: StepOutcome) -> bool:
    entry = _image_list_entry(outcome.manifest)
    return entry is not None and entry["bytes"] > 0


def _export_settings(result: RunResult, step_id: str) -> dict[str, Any]:
    return result.plan.steps[step_id].params.get("export") or {}


def write_outputs(result: RunResult, store: Store, out_dir: str | os.PathLike, *,
                  failure: Failure | None = None, recipe_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Fill OUT from the store; returns the report. Call it while holding the store's lock.

    With `failure`, `result` holds the steps that finished before it: their outputs are written,
    nothing else is removed, and the report says the run failed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = _OutputIndex(store, out)
    full = result.full and failure is None
    produced: set[str] = set()
    trees: set[str] = set()  # image folders written whole
    covered_dirs: set[str] = set()  # where files no longer produced are removed after a partial run
    covered_files: set[str] = set()
    plan = result.plan
    recipe = plan.recipe
    roots = image_roots(recipe)
    exported: dict[str, str] = {}  # stage -> export fingerprint, for this run's exports

    for o in result.outcomes:
        if o.op == "export":
            stage = plan.steps[o.id].params["stage"]
            exported[stage] = plan.steps[o.id].fingerprint
            covered_dirs.add(f"{stage}/")
            items = o.manifest["files"] or o.manifest["records"]
            for entry, rel in zip(items, _stage_outputs(o.manifest, stage)):
                source = store.path(o.key, entry["name"])
                index.put(rel, f"copy:{entry['sha256']}", lambda tmp, source=source: shutil.copyfile(source, tmp))
                produced.add(rel)
            images_rel = f"{stage}/images"
            listing = _image_list_entry(o.manifest)
            entries = parse_image_list(store.path(o.key, listing["name"]).read_bytes()) if listing else []
            if entries:
                mode = _export_settings(result, o.id).get("images", "link")
                index.put_images(images_rel, entries, mode, {n: result.recipe_dir / r for n, r in roots.items()})
                produced.add(images_rel)
                trees.add(images_rel)
            names = _file_names(o.manifest)
            if f"{stage}.json" in names:
                folder = os.path.abspath(out / stage)
                yaml = data_yaml(stage, os.path.join(folder, f"{stage}.json"),
                                 os.path.join(folder, "images") if entries else None, o.records_out)
                rel = f"{stage}/{stage}.yaml"
                index.put(rel, f"yaml:{hashlib.sha256(yaml).hexdigest()}", lambda tmp, yaml=yaml: tmp.write_bytes(yaml))
                produced.add(rel)
        rel = f"rejects/{o.id}.jsonl"
        covered_files.add(rel)
        if o.manifest["rejects"]:
            token = f"rejects:{_REJECTS_FORMAT}:{o.key}"
            index.put(rel, token, lambda tmp, o=o: _write_rejects(store, o.key, o.manifest, tmp))
            produced.add(rel)

    produced.add(HTML_REPORT)  # written below, once the report is known
    stale = [] if full else _mark_stale(index, plan, exported, produced, covered_files)
    index.stages.update(exported)

    for rel in index.recorded():
        if rel in produced:
            continue
        if any(rel.startswith(t + "/") for t in trees):
            index.forget(rel)  # an old per-root link now inside an image folder written whole
            continue
        if full or rel in covered_files or any(rel.startswith(d) for d in covered_dirs):
            index.remove(rel)
    if full:
        index.stages = {s: f for s, f in index.stages.items() if s in exported}

    report = build_report(result, store, failure=failure, stale=stale, recipe_file=recipe_file)
    atomic_write(out / "report.json", (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    # the page is a function of the report's deterministic part and of the stored steps it names:
    # rewritten only when they change, so a no-op re-run does not pay for the charts
    view = deterministic_view(report)
    token = f"html:{HTML_FORMAT}:{hashlib.sha256(canonical(view).encode('utf-8')).hexdigest()}"

    def _html(tmp: Path) -> None:
        from recipec.runtime.report_html import render_page  # plotly is imported only here

        tmp.write_bytes(render_page(view, result, store))

    try:
        index.put(HTML_REPORT, token, _html)
    except Exception as e:  # noqa: BLE001 - the page is a view of report.json: never fail the run for it
        log.error("report.html could not be written: %s", e, exc_info=True)
    index.save()
    return report


def _mark_stale(index: "_OutputIndex", plan: Any, exported: dict[str, str], produced: set[str],
                covered_files: set[str]) -> list[dict[str, str]]:
    """STALE.txt in the stage folders this run did not write whose stage the recipe changed or dropped."""
    planned = {s.params["stage"]: s.fingerprint for s in plan.steps.values() if s.op == "export"}
    stale = []
    for stage, fingerprint in sorted(index.stages.items()):
        note = f"{stage}/{STALE_NOTE}"
        covered_files.add(note)  # a note no longer needed goes
        if stage in exported:
            continue
        if stage not in planned:
            reason = f"the recipe has no stage `{stage}` any more; a full run removes this folder"
        elif planned[stage] != fingerprint:
            reason = f"the recipe changed what stage `{stage}` exports since this folder was written; run it again"
        else:
            continue
        text = (f"STALE: {reason}.\nThese files were written by an earlier version of recipe `{plan.recipe.name}`.\n")
        data = text.encode("utf-8")
        index.put(note, f"stale:{hashlib.sha256(data).hexdigest()}", lambda tmp, data=data: tmp.write_bytes(data))
        produced.add(note)
        stale.append({"stage": stage, "folder": stage, "reason": reason})
    return stale


def _write_rejects(store: Store, key: str, manifest: dict[str, Any], path: Path) -> None:
    table = store.read_rejects(key, manifest)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for batch in table.to_batches(max_chunksize=65_536):
            for row in batch.to_pylist():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


class _OutputIndex:
    """What recipec last wrote into one OUT folder, kept in the store (see the module docstring)."""

    def __init__(self, store: Store, out: Path):
        self.out = out
        where = str(out.resolve())
        self.path = store.root / "outputs" / f"{hashlib.sha256(where.encode()).hexdigest()[:32]}.json"
        self.files: dict[str, list] = {}
        self.stages: dict[str, str] = {}  # stage folder -> plan fingerprint of the export that wrote it
        try:
            data = json.loads(self.path.read_text("utf-8"))
            if data.get("out") == where:
                self.files = data["files"]
                self.stages = data.get("stages", {})
        except (OSError, ValueError, KeyError):
            pass
        self.where = where
        self._dirty = True  # the stages map is saved whatever happened

    def recorded(self) -> list[str]:
        return sorted(self.files)

    def _stat(self, rel: str) -> list[int] | None:
        try:
            st = os.lstat(self.out / rel)
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def _unchanged(self, rel: str, token: str) -> bool:
        """Written by recipec with this content and not touched since."""
        entry = self.files.get(rel)
        return entry is not None and entry[0] == token and entry[1:] == self._stat(rel)

    def _temporary(self, rel: str) -> tuple[Path, Path]:
        dest = self.out / rel
        _real_dirs(self.out, dest.parent)
        return dest, dest.with_name(f".{dest.name}.tmp-{os.getpid()}")

    def put(self, rel: str, token: str, produce: Callable[[Path], None]) -> None:
        if self._unchanged(rel, token):
            return
        dest, tmp = self._temporary(rel)
        try:
            produce(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.files[rel] = [token, *self._stat(rel)]
        self._dirty = True

    def put_images(self, rel: str, entries: list[tuple[str, str, str]], mode: str, roots: dict[str, Path]) -> None:
        """Fill the image folder `rel` with exactly `entries` ((sha256, source, path)), per `mode`."""
        real_roots = {name: Path(os.path.realpath(root)) for name, root in roots.items()}
        digest = hashlib.sha256(canonical([mode, sorted(entries), sorted((n, str(r)) for n, r in real_roots.items()
                                                                           if n in {e[1] for e in entries})]).encode())
        token = f"images:{mode}:{digest.hexdigest()}"
        folder = self.out / rel
        entry = self.files.get(rel)
        if entry is not None and entry[0] == token and folder.is_dir() and not folder.is_symlink():
            return
        ImageFolder(folder, mode, real_roots, self.out).fill(entries)
        self.files[rel] = [token, *(self._stat(rel) or [])]
        self._dirty = True

    def forget(self, rel: str) -> None:
        self.files.pop(rel, None)
        self._dirty = True

    def remove(self, rel: str) -> None:
        path = self.out / rel
        entry = self.files.pop(rel, None)
        if entry and str(entry[0]).startswith("images:") and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        self._dirty = True
        parent = path.parent
        while parent != self.out and parent.is_dir() and not parent.is_symlink() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def save(self) -> None:
        if self._dirty:
            atomic_write(self.path, canonical({"out": self.where, "files": self.files,
                                               "stages": self.stages}).encode("utf-8"))


def _real_dirs(top: Path, folder: Path) -> None:
    """Make `folder` (under `top`) a chain of real directories: a symbolic link on the way (an
    earlier version linked whole image roots here) is removed first, so nothing is ever written
    through it into a source's data."""
    rel = folder.relative_to(top)
    current = top
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            current.unlink()
        if not current.is_dir():
            current.mkdir()


class ImageFolder:
    """One stage's image folder: `<source>/<path>` for each image the stage needs, and nothing else."""

    def __init__(self, folder: Path, mode: str, roots: dict[str, Path], top: Path):
        if mode not in ir.IMAGE_MODES:
            raise OutputError(f"unknown image mode {mode!r}; use {', '.join(ir.IMAGE_MODES)}")
        self.folder = folder
        self.mode = mode
        self.roots = roots
        self.top = top
        self._dirs: set[Path] = set()
        self.copied_instead = 0  # hard links refused by the file system (another device)

    def fill(self, entries: list[tuple[str, str, str]]) -> None:
        from recipec.ops import images as imaging

        _real_dirs(self.top, self.folder)
        wanted: set[str] = set()
        problems: list[str] = []
        for sha256, source, path in entries:
            root = self.roots.get(source)
            if root is None:
                problems.append(f"{source}/{path}: source `{source}` has no image folder")
                continue
            try:
                real = imaging.resolve_inside(root, path)
            except imaging.ImageReject as e:
                problems.append(f"{source}/{path}: {e.detail}")
                continue
            if not real.is_file():
                problems.append(f"{source}/{path}: no such file under {root}")
                continue
            rel = f"{source}/{imaging._normalise(path)}"
            wanted.add(rel)
            try:
                self._place(self.folder / rel, real, sha256)
            except OutputError as e:
                problems.append(f"{source}/{path}: {e}")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise OutputError(f"cannot fill the image folder {self.folder}: " + "; ".join(problems[:5]) + more)
        self._remove_unwanted(wanted)
        if self.copied_instead:
            log.warning("%s: %d image(s) copied, not hard-linked: the output is on another file system than the data",
                        self.folder, self.copied_instead)

    def _parent(self, dest: Path) -> None:
        if dest.parent not in self._dirs:
            _real_dirs(self.top, dest.parent)
            self._dirs.add(dest.parent)

    def _place(self, dest: Path, real: Path, sha256: str) -> None:
        self._parent(dest)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        if self.mode == "link":
            target = os.path.relpath(real, os.path.realpath(dest.parent))
            if dest.is_symlink() and os.readlink(dest) == target:
                return
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp)
            os.replace(tmp, dest)
            return
        st = real.stat()
        try:
            current = os.lstat(dest)
        except FileNotFoundError:
            current = None
        if current is not None and not os.path.islink(dest):
            if self.mode == "hardlink" and (current.st_ino, current.st_dev) == (st.st_ino, st.st_dev):
                return
            if self.mode == "copy" and (current.st_size, current.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                return
        if self.mode == "hardlink":
            tmp.unlink(missing_ok=True)
            try:
                os.link(real, tmp)
                os.replace(tmp, dest)
                return
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                self.copied_instead += 1
        digest = hashlib.sha256()
        try:
            with open(real, "rb") as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
            if digest.hexdigest() != sha256:
                raise OutputError("the file changed since it was ingested; run again to ingest it anew")
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def _remove_unwanted(self, wanted: set[str]) -> None:
        for directory, dirs, files in os.walk(self.folder, topdown=False):
            base = Path(directory)
            for name in files + [d for d in dirs if (base / d).is_symlink()]:
                rel = (base / name).relative_to(self.folder).as_posix()
                if rel not in wanted:
                    (base / name).unlink()
            if base != self.folder and not any(base.iterdir()):
                base.rmdir()
