"""report.html: self-contained, deterministic, its numbers those of report.json, and it renders in
headless Chromium (Debian's package) with no console errors."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from recipec.cli.main import main

from observe_project import make_run, report_of

CELL = re.compile(r'data-report="([^"]+)">([^<]*)<')


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("observe"))


def lookup(report: dict, path: str):
    """A value of report.json by a page's `data-report` path (list entries by their id or name)."""
    node = report
    for part in path.split("/"):
        if isinstance(node, list):
            node = node[int(part)] if part.isdigit() else next(e for e in node if e.get("id", e.get("name")) == part)
        else:
            node = node[part]
    return node


def numbers_match(page: str, report: dict) -> int:
    cells = CELL.findall(page)
    for path, text in cells:
        value = lookup(report, path)
        assert html.unescape(text) == ("" if value is None else str(value)), path
    return len(cells)


def test_the_page_is_self_contained_and_its_numbers_are_the_reports(run):
    page = (run["out"] / "report.html").read_text("utf-8")
    report = report_of(run)
    markup = re.sub(r"(?s)(<script[^>]*>).*?</script>", r"\1</script>", page)  # plotly.js itself mentions CDNs
    assert not re.search(r"<script[^>]*\bsrc=|<link\b|(src|href)=\"(https?:)?//", markup)
    assert page.count("<script") >= 2  # plotly.js inline, then the figures
    assert page.count('class="plotly-graph-div"') >= len(report["stages"]) + 2  # stages, funnel, the loss cut
    checked = numbers_match(page, report)
    assert checked >= 2 * len(report["steps"])
    for step in report["steps"]:
        assert f'data-report="steps/{step["id"]}/records_out">{step["records_out"]}<' in page
    assert "<h3>filter.quality.1.keep_loss</h3><p>keep loss &lt;= 1.2: 1 of" in page  # the cut's histogram
    assert 'href="rejects/filter.processing.2.dedup_phash.jsonl"' in page
    assert 'id="drop-filter.processing.2.dedup_phash-near_duplicate"' in page  # examples in the gallery
    assert "data:image/jpeg;base64," in page  # thumbnails


def test_the_same_run_gives_the_same_page(run, tmp_path):
    assert main(["run", str(run["recipe"]), "--store", str(run["store"]), "--out", str(tmp_path / "again"),
                 "--data-only", "-q"]) == 0
    assert (tmp_path / "again" / "report.html").read_bytes() == (run["out"] / "report.html").read_bytes()


def test_a_stage_a_filter_empties_is_a_warning_and_an_error_under_strict(run, tmp_path, capsys):
    recipe = run["root"] / "emptied.recipe"
    recipe.write_text(run["recipe"].read_text().replace("keep loss <= 1.2", "keep loss <= -1")
                      .replace("    text = all\n", ""))
    # the threshold on `general` leaves none of it, and stage s2 takes only `general`
    out = tmp_path / "emptied"
    assert main(["run", str(recipe), "--store", str(run["store"]), "--out", str(out), "--data-only", "-q"]) == 0
    warnings = report_of({"out": out})["warnings"]
    assert [(w["kind"], w["stage"]) for w in warnings] == [("stage_empty", "s2")]
    assert "warning: stage s2 is empty" in capsys.readouterr().err
    assert main(["run", str(recipe), "--store", str(run["store"]), "--out", str(out), "--data-only", "-q",
                 "--strict"]) == 1
    assert "error (--strict)" in capsys.readouterr().err
    assert "stage s2 is empty" in (out / "report.html").read_text("utf-8")


def test_a_stage_short_of_its_plan_is_a_warning(run, tmp_path):
    recipe = run["root"] / "short.recipe"
    recipe.write_text(run["recipe"].read_text().replace("    captions = all", "    captions = cap(500)")
                      .replace('  license = "cc0-1.0"', '  license = "cc0-1.0"\n  expect = 500'))
    out = tmp_path / "short"
    assert main(["run", str(recipe), "--store", str(run["store"]), "--out", str(out), "--data-only", "-q",
                 "--strict"]) == 1
    warnings = report_of({"out": out})["warnings"]
    assert any(w["kind"] == "stage_short" and w["stage"] == "s1" for w in warnings), warnings


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_the_page_renders_in_headless_chromium(run, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium; .ci/run installs it)")
    page = run["out"] / "report.html"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=15000", "--window-size=1280,2000"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    charts = page.read_text("utf-8").count('class="plotly-graph-div"')
    assert dom.stdout.count('class="main-svg"') >= charts  # plotly drew every chart
    assert numbers_match(dom.stdout, report_of(run)) > 0
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # not a blank page: bars, text, thumbnails


def test_a_cut_histogram_counts_every_kept_and_dropped_value_shard_by_shard(run):
    import json
    from types import SimpleNamespace

    import numpy as np
    import pyarrow.parquet as pq

    from recipec.runtime import report_html
    from recipec.runtime.store import Store

    store = Store(run["store"])
    step = "filter.quality.1.keep_loss"
    key = next(s["key"] for s in report_of(run)["steps"] if s["id"] == step)  # this run's, not another test's
    manifest = json.loads((store.step_dir(key) / "manifest.json").read_text())
    outcome = SimpleNamespace(id=step, key=manifest["key"], manifest=manifest)
    condition = {"verb": "keep", "field": "loss", "op": "<=", "value": 1.2}
    kept = [dict(s)["loss"] for e in manifest["records"]
            for s in pq.read_table(store.path(manifest["key"], e["name"])).column("scores").to_pylist() if s and "loss" in dict(s)]
    dropped = [dict(json.loads(r["record"])["scores"])["loss"] for e in manifest["rejects"]
               for r in pq.read_table(store.path(manifest["key"], e["name"])).to_pylist()]
    assert kept and dropped
    cut = report_html._cut(store, outcome, condition)
    edges = np.linspace(min(kept + dropped), max(kept + dropped), report_html.BINS + 1)
    assert cut["edges"] == edges.tolist()
    assert cut["kept"] == np.histogram(kept, bins=edges)[0].tolist()
    assert cut["dropped"] == np.histogram(dropped, bins=edges)[0].tolist()
    assert cut["cut"] == 1.2 and sum(cut["kept"]) == len(kept) and max(dropped) > 1.2 >= max(kept)
    # the same shards listed twice: each is read on its own, and the counts add up
    twice = SimpleNamespace(id=step, key=manifest["key"], manifest={**manifest, "records": manifest["records"] * 2})
    assert report_html._cut(store, twice, condition)["kept"] == [2 * n for n in cut["kept"]]
