"""`recipec why`: a kept record, a near duplicate, a record a threshold dropped, a line rejected at ingest."""

from __future__ import annotations

import json

import pytest

from recipec.cli.main import main

from observe_project import make_run, rejects_of


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("why"))


def why(run, query, capsys) -> tuple[int, dict]:
    code = main(["why", query, "--out", str(run["out"]), "--json"])
    out = capsys.readouterr().out
    return code, (json.loads(out) if code == 0 else {})


def test_a_kept_record_by_its_own_id_and_by_recipec_id(run, capsys):
    exported = json.loads((run["out"] / "s1" / "s1.json").read_text())
    sample = exported[0]
    code, answer = why(run, sample["source_id"], capsys)
    assert code == 0
    assert answer["stages"] == ["s1"] and answer["fate"] == "in stage s1"
    assert answer["provenance"][0] == "ingest.captions" and "filter.processing.2.dedup_phash" in answer["provenance"]
    assert answer["origin"].startswith("captions/")
    code, again = why(run, answer["id"][:10], capsys)
    assert code == 0 and again["id"] == answer["id"]


def test_a_near_duplicate_names_the_copy_that_was_kept(run, capsys):
    reject = rejects_of(run, "filter.processing.2.dedup_phash")[0]
    code, answer = why(run, reject["id"], capsys)
    assert code == 0
    assert answer["dropped"]["reason"] == "near_duplicate"
    kept = answer["dropped"]["kept_copy"]
    assert kept["id"] in reject["detail"] and kept["id"] != answer["id"]


def test_a_record_a_threshold_dropped_shows_its_score_and_the_rule(run, capsys):
    reject = rejects_of(run, "filter.quality.1.keep_loss")[0]
    code, answer = why(run, reject["origin"].split(" ")[0], capsys)  # by file:line
    assert code == 0
    assert answer["dropped"] == {"step": "filter.quality.1.keep_loss", "op": "threshold",
                                 "reason": "threshold_loss", "detail": reject["detail"]}
    assert answer["scores"]["loss"] > 1.2
    assert answer["learnt"][0]["step"] == "ingest.general" and "loss" in answer["learnt"][0]["scores"]


def test_a_line_rejected_at_ingest_by_file_and_line(run, capsys):
    reject = next(r for r in rejects_of(run, "ingest.captions") if r["reason"] == "utf8_invalid")
    assert reject["id"] == ""
    code, answer = why(run, reject["origin"], capsys)
    assert code == 0
    assert answer["id"] is None and answer["fate"] == "dropped by ingest.captions: utf8_invalid"
    main(["why", reject["origin"], "--out", str(run["out"])])
    assert "never became a record" in capsys.readouterr().out


def test_an_unknown_id_exits_1_and_no_run_exits_2(run, capsys, tmp_path):
    assert main(["why", "no-such-record", "--out", str(run["out"])]) == 1
    assert main(["why", "x", "--out", str(tmp_path)]) == 2
