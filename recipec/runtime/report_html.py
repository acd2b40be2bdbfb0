"""`OUT/report.html`: the run's report as one self-contained page of tables and charts.

Written beside `report.json` by every run (report.py). Every number in its tables comes from
`report.json` itself and carries the report path it came from in a `data-report` attribute (for
example `steps/mix.s1/records_out`: list entries by their `id` or `name`), so a test can compare the page with the JSON. The charts are
plotly figures; the page embeds plotly.js inline once, so it needs no network and no CDN. Sections:

- warnings (report.json `warnings`): stages short of their plan or empty, filters that emptied;
- per stage, the composition planned against realised by source, data type and category;
- the funnel of every step: records in, out, dropped by reason, with links to the rejects file and
  to the examples in the gallery;
- a histogram of every score or loss a `keep`/`drop` rule judged, kept and dropped stacked, the
  cut marked and the share dropped;
- the instruction types of the synthetic data (first-level classes and below, a sunburst) and the
  TF-IDF mapping table of each `mapping` step;
- a gallery: per stage the first samples it kept, per step and reason the first records it dropped
  (thumbnail, conversation, scores, reason);
- for training steps, the loss curve of each stage (from its `train_log.jsonl`).

Determinism: the page is a function of the report's deterministic view (report.py's
`deterministic_view`: no timings, cache hits or store path) and of the stored steps it names; the
figures get fixed element ids and thumbnails are re-encoded with fixed settings, so the same run
gives the same bytes. report.py rewrites the page only when that view changes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from recipec.runtime.store import Store

log = logging.getLogger("recipec.run")

GALLERY_KEPT = 6  # samples shown per stage
GALLERY_DROPPED = 2  # records shown per step and reason
GALLERY_REASONS = 40  # (step, reason) pairs shown at most
THUMBNAIL = 128  # pixels, longest side
BINS = 40
CUT_OPS = ("threshold", "percentile", "judge_relevance", "judge_score")


def render_page(report: dict[str, Any], result: Any, store: Store) -> bytes:
    """The page for `report` (its deterministic view: report.py writes it only when that changes)."""
    return render(report, gather(report, result, store)).encode("utf-8")


# ---- data from the store ------------------------------------------------------------------------


def gather(report: dict[str, Any], result: Any, store: Store) -> dict[str, Any]:
    from recipec.runtime.report import image_roots

    plan = result.plan
    outcomes = {o.id: o for o in result.outcomes}
    roots = {n: Path(result.recipe_dir) / r for n, r in image_roots(plan.recipe).items()}
    data: dict[str, Any] = {"cuts": [], "types": [], "mappings": [], "training": [], "kept": [], "dropped": []}
    for step in report["steps"]:
        o = outcomes.get(step["id"])
        if o is None:
            continue
        params = plan.steps[o.id].params
        try:
            if o.op in CUT_OPS and params.get("condition"):
                cut = _cut(store, o, params["condition"])
                if cut is not None:
                    data["cuts"].append(cut)
            elif o.op == "merge_turns" or (o.op == "generate_answers" and params.get("merge") == "none"):
                tags = Counter(t for shard in _column(store, o, "instruction_tags") for row in shard for t in (row or ()))
                if tags:
                    data["types"].append({"step": o.id, "counts": dict(sorted(tags.items()))})
            elif o.op == "map_tags":
                mapping = _file(store, o, "files/mapping.json")
                if mapping is not None:
                    data["mappings"].append({"step": o.id, "mapping": json.loads(mapping)})
            elif o.op == "train":
                text = _file(store, o, "files/train_log.jsonl")
                if text is not None:
                    points = [json.loads(line) for line in text.decode("utf-8").splitlines() if line.strip()]
                    data["training"].append({"step": o.id, "stage": params.get("stage"), "log": points})
            if o.op == "mix":
                rows = _head(store, o, GALLERY_KEPT)
                data["kept"].append({"stage": params.get("stage"), "step": o.id,
                                     "samples": [_sample(r, roots) for r in rows]})
        except Exception as e:  # noqa: BLE001 - a report section must never fail the run
            log.warning("report.html: step %s left out of the charts: %s", o.id, e)
    shown = 0
    for step in report["steps"]:
        o = outcomes.get(step["id"])
        if o is None or not o.manifest.get("rejects") or shown >= GALLERY_REASONS:
            continue
        try:
            by_reason: dict[str, list] = {}
            for row in _rejects(store, o):
                bucket = by_reason.setdefault(row["reason"], [])
                if len(bucket) < GALLERY_DROPPED:
                    bucket.append(row)
            for reason, rows in sorted(by_reason.items()):
                if shown >= GALLERY_REASONS:
                    break
                shown += 1
                samples = []
                for row in rows:
                    record = _loads(row["record"])
                    sample = _sample(record, roots) if isinstance(record, dict) else {"id": row["id"], "raw": row["record"]}
                    sample.update(id=row["id"] or sample.get("id") or "", origin=row["origin"], detail=row["detail"])
                    samples.append(sample)
                data["dropped"].append({"step": o.id, "reason": reason, "samples": samples})
        except Exception as e:  # noqa: BLE001
            log.warning("report.html: rejects of %s left out of the gallery: %s", o.id, e)
    return data


def _loads(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _shards(store: Store, o: Any, kind: str = "records") -> list[Path]:
    return [store.path(o.key, e["name"]) for e in o.manifest.get(kind) or []]


def _column(store: Store, o: Any, name: str) -> Iterator[list[Any]]:
    """One column of the step's records, a shard at a time."""
    import pyarrow.parquet as pq

    for path in _shards(store, o):
        yield pq.read_table(path, columns=[name]).column(name).to_pylist()


