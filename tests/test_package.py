"""`recipec package`: the open-science package of a run, with its MOF checklist; byte-stable."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from recipec.cli.main import main

from observe_project import make_run, report_of


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("package"))


def test_package_holds_what_class_i_asks_for_the_runs_scope(run, tmp_path, capsys):
    dest = tmp_path / "pkg"
    assert main(["package", str(run["out"]), str(dest)]) == 0
    for rel in ("recipe/observe.recipe", "recipe/observe.recipe.lock", "report.json", "report.html",
                "cards/s1/README.md", "cards/s2/README.md", "provenance/records.parquet", "PIPELINE.md",
                "MOF.md", "mof.json"):
        assert (dest / rel).is_file(), rel
    card = (dest / "cards" / "s2" / "README.md").read_text()
    assert card.startswith("---\npretty_name:") and "- cc-by-4.0" in card and "- unknown" in card
    assert "**License missing** for text" in card
    assert "| filter.quality.1.keep_loss | threshold |" in card
    checklist = json.loads((dest / "mof.json").read_text())
    status = {c["component"]: c for c in checklist["components"]}
    assert status["Data card"]["status"] == "present"
    assert status["Research paper"]["status"] == "missing"
    assert status["Intermediate model parameters"]["status"] == "missing"  # planned, but this run did not train
    assert "MISSING for text" in status["Datasets"]["license"]
    assert checklist["unlicensed_sources"] == ["text"]
    records = pq.read_table(dest / "provenance" / "records.parquet")
    report = report_of(run)
    ingested = sum(s["records_in"] for s in report["steps"] if s["op"] == "ingest")
    assert records.num_rows == ingested  # every line read is traced: a record or a rejected line
    assert "| s1 |" in (dest / "PIPELINE.md").read_text()


def test_packaging_twice_gives_the_same_archive(run, tmp_path):
    assert main(["package", str(run["out"]), str(tmp_path / "a" / "pkg")]) == 0
    assert main(["package", str(run["out"]), str(tmp_path / "b" / "pkg")]) == 0
    assert (tmp_path / "a" / "pkg.tar.gz").read_bytes() == (tmp_path / "b" / "pkg.tar.gz").read_bytes()
