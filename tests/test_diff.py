"""`recipec diff`: goldens for the shipped recipes, properties of the semantic diff, git revisions."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recipec import ir
from recipec.cli.main import main
from recipec.compiler import compile_file
from recipec.diff import ADDED, CHANGED, REMOVED, RENAMED, Rename, RecipeDiff, diff

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "diff"
UPDATE = os.environ.get("RECIPEC_UPDATE_GOLDEN") == "1"

BASE = "recipes/aquila-vl-2b.recipe"
NO_SYNTHETIC = "recipes/aquila-vl-2b-no-synthetic.recipe"
LLAVA_OV = "recipes/aquila-vl-2b-llava-ov-data.recipe"
PAIRS = {
    "base-vs-no-synthetic": (BASE, NO_SYNTHETIC),
    "base-vs-llava-ov-data": (BASE, LLAVA_OV),
    "no-synthetic-vs-llava-ov-data": (NO_SYNTHETIC, LLAVA_OV),
}
FORMATS = {"txt": [], "json": ["--json"], "md": ["--markdown"]}


@lru_cache(maxsize=None)
def compiled(path: str) -> ir.Recipe:
    result = compile_file(ROOT / path)
    assert result.ok, result.diagnostics
    return result.recipe


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["diff", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- goldens --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", PAIRS)
def test_golden(name, fmt, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = cli(capsys, *PAIRS[name], *FORMATS[fmt])
    assert (code, err) == (1, "")
    golden = GOLDEN / f"{name}.{fmt}"
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(out, encoding="utf-8")
    assert out == golden.read_text(encoding="utf-8"), f"regenerate with RECIPEC_UPDATE_GOLDEN=1 if intended: {golden}"


def test_base_against_no_synthetic_shows_only_the_ablation():
    d = diff(compiled(BASE), compiled(NO_SYNTHETIC))
    removed = {c.path for c in d.changes if c.kind == REMOVED}
    assert {"syntheses.synthetic", "mappings.image_to_task", "image_taggers.ram"} <= removed
    assert not any(c.path.startswith("sources.") for c in d.changes)  # the data itself is unchanged
    (s4,) = d.stages
    assert (s4.name, s4.samples.before, s4.samples.after, s4.samples.delta) == ("s4", 3_000_000, 2_200_000, -800_000)
    synthetic = next(r for r in s4.by_source if r.name == "synthetic")
    assert (synthetic.status, synthetic.before, synthetic.after, synthetic.share_after) == (REMOVED, 800_000, 0, None)
    general = next(r for r in s4.by_source if r.name == "gpt4_general")
    assert (general.share_before, general.share_after) == (0.333333, 0.454545)
    recompute = {s.id for s in d.cost.recompute}
    assert "train.s4" in recompute and "ingest.gpt4_general" not in recompute
    assert "synthesize.synthetic.questions" in d.cost.removed
    assert set(d.cost.cached) == {f"ingest.{name}" for name in compiled(BASE).sources}


def test_json_keys_are_the_documented_ones():
    data = diff(compiled(BASE), compiled(LLAVA_OV), a_label="a", b_label="b").to_json()
    assert list(data) == ["a", "b", "equal", "changes", "renames", "stages", "cost"]
    assert set(data["changes"][0]) == {"path", "kind", "before", "after"}
    stage = data["stages"][0]
    assert list(stage) == ["name", "status", "renamed_from", "samples", "max_image_tokens", "trainable_params",
                           "by_source", "by_data_type", "by_category"]
    assert set(stage["by_source"][0]) == {"name", "status", "renamed_from", "before", "after", "delta",
                                          "share_before", "share_after"}
    assert set(data["cost"]) == {"recompute", "cached", "removed"}
    assert set(data["cost"]["recompute"][0]) == {"id", "op", "uses_model", "reason"}
    json.dumps(data)  # plain JSON all the way down


# ---- properties -----------------------------------------------------------------------------------


def _sorted_changes(d: RecipeDiff):
    return sorted(((c.path, c.kind, json.dumps(c.before, sort_keys=True), json.dumps(c.after, sort_keys=True))
                   for c in d.changes))


def assert_mirrors(ab: RecipeDiff, ba: RecipeDiff) -> None:
    assert ab.equal == ba.equal
    assert _sorted_changes(ba) == sorted(((c.path, c.kind, json.dumps(c.before, sort_keys=True),
                                           json.dumps(c.after, sort_keys=True))
                                          for c in (c.mirrored() for c in ab.changes)))
    assert sorted(map(repr, ba.renames)) == sorted(repr(r.mirrored()) for r in ab.renames)
    mirrored = {s.name: s.mirrored() for s in ab.stages}
    assert set(mirrored) == {s.name for s in ba.stages}
    for stage in ba.stages:
        expected = mirrored[stage.name]
        assert (stage.status, stage.samples, stage.max_image_tokens, stage.trainable_params) == \
               (expected.status, expected.samples, expected.max_image_tokens, expected.trainable_params)
        for table in ("by_source", "by_data_type", "by_category"):
            key = lambda r: r.name  # noqa: E731
            assert sorted(getattr(stage, table), key=key) == sorted(getattr(expected, table), key=key)
    assert {s.id for s in ba.cost.recompute if s.reason == ADDED} == set(ab.cost.removed)
    assert {s.id for s in ab.cost.recompute if s.reason == ADDED} == set(ba.cost.removed)


@pytest.mark.parametrize("path", [BASE, NO_SYNTHETIC, LLAVA_OV])
def test_a_recipe_equals_itself(path):
    d = diff(compiled(path), compiled(path))
    assert d.equal and not d.changes and not d.renames and not d.stages
    assert not d.cost.recompute and not d.cost.removed


@pytest.mark.parametrize("path", [BASE, NO_SYNTHETIC, LLAVA_OV])
def test_formatting_changes_nothing(path):
    from recipec.fmt import format_text

    text = (ROOT / path).read_text(encoding="utf-8")
    formatted = format_text(text, path)
    result = compile_file(ROOT / path, text=formatted)
    assert result.ok
    assert diff(compiled(path), result.recipe).equal


def test_layout_comments_and_block_order_change_nothing():
    text = (ROOT / BASE).read_text(encoding="utf-8")
    block = re.search(r"^model gpt4o \{.*?^\}\n", text, re.M | re.S).group(0)
    moved = text.replace(block, "") + "\n// moved here\n" + block.replace("\n  ", "\n        ")
    result = compile_file(ROOT / BASE, text=moved)
    assert result.ok
    assert diff(compiled(BASE), result.recipe).equal


@pytest.mark.parametrize("a,b", list(PAIRS.values()))
def test_shipped_pairs_mirror(a, b):
    assert_mirrors(diff(compiled(a), compiled(b)), diff(compiled(b), compiled(a)))


def test_a_renamed_source_is_a_rename():
    text = (ROOT / BASE).read_text(encoding="utf-8")
    result = compile_file(ROOT / BASE, text=re.sub(r"\bgpt4_text\b", "gpt4_pure_text", text))
    assert result.ok
    d = diff(compiled(BASE), result.recipe)
    assert d.renames == (Rename("sources", "gpt4_text", "gpt4_pure_text"),)
    assert [c for c in d.changes if c.kind == RENAMED][0].path == "sources.gpt4_text"
    assert not any(c.kind in (ADDED, REMOVED) for c in d.changes)
    (s4,) = d.stages
    row = next(r for r in s4.by_source if r.renamed_from)
    assert (row.renamed_from, row.name, row.before, row.after) == ("gpt4_text", "gpt4_pure_text", 300_000, 300_000)
    assert_mirrors(d, diff(result.recipe, compiled(BASE)))


def test_settings_thresholds_and_ops_by_path():
    text = (ROOT / BASE).read_text(encoding="utf-8")
    edited = (text.replace("max_distance = 4", "max_distance = 6")
              .replace("keep score >= 8", "keep score >= 7")
              .replace("lr = 1e-3", "lr = 2e-3")
              .replace("drop loss top 5%", "drop loss top 3%"))
    result = compile_file(ROOT / BASE, text=edited)
    assert result.ok
    changes = {c.path: (c.kind, c.before, c.after) for c in diff(compiled(BASE), result.recipe).changes}
    assert changes == {
        "filters.processing.ops.dedup_phash.max_distance": (CHANGED, 4, 6),
        "filters.processing.ops.percentile.condition.value": (CHANGED, 0.05, 0.03),
        "syntheses.synthetic.rules[keep score].value": (CHANGED, 8.0, 7.0),
        "stages.s1.lr": (CHANGED, 0.001, 0.002),
    }


def test_taxonomy_nodes_by_path_through_a_reader():
    def read(path: Path) -> str:  # the included taxonomy as another revision would have it
        text = path.read_text(encoding="utf-8")
        if path.name == "infinity-mm.yaml":
            text = re.sub(r"- name: Identify time$", "- name: Identify the time", text, count=1, flags=re.M)
        return text

    result = compile_file(ROOT / BASE, read=read)
    assert result.ok
    node = "taxonomies.instructions.tree[Coarse Perception].children[Image Scene].children"
    changes = {(c.kind, c.path) for c in diff(compiled(BASE), result.recipe).changes}
    assert changes == {(CHANGED, "taxonomies.instructions.sha256"), (REMOVED, f"{node}[Identify time]"),
                       (ADDED, f"{node}[Identify the time]")}


def test_stage_order_is_a_change():
    recipe = compiled(BASE)
    swapped = recipe.model_copy(update={"stages": (recipe.stages[1], recipe.stages[0], *recipe.stages[2:])})
    d = diff(recipe, swapped)
    assert d.changes == (d.changes[0],) and d.changes[0].path == "stages"
    assert d.changes[0].after[:2] == ["s2a", "s1"]


def _edit_stage(recipe: ir.Recipe, index: int, counts: list[int], lr: float, batch: int, epochs: float) -> ir.Recipe:
    stage = recipe.stages[index]
    names = list(stage.composition.by_source)
    by_source = {name: counts[i % len(counts)] for i, name in enumerate(names)}
    composition = stage.composition.model_copy(update={"by_source": by_source, "total": sum(by_source.values())})
    edited = stage.model_copy(update={"composition": composition, "lr": lr, "batch": batch, "epochs": epochs})
    return recipe.model_copy(update={"stages": tuple(edited if i == index else s for i, s in enumerate(recipe.stages))})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, 5), counts=st.lists(st.integers(0, 10**8), min_size=1, max_size=6),
       lr=st.sampled_from([1e-5, 2e-5, 1e-3]), batch=st.sampled_from([256, 512, 1024]),
       epochs=st.sampled_from([1.0, 2.0]), other=st.sampled_from([BASE, NO_SYNTHETIC]))
def test_random_stage_edits_mirror(index, counts, lr, batch, epochs, other):
    a = compiled(other)
    b = _edit_stage(a, index, counts, lr, batch, epochs)
    ab, ba = diff(a, b), diff(b, a)
    assert_mirrors(ab, ba)
    assert ab.equal == (a == b)
    for stage in ab.stages:
        for row in stage.by_source:
            assert row.delta == (None if row.before is None or row.after is None else row.after - row.before)


# ---- the command ----------------------------------------------------------------------------------


def test_equal_exits_zero(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = cli(capsys, BASE, BASE, "--json")
    assert code == 0 and json.loads(out)["equal"] is True


def test_a_side_that_does_not_compile_is_reported_as_check_does(capsys, monkeypatch, tmp_path):
    bad = tmp_path / "bad.recipe"
    bad.write_text('recipe "bad" { seed = }\n', encoding="utf-8")
    main(["check", str(bad)])
    checked = capsys.readouterr().err
    code, out, err = cli(capsys, str(bad), str(ROOT / BASE))
    assert code == 2 and out == ""
    diagnostics = checked.split("\n1 file(s) checked")[0]
    assert diagnostics.strip() and diagnostics in err


def test_usage_errors(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    assert cli(capsys)[0] == 2
    assert cli(capsys, BASE, BASE, NO_SYNTHETIC)[0] == 2
    code, _, err = cli(capsys, "no-such-thing", BASE)
    assert code == 2 and "neither a file nor a git revision" in err


def test_textconv_prints_the_canonical_form(capsys, tmp_path):
    from recipec.fmt import format_text

    messy = tmp_path / "m.recipe"
    messy.write_text('recipe "m" {   seed=1 }\n// kept\nmodel x {ref="a/b"}\n', encoding="utf-8")
    assert cli(capsys, "--textconv", str(messy))[:2] == (0, format_text(messy.read_text(), str(messy)))
    broken = tmp_path / "b.recipe"
    broken.write_text('recipe "b" { seed= }', encoding="utf-8")
    assert cli(capsys, "--textconv", str(broken))[:2] == (0, 'recipe "b" { seed= }')


def test_diff_does_not_import_torch():
    code = ("import sys; from recipec.cli.main import main; "
            f"main(['diff', {BASE!r}, {NO_SYNTHETIC!r}, '--json']); "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


# ---- git ------------------------------------------------------------------------------------------

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository with the shipped recipes, one commit that edits the base, and a working-tree edit."""
    for key, value in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
                       "GIT_COMMITTER_EMAIL": "t@example.org", "GIT_CONFIG_NOSYSTEM": "1",
                       "GIT_CONFIG_GLOBAL": os.devnull, "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    top = tmp_path / "repo"
    shutil.copytree(ROOT / "recipes", top / "recipes")

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=top, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "recipes")
    base = top / BASE
    base.write_text(base.read_text().replace("expect = 500K", "expect = 600K"))  # gpt4_ocr
    question = top / "recipes/prompts/question.txt"
    question.write_text(question.read_text() + "Ask about one thing only.\n")
    git("commit", "-qam", "more OCR data, a stricter question prompt")
    base.write_text(base.read_text().replace("lr = 1e-3", "lr = 2e-3"))
    monkeypatch.chdir(top)
    return SimpleNamespace(top=top, git=git)