def _head(store: Store, o: Any, n: int) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for path in _shards(store, o):
        if len(rows) >= n:
            break
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=n):
            rows.extend(batch.to_pylist()[: n - len(rows)])
            break
    return rows


def _rejects(store: Store, o: Any) -> Iterable[dict[str, Any]]:
    import pyarrow.parquet as pq

    for path in _shards(store, o, "rejects"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=8192, columns=["id", "origin", "reason", "detail", "record"]):
            yield from batch.to_pylist()


def _file(store: Store, o: Any, name: str) -> bytes | None:
    if not any(e["name"] == name for e in o.manifest.get("files") or []):
        return None
    return store.path(o.key, name).read_bytes()


def _score_values(scores: Any, field: str) -> float | None:
    if isinstance(scores, dict):
        value = scores.get(field)
    else:
        value = next((v for k, v in scores or () if k == field), None)
    return float(value) if isinstance(value, (int, float)) else None


def _cut(store: Store, o: Any, condition: dict[str, Any]) -> dict[str, Any] | None:
    """The histogram of the judged field among the kept and the dropped records, and where it cut.

    The kept records' values are read a shard at a time, twice (their range, then their counts),
    so memory stays one shard's column whatever the step's size; the dropped ones come from the
    rejects, as compact floats."""
    import re
    from array import array

    import numpy as np

    field = condition["field"]
    dropped = array("d")
    at = condition["value"] if condition["op"] not in ("top", "bottom") else None
    for row in _rejects(store, o):
        record = _loads(row["record"])
        value = _score_values(record.get("scores"), field) if isinstance(record, dict) else None
        if value is not None:
            dropped.append(value)
        if at is None:
            found = re.search(r"cut at (-?[0-9.eE+-]+)", row["detail"] or "")
            if found:
                at = float(found.group(1))
    dropped_values = np.frombuffer(dropped, dtype=np.float64) if dropped else np.zeros(0)
    kept = 0
    lo, hi = (float(dropped_values.min()), float(dropped_values.max())) if len(dropped_values) else (math.inf, -math.inf)
    for values in _scores(store, o, field):
        kept += len(values)
        if len(values):
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    if not kept and not len(dropped_values):
        return None
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, BINS + 1)
    kept_n = np.zeros(BINS, dtype=np.int64)
    for values in _scores(store, o, field):
        kept_n += np.histogram(values, bins=edges)[0]
    rule = f"{condition['verb']} {field} {condition['op']} {_number(condition['value'])}"
    if condition["op"] in ("top", "bottom"):
        rule += "%" if condition["value"] > 1 else ""
    return {"step": o.id, "field": field, "rule": rule, "cut": at, "edges": edges.tolist(),
            "kept": kept_n.tolist(), "dropped": np.histogram(dropped_values, bins=edges)[0].tolist()}


