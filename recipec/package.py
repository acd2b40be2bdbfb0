"""`recipec package OUT DEST`: a finished run's open-science package, per the Model Openness Framework.

The Model Openness Framework's Class I ("Open Science") asks, beyond the model and its code, for the
raw training data sets, a paper documenting the development process, intermediate checkpoints and
log files. For the scope of one run, the package gathers what recipec knows of these:

    DEST/
      recipe/<file>.recipe, the recipes it extends and the files it includes (same relative layout)
      recipe/<file>.recipe.lock   the lock beside the recipe if there is one, else one made now
      report.json, report.html    the run's report
      cards/<stage>/README.md     per stage a data card (Hugging Face dataset card: YAML header with
                                  license, size and tasks; composition, sources and licenses, the
                                  filters and what they dropped, synthesis models and prompts)
      provenance/records.parquet  per record: id, source, origin, own id, stages, or the step and
                                  reason that dropped it (from the `recipec why` index)
      training/<stage>/train_log.jsonl, checkpoints.json
                                  per trained stage, its per-step log and the manifest of its
                                  checkpoints (path, bytes, sha256); the weights stay in the store
      PIPELINE.md                 an account of the pipeline from the plan and the report, for a
                                  paper's appendix
      MOF.md, mof.json            the MOF components, each present, missing or not applicable, with
                                  its license; a license the recipe does not declare is flagged
    DEST.tar.gz                   the same folder as one archive

Everything is a function of the run (no dates, sorted listings, a tar with fixed owners and times and
a gzip without a timestamp), so packaging the same run twice gives the same bytes.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import sqlite3
import tarfile
from pathlib import Path
from typing import Any

from recipec import __version__, ir

MISSING_LICENSE = "MISSING: the recipe declares no license"


class PackageError(Exception):
    pass


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def build_package(out: Path, dest: Path, *, recipe_file: str | None = None, store_dir: str | None = None,
                  root: str | None = None) -> dict[str, Any]:
    from recipec.compiler import compile_file
    from recipec.lockfile import Locker, dumps, lock_path
    from recipec.plan import build_plan
    from recipec.runtime.store import Store

    try:
        report = json.loads((out / "report.json").read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise PackageError(f"cannot read {out / 'report.json'}: {e}") from None
    if report.get("status") == "failed":
        raise PackageError(f"the run in {out} failed at {report['failed_step']['id']}; package a finished run")
    recipe_file = recipe_file or (report.get("run") or {}).get("recipe_file")
    if not recipe_file or not Path(recipe_file).is_file():
        raise PackageError("which recipe did this run use? pass --recipe FILE")
    compiled = compile_file(recipe_file, root=root)
    if not compiled.ok:
        raise PackageError(f"{recipe_file} has errors; `recipec check {recipe_file}` shows them")
    recipe = compiled.recipe
    if ir.fingerprint(recipe) != report["fingerprint"]:
        raise PackageError(f"{recipe_file} is not the recipe this run used (its fingerprint differs); "
                           "pass the recipe as it was with --recipe")
    store = Store(store_dir or (report.get("run") or {}).get("store") or ".recipec/store")
    plan = build_plan(recipe)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    base = Path(recipe_file).absolute().parent

    # the recipe, what it includes, its lock
    locker = Locker(recipe, recipe_file, compiled.chain, store)
    included = sorted({Path(os.path.normpath(Path(p).absolute())) for p in [*compiled.chain, *locker.includes()]})
    top = Path(os.path.commonpath([str(p.parent) for p in included]))
    for path in included:
        _write(dest / "recipe" / path.relative_to(top), path.read_bytes())
    recipe_rel = Path(os.path.normpath(Path(recipe_file).absolute())).relative_to(top)
    lock = lock_path(recipe_file)
    lock_note = "the lock beside the recipe"
    if lock.is_file():
        lock_bytes = lock.read_bytes()
    else:
        lock_bytes = dumps(locker.build()).encode("utf-8")
        lock_note = "made by `recipec package` (no lock beside the recipe)"
    _write(dest / "recipe" / (str(recipe_rel) + ".lock"), lock_bytes)
    lock_data = json.loads(lock_bytes)

    # the report
    shutil.copyfile(out / "report.json", dest / "report.json")
    if (out / "report.html").is_file():
        shutil.copyfile(out / "report.html", dest / "report.html")

    # data cards
    for stage in report["stages"]:
        _write(dest / "cards" / stage["name"] / "README.md", data_card(recipe, plan, report, stage))

    # provenance
    _provenance(store, report, dest / "provenance" / "records.parquet")

    # training
    trained = []
    for step in report["steps"]:
        if step["op"] != "train":
            continue
        manifest = store.manifest(step["key"]) or {}
        stage = plan.steps[step["id"]].params.get("stage")
        files = manifest.get("files") or []
        log = next((e for e in files if e["name"] == "files/train_log.jsonl"), None)
        if log:
            shutil.copyfile(store.path(step["key"], log["name"]), _mk(dest / "training" / stage / "train_log.jsonl"))
        checkpoints = [{"path": e["name"].removeprefix("files/"), "bytes": e["bytes"], "sha256": e["sha256"]}
                       for e in files if e["name"].startswith(("files/checkpoint/", "files/checkpoints/"))]
        _write(dest / "training" / stage / "checkpoints.json",
               json.dumps({"stage": stage, "step": step["id"], "store_key": step["key"], "files": checkpoints},
                          indent=1, sort_keys=True) + "\n")
        trained.append({"stage": stage, "log": bool(log),
                        "intermediate": sum(c["path"].startswith("checkpoints/") for c in checkpoints),
                        "final": any(c["path"].startswith("checkpoint/") for c in checkpoints)})

    _write(dest / "PIPELINE.md", pipeline_account(recipe, plan, report))
    checklist = mof_checklist(recipe, plan, report, trained, lock_data, lock_note)
    _write(dest / "mof.json", json.dumps(checklist, indent=2, sort_keys=True) + "\n")
    _write(dest / "MOF.md", mof_markdown(checklist))
    archive = dest.with_name(dest.name + ".tar.gz")
    write_archive(dest, archive)
    return {"dest": str(dest), "archive": str(archive), "checklist": checklist}


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _provenance(store: Any, report: dict[str, Any], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recipec.runtime.store import PARQUET_OPTIONS
    from recipec.why import ensure_index

    db = sqlite3.connect(f"file:{ensure_index(store, report)}?mode=ro", uri=True)
    try:
        steps = dict(db.execute("SELECT ord, id FROM steps"))
        rows = db.execute("SELECT id, source, origin, source_id, stages, drop_ord, reason, detail FROM records ORDER BY n").fetchall()
    finally:
        db.close()
    table = pa.table({
        "id": [r[0] or None for r in rows], "source": [r[1] for r in rows], "origin": [r[2] for r in rows],
        "source_id": [r[3] for r in rows], "stages": [[s for s in (r[4] or "").split(",") if s] for r in rows],
        "dropped_by": [steps.get(r[5]) if r[5] is not None else None for r in rows],
        "reason": [r[6] for r in rows], "detail": [r[7] for r in rows],
    }, schema=pa.schema([("id", pa.string()), ("source", pa.string()), ("origin", pa.string()),
                         ("source_id", pa.string()), ("stages", pa.list_(pa.string())), ("dropped_by", pa.string()),
                         ("reason", pa.string()), ("detail", pa.string())]))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **PARQUET_OPTIONS)


def write_archive(folder: Path, archive: Path) -> None:
    """A tar.gz of `folder` that depends only on its contents: sorted, fixed owner, mode and time."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.rglob("*")):
            rel = f"{folder.name}/{path.relative_to(folder).as_posix()}"
            info = tarfile.TarInfo(rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                data = path.read_bytes()
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    with open(archive, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(buf.getvalue())


# ---- documents ----------------------------------------------------------------------------------


def _stage_sources(recipe: ir.Recipe, stage: dict[str, Any]) -> list[str]:
    realised = (stage.get("realised") or {}).get("by_source") or {}
    planned = stage["planned"]["by_source"]
    return sorted(set(planned) | set(realised))


def _license(recipe: ir.Recipe, name: str) -> str | None:
    source = recipe.sources.get(name)
    if source is not None:
        return source.license
    syn = recipe.syntheses.get(name)
    if syn is not None:  # synthetic data inherits its seeds' licenses
        seeds = {recipe.sources[s].license if s in recipe.sources else None for s in syn.from_sources}
        return seeds.pop() if len(seeds) == 1 else None
    return None


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if n < limit:
            return label
    return "100M<n<1B"


def data_card(recipe: ir.Recipe, plan: Any, report: dict[str, Any], stage: dict[str, Any]) -> str:
    name = stage["name"]
    sources = _stage_sources(recipe, stage)
    licenses = sorted({_license(recipe, s) or "unknown" for s in sources})
    realised = stage.get("realised") or {}
    total = realised.get("total", 0)
    header = ["---", f"pretty_name: {json.dumps(f'{recipe.name} stage {name}')}",
              "license:", *[f"- {lic}" for lic in licenses],
              "task_categories:", "- visual-question-answering", "- image-to-text",
              "size_categories:", f"- {_size_category(total)}",
              "source_datasets:", *[f"- {s}" for s in sources],
              "tags:", "- recipec", "- synthetic" if any(s in recipe.syntheses for s in sources) else "- curated", "---", ""]
    lines = [f"# {recipe.name}: stage `{name}`", "",
             f"The training mixture of stage `{name}` of recipe `{recipe.name}`"
             + (f" ({recipe.description})" if recipe.description else "") + f", as exported by recipec {__version__} "
             f"(recipe fingerprint `{report['fingerprint'][:16]}`, seed {report['seed']}).", ""]
    missing = [s for s in sources if not _license(recipe, s)]
    if missing:
        lines += [f"**License missing** for {', '.join(missing)}: the recipe declares none, so none is claimed here.", ""]
    lines += ["## Composition", "", "| by | name | planned | realised |", "|---|---|---:|---:|",
              f"| total | | {stage['planned']['total'] if stage['planned']['total'] is not None else ''} | {total if realised else 'not run'} |"]
    for key in ("by_source", "by_data_type", "by_category"):
        want, have = stage["planned"].get(key) or {}, realised.get(key) or {}
        for n in sorted(set(want) | set(have)):
            lines.append(f"| {key.removeprefix('by_').replace('_', ' ')} | {n} | {want.get(n) if want.get(n) is not None else ''} | {have.get(n, 0) if realised else ''} |")
    lines += ["", "## Sources", "", "| source | format | category | data type | license |", "|---|---|---|---|---|"]
    for s in sources:
        src = recipe.sources.get(s)
        if src is not None:
            lines.append(f"| {s} | {src.format} | {src.category} | {src.data_type} | {src.license or MISSING_LICENSE} |")
        else:
            syn = recipe.syntheses[s]
            lines.append(f"| {s} | synthesized from {', '.join(syn.from_sources)} | {syn.category} | {syn.data_type} | "
                         f"{_license(recipe, s) or MISSING_LICENSE} |")
    upstream = plan.upstream(stage["mix_step"]) if stage.get("mix_step") else set()
    lines += ["", "## Filters and what they dropped", "", "| step | op | in | out | dropped |", "|---|---|---:|---:|---|"]
    for step in report["steps"]:
        if step["id"] in upstream and step["op"] not in ("ingest", "collect", "export", "train"):
            dropped = ", ".join(f"{r}: {n}" for r, n in step["dropped"].items()) or "none"
            lines.append(f"| {step['id']} | {step['op']} | {step['records_in']} | {step['records_out']} | {dropped} |")
    syntheses = [recipe.syntheses[s] for s in sources if s in recipe.syntheses]
    if syntheses:
        lines += ["", "## Synthesis", ""]
        for syn in syntheses:
            lines.append(f"- `{syn.name}`: from {', '.join(syn.from_sources)} with `{syn.model.ref}`"
                         + (f" at revision `{syn.model.revision}`" if syn.model.revision else "")
                         + f", {syn.few_shot} few-shot examples, styles {', '.join(syn.styles)}; rules: "
                         + "; ".join(f"{c.verb} {c.field} {c.op} {c.value:g}" + (f" (model `{c.model.ref}`)" if c.model else "")
                                     for c in syn.rules))
            for key, prompt in sorted(syn.prompts.items()):
                lines += ["", f"Prompt `{key}`" + (f" (from `{prompt.file}`)" if prompt.file else "") + ":", "",
                          "```", prompt.text.strip(), "```"]
    lines += ["", "## Provenance", "",
              "Every record's origin (`file:line`), the steps that touched it and its fate are in "
              "`provenance/records.parquet` of this package; `recipec why ID` answers for one record.", ""]
    return "\n".join(header + lines)


def pipeline_account(recipe: ir.Recipe, plan: Any, report: dict[str, Any]) -> str:
    steps = {s["id"]: s for s in report["steps"]}
    lines = [f"# The data pipeline of `{recipe.name}`", "",
             f"Generated by recipec {__version__} from the recipe (fingerprint `{report['fingerprint'][:16]}`, "
             f"seed {report['seed']}) and the report of its run (status: {report['status']}).", "", "## Sources", ""]
    for name, src in sorted(recipe.sources.items()):
        ingest = steps.get(f"ingest.{name}")
        kept = f"{ingest['records_out']:,} of {ingest['records_in']:,} records read were valid" if ingest else "not ingested in this run"
        lines.append(f"- **{name}** ({src.format}, {src.category}, {src.data_type}; license {src.license or 'not declared'}): {kept}.")
    if recipe.image_taggers or recipe.instruction_taggers or recipe.syntheses:
        lines += ["", "## Tagging and synthesis", ""]
        for t in recipe.image_taggers.values():
            lines.append(f"- Images of {', '.join(t.on)} were tagged by `{t.model.ref}` (threshold {t.threshold:g}, "
                         f"at most {t.max_tags} tags{', vocabulary ' + repr(t.vocabulary) if t.vocabulary else ''}).")
        for t in recipe.instruction_taggers.values():
            tax = recipe.taxonomies.get(t.taxonomy)
            lines.append(f"- Instructions of {', '.join(t.on)} were tagged by `{t.model.ref}` with the taxonomy `{t.taxonomy}`"
                         + (f" ({len(tax.levels)} levels, {tax.leaves} leaves)" if tax else "") + ".")
        for m in recipe.mappings.values():
            lines.append(f"- Image tags were mapped to instruction types by {m.method.upper()} (top {m.top_k}, min count {m.min_count}).")
        for syn in recipe.syntheses.values():
            lines.append(f"- `{syn.name}`: `{syn.model.ref}` wrote {syn.questions_per_image} questions per seed image "
                         f"with {syn.few_shot} few-shot examples and answers in the styles {', '.join(syn.styles)}; "
                         + "; ".join(f"{c.verb} {c.field} {c.op} {c.value:g}" for c in syn.rules) + ".")
    lines += ["", "## Processing", "", "| step | op | in | out | dropped |", "|---|---|---:|---:|---|"]
    for step in report["steps"]:
        if step["op"] in ("ingest", "export", "train"):
            continue
        dropped = ", ".join(f"{r}: {n:,}" for r, n in step["dropped"].items()) or "none"
        lines.append(f"| {step['id']} | {step['op']} | {step['records_in']:,} | {step['records_out']:,} | {dropped} |")
    lines += ["", "## Stages", "", "| stage | samples planned | realised | max image tokens | trainable params | lr | batch | epochs |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    by_name = {s.name: s for s in recipe.stages}
    for st in report["stages"]:
        s = by_name[st["name"]]
        realised = (st.get("realised") or {}).get("total")
        lines.append(f"| {s.name} | {st['planned']['total'] if st['planned']['total'] is not None else ''} | "
                     f"{realised if realised is not None else 'not run'} | {s.max_image_tokens:,} | {s.trainable_params:,} | "
                     f"{s.lr:g} | {s.batch} | {s.epochs:g} |")
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w['message']}" for w in report["warnings"]]
    lines.append("")
    return "\n".join(lines)


def mof_checklist(recipe: ir.Recipe, plan: Any, report: dict[str, Any], trained: list[dict[str, Any]],
                  lock: dict[str, Any], lock_note: str) -> dict[str, Any]:
    """The 17 components of the Model Openness Framework, for this run's scope, plus its log files."""
    has_train = any(s.op == "train" for s in plan.steps.values())
    training_ran = bool(trained)
    licenses = {n: s.license for n, s in recipe.sources.items()}
    data_license = ", ".join(sorted({v for v in licenses.values() if v})) or None
    missing = sorted(n for n, v in licenses.items() if not v)
    data_license_text = (data_license or "") + (f"; MISSING for {', '.join(missing)}" if missing else "")
    code = "Apache-2.0 (recipec)"
    model_license = "MISSING: the recipe declares no model license"

    def item(name: str, klass: str, status: str, where: str = "", license: str | None = None, note: str = "") -> dict[str, Any]:
        return {"component": name, "class": klass, "status": status, "where": where,
                "license": license if status.startswith("present") else None, "note": note}

    not_trained = (("not applicable", "the recipe plans no training") if not has_train
                   else ("missing", "this run did not train: run its train steps, then package again"))

    def trained_status(present: bool, where: str, license: str | None, note: str = "") -> dict[str, Any]:
        if present:
            return {"status": "present", "where": where, "license": license, "note": note}
        return {"status": not_trained[0], "where": "", "license": None, "note": note or not_trained[1]}

    items = [
        item("Model architecture", "III", "present" if recipe.models else "not applicable",
             "recipe/ (model blocks) and report.json stages", code if recipe.models else None),
        item("Final model parameters", "III", **trained_status(any(t["final"] for t in trained),
             "training/<stage>/checkpoints.json (weights in the store)", model_license)),
        item("Technical report", "III", "missing", note="not produced by a run; PIPELINE.md is a starting point"),
        item("Evaluation results", "III", "missing", note="recipec does not evaluate models"),
        item("Model card", "III", "missing", note="not produced by a run"),
        item("Data card", "III", "present", "cards/<stage>/README.md", data_license_text or None),
        item("Sample model outputs", "III (optional)", "not applicable", note="optional"),
        item("Training code", "II", **trained_status(training_ran, "recipec (recipec.train), the recipe's stage settings", code)),
        item("Inference code", "II", "missing", note="not part of a recipec run"),
        item("Evaluation code", "II", "missing", note="not part of a recipec run"),
        item("Evaluation data", "II", "missing", note="not part of a recipec run"),
        item("Supporting libraries and tools", "II", "present", f"recipec {__version__} (pyproject.toml pins its dependencies)", code),
        item("Research paper", "I", "missing", note="outside a run; PIPELINE.md is written to be pasted into its appendix"),
        item("Datasets", "I", "present" if not missing else "present (licenses missing)",
             f"recipe/{_lock_name(lock)} pins every source file and image by sha256 ({lock_note}); "
             "provenance/records.parquet traces every record", data_license_text or None),
        item("Data preprocessing code", "I", "present", "recipe/ (the recipe and what it includes) run by recipec", code),
        item("Intermediate model parameters", "I", **trained_status(any(t["intermediate"] for t in trained),
             "training/<stage>/checkpoints.json", model_license,
             "" if any(t["intermediate"] for t in trained) or not training_ran else "training ran without intermediate checkpoints")),
        item("Model metadata", "I (optional)", "present" if recipe.stages else "not applicable",
             "report.json (stages: tokens, parameters, settings)", code if recipe.stages else None),
        item("Log files", "I (named by the MOF's Class I)", "present",
             "report.json, report.html" + (", training/<stage>/train_log.jsonl" if any(t["log"] for t in trained) else ""), code),
    ]
    for entry in items:  # a missing license is flagged, never guessed
        if entry["status"].startswith("present") and not entry["license"]:
            entry["license"] = "MISSING"
    counts = {s: sum(i["status"].startswith(s) for i in items) for s in ("present", "missing", "not applicable")}
    return {"recipe": recipe.name, "fingerprint": report["fingerprint"], "status": report["status"],
            "components": items, "present": counts["present"], "missing": counts["missing"],
            "not_applicable": counts["not applicable"],
            "unlicensed_sources": missing}


def _lock_name(lock: dict[str, Any]) -> str:
    return "*.recipe.lock"


def mof_markdown(checklist: dict[str, Any]) -> str:
    lines = [f"# Model Openness Framework checklist: `{checklist['recipe']}`", "",
             f"For the scope of this run (status {checklist['status']}): {checklist['present']} present, "
             f"{checklist['missing']} missing, {checklist['not_applicable']} not applicable.", "",
             "| component | class | status | where | license |", "|---|---|---|---|---|"]
    for i in checklist["components"]:
        status = i["status"] + (f" ({i['note']})" if i["note"] else "")
        lines.append(f"| {i['component']} | {i['class']} | {status} | {i['where']} | {i['license'] or ''} |")
    if checklist["unlicensed_sources"]:
        lines += ["", f"**Flagged**: the sources {', '.join(checklist['unlicensed_sources'])} declare no license."]
    lines.append("")
    return "\n".join(lines)