def _paths(data) -> dict[str, tuple]:
    return {c["path"]: (c["before"], c["after"]) for c in data["changes"]}


@needs_git
def test_revisions_are_read_from_git(repo, capsys):
    code, out, err = cli(capsys, f"HEAD~1:{BASE}", f"HEAD:{BASE}", "--json")
    assert (code, err) == (1, "")
    data = json.loads(out)
    assert data["a"]["label"] == f"HEAD~1:{BASE}"
    changes = _paths(data)
    assert changes["sources.gpt4_ocr.expect"] == (500_000, 600_000)
    assert changes["prompts.question.text"][1].endswith("Ask about one thing only.\n")  # the included file, at HEAD
    assert "stages.s1.lr" not in changes  # the working tree is not read
    (s4,) = data["stages"]
    assert s4["samples"]["delta"] == 100_000


@needs_git
def test_extends_is_resolved_inside_the_revision(repo, capsys):
    code, out, _ = cli(capsys, f"HEAD~1:{NO_SYNTHETIC}", f"HEAD:{NO_SYNTHETIC}", "--json")
    assert code == 1
    # the variant's file did not change; its base did, in the revision
    assert _paths(json.loads(out)) == {"sources.gpt4_ocr.expect": (500_000, 600_000)}


@needs_git
def test_revision_against_the_working_tree(repo, capsys):
    code, out, _ = cli(capsys, "HEAD", BASE, "--json")
    assert code == 1
    (only,) = json.loads(out)
    assert (only["a"]["label"], only["b"]["label"]) == (f"HEAD:{BASE}", BASE)
    assert _paths(only) == {"stages.s1.lr": (0.001, 0.002)}
    # without paths: the changed recipe and the variants that extend it
    code, out, _ = cli(capsys, "HEAD", "--json")
    assert code == 1
    data = json.loads(out)
    assert [d["b"]["label"] for d in data] == [LLAVA_OV, NO_SYNTHETIC, BASE]
    assert all(_paths(d) == {"stages.s1.lr": (0.001, 0.002)} for d in data)
    code, out, _ = cli(capsys, "HEAD~1")
    assert code == 1 and "~ sources.gpt4_ocr.expect: 500000 -> 600000" in out