def _scores(store: Store, o: Any, field: str) -> Iterator[Any]:
    """`scores[field]` of the step's records, a shard at a time (float64, the records without it left out)."""
    import numpy as np
    import pyarrow.parquet as pq

    from recipec.ops.cuts import scores_of

    for path in _shards(store, o):
        values = scores_of(pq.read_table(path, columns=["scores"]), field)
        yield values[~np.isnan(values)]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _sample(record: dict[str, Any], roots: dict[str, Path]) -> dict[str, Any]:
    turns = [(t.get("from", ""), t.get("value", "")) for t in record.get("conversations") or []]
    scores = record.get("scores") or {}
    scores = dict(scores) if not isinstance(scores, dict) else scores
    return {"id": record.get("id", ""), "source": record.get("source", ""), "origin": record.get("origin", ""),
            "turns": turns[:6], "scores": dict(sorted(scores.items())),
            "tags": list(record.get("image_tags") or []) + list(record.get("instruction_tags") or []),
            "thumbs": [t for t in (_thumbnail(i, roots.get(record.get("source", ""))) for i in (record.get("images") or [])[:2]) if t]}


def _thumbnail(image: dict[str, Any], root: Path | None) -> str | None:
    if root is None or not image or not image.get("path"):
        return None
    from PIL import Image

    from recipec.ops import images as imaging

    try:
        path = imaging.resolve_inside(root, image["path"])
        with Image.open(path) as im:
            im.draft("RGB", (THUMBNAIL, THUMBNAIL))
            im = im.convert("RGB")
            im.thumbnail((THUMBNAIL, THUMBNAIL))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=70, optimize=False, progressive=False)
    except Exception:  # noqa: BLE001 - a missing or broken image shows no thumbnail
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---- the page -----------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1240px;
padding:0 18px 40px;color:#1d2330;font-size:14px}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d9dde5}
h3{font-size:15px;margin:16px 0 6px}table{border-collapse:collapse;margin:6px 0 12px}
td,th{border:1px solid #d9dde5;padding:3px 8px;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f5f9}
.warn{background:#fff4e0;border:1px solid #e8a33d;padding:6px 10px;margin:6px 0;font-weight:600}
.status{display:inline-block;padding:2px 8px;border-radius:3px;background:#e6f2e6}
.status.failed{background:#fbe3e3}.status.partial{background:#fff4e0}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #d9dde5;border-radius:4px;padding:8px;
width:280px;font-size:12px;overflow-wrap:anywhere}.card img{max-width:128px;max-height:128px;margin-right:4px}
.turn{margin:2px 0}.who{font-weight:600}.muted{color:#667085}.chart{min-height:320px}
"""


class _Page:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.charts = 0

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, fig: Any, height: int = 360) -> None:
        fig.update_layout(height=height, margin={"l": 60, "r": 20, "t": 40, "b": 50}, template="plotly_white")
        self.charts += 1
        self.add(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{self.charts}",
                             config={"displaylogo": False, "responsive": True}))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, path: str) -> str:
    """A number cell that names the report.json path it shows."""
    return f'<td class="n" data-report="{_e(path)}">{_e(value)}</td>'


def render(report: dict[str, Any], data: dict[str, Any]) -> str:
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs
    from plotly.subplots import make_subplots

    page = _Page()
    status = report["status"]
    page.add(f"<h1>recipec run: {_e(report['recipe'])}</h1>")
    page.add(f'<p>status <span class="status {_e(status)}" data-report="status">{_e(status)}</span> &middot; '
             f'seed <span data-report="seed">{_e(report["seed"])}</span> &middot; fingerprint '
             f'<code data-report="fingerprint">{_e(report["fingerprint"])}</code></p>')
    if report.get("failed_step"):
        f = report["failed_step"]
        page.add(f'<div class="warn">step {_e(f["id"])} (op {_e(f["op"])}) failed: {_e(f["message"])}</div>')
    page.add('<nav>' + " &middot; ".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("warnings", "warnings"), ("stages", "stages"), ("funnel", "funnel"), ("cuts", "cuts"),
        ("synthesis", "synthesis"), ("gallery", "gallery"), ("training", "training"))) + "</nav>")

    # warnings
    page.add('<h2 id="warnings">Warnings</h2>')
    warnings = report.get("warnings") or []
    if not warnings:
        page.add('<p class="muted">none: every stage realised its plan and no filter emptied its input</p>')
    for i, w in enumerate(warnings):
        page.add(f'<div class="warn" data-report="warnings/{i}/message">{_e(w["message"])}</div>')

    # stages
    page.add('<h2 id="stages">Stages: planned against realised</h2>')
    for st in report["stages"]:
        name = st["name"]
        planned, realised = st["planned"], st["realised"]
        page.add(f'<h3 id="stage-{_e(name)}">{_e(name)}</h3>')
        page.add("<table><tr><th>samples</th><th class=n>planned</th><th class=n>realised</th>"
                 "<th class=n>max image tokens</th><th class=n>trainable params</th></tr><tr><td>total</td>"
                 + _num(planned["total"] if planned["total"] is not None else "", f"stages/{name}/planned/total")
                 + _num(realised["total"] if realised else "", f"stages/{name}/realised/total")
                 + _num(st["max_image_tokens"], f"stages/{name}/max_image_tokens")
                 + _num(st["trainable_params"], f"stages/{name}/trainable_params") + "</tr></table>")
        fig = make_subplots(rows=1, cols=3, subplot_titles=("by source", "by data type", "by category"))
        rows = []
        for col, key in enumerate(("by_source", "by_data_type", "by_category"), start=1):
            want = planned.get(key) or {}
            have = (realised or {}).get(key) or {}
            names = list(dict.fromkeys([*want, *have]))
            fig.add_trace(go.Bar(name="planned", x=names, y=[want.get(n) or 0 for n in names],
                                 marker_color="#9aa5b8", showlegend=col == 1, legendgroup="planned"), row=1, col=col)
            fig.add_trace(go.Bar(name="realised", x=names, y=[have.get(n, 0) for n in names],
                                 marker_color="#2f6fdf", showlegend=col == 1, legendgroup="realised"), row=1, col=col)
            for n in names:
                rows.append(f"<tr><td>{_e(key.removeprefix('by_').replace('_', ' '))}</td><td>{_e(n)}</td>"
                            + (_num(want[n] if want[n] is not None else "", f"stages/{name}/planned/{key}/{n}")
                               if n in want else "<td></td>")
                            + (_num(have[n], f"stages/{name}/realised/{key}/{n}") if n in have
                               else '<td class="n">0</td>' if realised and key in realised else "<td></td>") + "</tr>")
        fig.update_layout(barmode="group", title=f"stage {name}")
        page.figure(fig, 340)
        page.add("<details><summary>table</summary><table><tr><th>by</th><th>name</th><th class=n>planned</th>"
                 "<th class=n>realised</th></tr>" + "".join(rows) + "</table></details>")

    # funnel
    page.add('<h2 id="funnel">Steps: records in, out and dropped</h2>')
    steps = report["steps"]
    reasons = sorted({r for s in steps for r in s["dropped"]})
    fig = go.Figure()
    ids = [s["id"] for s in steps][::-1]
    fig.add_trace(go.Bar(name="out", y=ids, x=[s["records_out"] for s in steps][::-1], orientation="h",
                         marker_color="#2f6fdf"))
    for reason in reasons:
        fig.add_trace(go.Bar(name=reason, y=ids, x=[s["dropped"].get(reason, 0) for s in steps][::-1], orientation="h"))
    fig.update_layout(barmode="stack", title="records per step: out and dropped by reason",
                      yaxis={"automargin": True}, legend={"font": {"size": 10}})
    page.figure(fig, max(320, 22 * len(steps) + 120))
    gallery_ids = {(d["step"], d["reason"]) for d in data["dropped"]}
    rows = []
    for s in steps:
        sid = s["id"]
        dropped = "<br>".join(
            f'{_e(r)}: <span data-report="steps/{_e(sid)}/dropped/{_e(r)}">{n}</span>'
            + (f' <a href="#drop-{_e(sid)}-{_e(r)}">examples</a>' if (sid, r) in gallery_ids else "")
            for r, n in s["dropped"].items())
        rejects = f'<a href="{_e(s["rejects"])}">{_e(s["rejects"])}</a>' if s["rejects"] else ""
        rows.append(f"<tr><td>{_e(sid)}</td><td>{_e(s['op'])}</td>" + _num(s["records_in"], f"steps/{sid}/records_in")
                    + _num(s["records_out"], f"steps/{sid}/records_out") + f"<td>{dropped}</td><td>{rejects}</td></tr>")
    page.add("<table><tr><th>step</th><th>op</th><th class=n>in</th><th class=n>out</th><th>dropped by reason</th>"
             "<th>rejects</th></tr>" + "".join(rows) + "</table>")

    # cuts
    page.add('<h2 id="cuts">Scores and losses the rules cut</h2>')
    if not data["cuts"]:
        page.add('<p class="muted">no keep/drop rule judged a score in this run</p>')
    for cut in data["cuts"]:
        import numpy as np

        edges = np.asarray(cut["edges"])
        kept_n, drop_n = np.asarray(cut["kept"]), np.asarray(cut["dropped"])
        centres = ((edges[:-1] + edges[1:]) / 2).round(6).tolist()
        width = float(edges[1] - edges[0])
        fig = go.Figure([go.Bar(name="kept", x=centres, y=kept_n.tolist(), width=width, marker_color="#2f6fdf"),
                         go.Bar(name="dropped", x=centres, y=drop_n.tolist(), width=width, marker_color="#d9534f")])
        dropped = int(drop_n.sum())
        total = int(kept_n.sum()) + dropped
        share = dropped / total if total else 0.0
        fig.update_layout(barmode="stack", bargap=0, xaxis_title=cut["field"], yaxis_title="records",
                          title=f"{cut['step']}: {cut['rule']} ({share:.1%} dropped)")
        if cut["cut"] is not None:
            fig.add_vline(x=cut["cut"], line_dash="dash", line_color="#111",
                          annotation_text=f"cut {cut['cut']:g}", annotation_position="top")
        page.add(f'<h3>{_e(cut["step"])}</h3><p>{_e(cut["rule"])}: {dropped} of {total} records '
                 f'with a <code>{_e(cut["field"])}</code> dropped ({share:.1%})</p>')
        page.figure(fig, 320)

    # synthesis
    page.add('<h2 id="synthesis">Synthetic data: instruction types and the tag mapping</h2>')
    if not data["types"] and not data["mappings"]:
        page.add('<p class="muted">no synthesis in this run</p>')
    for t in data["types"]:
        ids_, labels, parents, values = _hierarchy(t["counts"])
        fig = go.Figure(go.Sunburst(ids=ids_, labels=labels, parents=parents, values=values, branchvalues="total"))
        fig.update_layout(title=f"{t['step']}: instruction types of the synthetic samples")
        page.figure(fig, 460)
        page.add("<details><summary>table</summary><table><tr><th>instruction type</th><th class=n>samples</th></tr>"
                 + "".join(f"<tr><td>{_e(k)}</td><td class=n>{v}</td></tr>" for k, v in t["counts"].items())
                 + "</table></details>")
    for m in data["mappings"]:
        mapping = m["mapping"]
        page.add(f'<h3>{_e(m["step"])}: TF-IDF mapping (image tags choose instruction types)</h3>')
        rows = []
        for kind, weights in (mapping.get("types") or {}).items():
            top = sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
            rows.append(f"<tr><td>{_e(kind)}</td><td>" + ", ".join(f"{_e(tag)} {w:.3f}" for tag, w in top) + "</td></tr>")
        page.add("<table><tr><th>instruction type</th><th>image tags (weight), strongest first</th></tr>"
                 + "".join(rows) + "</table>")

    # gallery
    page.add('<h2 id="gallery">Gallery: kept and dropped samples</h2>')
    for k in data["kept"]:
        page.add(f'<h3>kept in stage {_e(k["stage"])} (first {len(k["samples"])})</h3>')
        page.add('<div class="cards">' + "".join(_card(s) for s in k["samples"]) + "</div>")
    for d in data["dropped"]:
        page.add(f'<h3 id="drop-{_e(d["step"])}-{_e(d["reason"])}">dropped by {_e(d["step"])}: {_e(d["reason"])}</h3>')
        page.add('<div class="cards">' + "".join(_card(s) for s in d["samples"]) + "</div>")

    # training
    page.add('<h2 id="training">Training: loss per stage</h2>')
    curves = [t for t in data["training"] if t["log"]]
    if not curves:
        page.add('<p class="muted">no training step in this run</p>')
    else:
        fig = go.Figure()
        for t in curves:
            xs = [p.get("step", i + 1) for i, p in enumerate(t["log"]) if isinstance(p.get("loss"), (int, float))]
            ys = [p["loss"] for p in t["log"] if isinstance(p.get("loss"), (int, float))]
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=f"stage {t['stage']}"))
        fig.update_layout(title="training loss", xaxis_title="optimizer step", yaxis_title="loss")
        page.figure(fig, 360)

    title = _e(f"recipec report: {report['recipe']}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{title}</title><style>{CSS}</style>"
            f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>\n"
            + "\n".join(page.parts) + "\n</body></html>\n")


def _hierarchy(counts: dict[str, int]) -> tuple[list[str], list[str], list[str], list[int]]:
    """Sunburst nodes from `a/b/c` instruction types: every prefix a node, its value the sum below."""
    totals: Counter[str] = Counter()
    for tag, n in counts.items():
        parts = tag.split("/")
        for i in range(1, len(parts) + 1):
            totals["/".join(parts[:i])] += n
    ids = sorted(totals)
    return (ids, [i.rsplit("/", 1)[-1] for i in ids], [i.rsplit("/", 1)[0] if "/" in i else "" for i in ids],
            [totals[i] for i in ids])


def _card(s: dict[str, Any]) -> str:
    parts = ['<div class="card">']
    parts.extend(f'<img alt="" src="{t}">' for t in s.get("thumbs") or [])
    parts.append(f'<div class="muted">{_e(s.get("source", ""))} &middot; <code>{_e(s.get("id", ""))}</code><br>'
                 f'{_e(s.get("origin", ""))}</div>')
    if s.get("detail"):
        parts.append(f"<div><b>{_e(s['detail'])}</b></div>")
    if s.get("raw") is not None:
        parts.append(f"<pre>{_e(str(s['raw'])[:300])}</pre>")
    for who, text in s.get("turns") or []:
        parts.append(f'<div class="turn"><span class="who">{_e(who)}:</span> {_e(text[:240])}</div>')
    if s.get("scores"):
        parts.append("<div>" + ", ".join(f"{_e(k)} {v:g}" for k, v in s["scores"].items()) + "</div>")
    if s.get("tags"):
        parts.append(f'<div class="muted">{_e(", ".join(s["tags"][:8]))}</div>')
    parts.append("</div>")
    return "".join(parts)