@needs_git
def test_committed_state_is_equal(repo, capsys):
    repo.git("checkout", "--", ".")
    code, out, _ = cli(capsys, "HEAD", "--json")
    assert (code, json.loads(out)) == (0, [])


@needs_git
def test_git_diff_uses_the_driver(repo):
    (repo.top / ".gitattributes").write_text("*.recipe diff=recipe\n")
    command = f"{sys.executable} -m recipec diff"
    repo.git("config", "diff.recipe.textconv", f"{command} --textconv")
    repo.git("config", "diff.recipe.command", f"{command} --git-external")
    out = repo.git("diff")
    assert f"--- a/{BASE} (aquila-vl-2b)" in out and "~ stages.s1.lr: 0.001 -> 0.002" in out
    (repo.top / "notes.txt").write_text("one\n")
    repo.git("add", "notes.txt")
    (repo.top / "notes.txt").write_text("one\ntwo\n")
    out = subprocess.run(["git", "diff", "--", "notes.txt"], cwd=repo.top, capture_output=True, text=True, check=True,
                         env={**os.environ, "GIT_EXTERNAL_DIFF": f"{command} --git-external"}).stdout
    assert "--- a/notes.txt\n+++ b/notes.txt\n" in out and "+two" in out
    log = repo.git("log", "-p", "-1", "--format=", "--", BASE)  # no external diff: the textconv form
    assert "-  expect = 500K\n+  expect = 600K" in log


def test_steps_whose_only_change_is_upstream_may_stay_cached():
    """Dropping the synthetic set changes the pool every stage mixes from, but not the stages that
    never drew from it: their export and training may stay cached (early cutoff), while the steps
    whose own params changed, and the stage that used the set, are recomputed for sure."""
    d = diff(compiled(BASE), compiled(NO_SYNTHETIC))
    steps = {s.id: s for s in d.cost.recompute}
    maybe = {s for s, c in steps.items() if c.may_stay_cached}
    assert {"export.s1", "train.s1", "export.s3", "train.s3"} <= maybe
    assert not maybe & {"collect", "mix.s1", "mix.s4", "export.s4", "train.s4"}
    assert all(steps[s].reason == CHANGED for s in maybe)
    assert diff(compiled(BASE), compiled(BASE)).cost.recompute == ()
    data = d.to_json()["cost"]["recompute"]
    assert {r["id"] for r in data if r.get("may_stay_cached")} == maybe
