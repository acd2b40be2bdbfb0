"""The compiler: shipped recipes against golden IR and plans, the catalogue of invalid recipes, semantics."""

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, SHIPPED, check_golden
from recipec import ir
from recipec.compiler import compile_file
from recipec.plan import build_plan, plan_json

INVALID = sorted((ROOT / "tests" / "invalid").glob("*.recipe"))
MODEL = '''
model m {
  architecture = llava_onevision
  vision = "google/siglip-so400m-patch14-384"
  language = "Qwen/Qwen2.5-1.5B-Instruct"
}
'''


def compile_text(tmp_path: Path, text: str, name: str = "t.recipe"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return compile_file(str(path))


def codes(result) -> list[str]:
    return [d.code for d in result.diagnostics if d.is_error]


# ---- shipped recipes ------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_compiles_to_golden_ir_and_plan(recipe):
    result = compile_file(str(recipe.relative_to(ROOT)) if False else str(recipe))
    assert result.ok, [d.header() for d in result.diagnostics]
    ir_text = json.dumps(result.recipe.model_dump(mode="json"), indent=1, sort_keys=True) + "\n"
    check_golden(ROOT / "tests" / "golden" / "ir" / f"{recipe.stem}.json", ir_text)
    plan_text = json.dumps(plan_json(build_plan(result.recipe)), indent=1) + "\n"
    check_golden(ROOT / "tests" / "golden" / "plan" / f"{recipe.stem}.json", plan_text)


def test_aquila_plan_reproduces_table_3():
    recipe = compile_file(str(ROOT / "recipes" / "aquila-vl-2b.recipe")).recipe
    stages = {s.name: s for s in recipe.stages}
    assert [s.name for s in recipe.stages] == ["s1", "s2a", "s2b", "s2c", "s3", "s4"]
    model = recipe.models["aquila"]
    assert model.tokens_per_tile == 729  # (384 // 14) ** 2, from the SigLIP config
    assert model.params.projector == 4_131_840  # 1152*1536+1536 + 1536*1536+1536
    assert model.params.language == 1_543_714_304
    assert 1.9e9 < model.params.total < 2.1e9
    assert stages["s1"].max_image_tokens == 729
    assert stages["s1"].trainable_params == pytest.approx(4.13e6, rel=0.001)
    tiles = {name: stages[name].max_image_tokens // 729 for name in stages}
    assert tiles == {"s1": 1, "s2a": 5, "s2b": 6, "s2c": 7, "s3": 10, "s4": 10}
    for name in ("s2a", "s2b", "s2c", "s3", "s4"):
        assert stages[name].trainable_params == model.params.total
        assert stages[name].lr == 1e-5 and stages[name].batch == 512 and stages[name].epochs == 1
    assert stages["s1"].lr == 1e-3
    samples = {name: stages[name].composition.total for name in stages}
    assert samples["s1"] == 10_000_000 and samples["s3"] == 6_000_000 and samples["s4"] == 3_000_000
    assert sum(samples[n] for n in ("s2a", "s2b", "s2c")) == 25_800_000
    for name in ("s2a", "s2b", "s2c"):
        assert samples[name] == pytest.approx(8_600_000, abs=5)
    assert stages["s4"].composition.by_data_type["synthetic"] == 800_000


def test_ablations_differ_from_base_only_where_they_say():
    base = compile_file(str(ROOT / "recipes" / "aquila-vl-2b.recipe")).recipe
    no_syn = compile_file(str(ROOT / "recipes" / "aquila-vl-2b-no-synthetic.recipe")).recipe
    assert no_syn.base == "aquila-vl-2b"
    assert "synthetic" not in no_syn.syntheses and "synthetic" in base.syntheses
    assert no_syn.sources == base.sources
    assert no_syn.stages[:5] == base.stages[:5]
    assert no_syn.stages[5].composition.total == 2_200_000


# ---- invalid recipes: each must fail with exactly the expected codes and positions ----------------


def _expectations(path: Path) -> list[tuple[str, int, int]]:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    return [(c, int(l), int(col)) for c, l, col in re.findall(r"(E\d+) (\d+):(\d+)", first)]


@pytest.mark.parametrize("recipe", INVALID, ids=lambda p: p.name)
def test_invalid_recipe_reports_expected_diagnostics(recipe):
    result = compile_file(str(recipe))
    assert not result.ok
    found = sorted((d.code, d.span.line, d.span.column) for d in result.diagnostics if d.is_error)
    assert found == sorted(_expectations(recipe))
    for d in result.diagnostics:
        assert d.span is not None and d.message


# ---- semantics --------------------------------------------------------------------------------


def test_units_are_normalised(tmp_path):
    result = compile_text(tmp_path, 'recipe "t" { seed = 1 }' + MODEL + '''
source a { format = llava_jsonl  path = "a.jsonl"  expect = 8.6M }
source b { format = llava_jsonl  path = "b.jsonl"  expect = 1M }
stage s { lr = 1e-5  warmup = 5%  samples = 500K  mix { a = 30%  b = weight(1) } }
''')
    assert result.ok, [d.header() for d in result.diagnostics]
    stage = result.recipe.stages[0]
    assert stage.lr == 1e-5 and stage.warmup == 0.05 and stage.samples == 500_000
    assert stage.mix[0].kind == "share" and stage.mix[0].share == 0.3
    assert result.recipe.sources["a"].expect == 8_600_000
    assert stage.composition.by_source == {"a": 150_000, "b": 350_000}


def test_fractional_count_is_rejected(tmp_path):
    result = compile_text(tmp_path, 'recipe "t" {}\nsource a { format = parquet  path = "a"  expect = 1.23456K }\n')
    assert codes(result) == ["E202"]


def test_weights_fill_what_counts_leave(tmp_path):
    result = compile_text(tmp_path, 'recipe "t" {}' + MODEL + '''
source a { format = parquet  path = "a"  expect = 1M }
source b { format = parquet  path = "b"  expect = 1M }
source c { format = parquet  path = "c"  expect = 1M }
stage s { samples = 1M  mix { a = 100K  b = weight(3)  c = weight(1) } }
''')
    assert result.ok, [d.header() for d in result.diagnostics]
    assert result.recipe.stages[0].composition.by_source == {"a": 100_000, "b": 675_000, "c": 225_000}


def test_shares_need_a_stage_total(tmp_path):
    result = compile_text(tmp_path, 'recipe "t" {}' + MODEL + '''
source a { format = parquet  path = "a"  expect = 1M }
stage s { mix { a = 30% } }
''')
    assert codes(result) == ["E106"]
    assert "samples" in result.diagnostics[0].hint


def test_balance_caps_each_data_type(tmp_path):
    result = compile_text(tmp_path, 'recipe "t" {}' + MODEL + '''
source g { format = parquet  path = "g"  type = general  expect = 1M }
source o { format = parquet  path = "o"  type = ocr  expect = 100K }
source m { format = parquet  path = "m"  type = math_reasoning  expect = 1M }
stage s { samples = 900K  balance = data_type  mix { g = all  o = all  m = all } }
''')
    assert result.ok, [d.header() for d in result.diagnostics]
    assert result.recipe.stages[0].composition.by_data_type == {"general": 400_000, "ocr": 100_000, "math_reasoning": 400_000}


def test_disjoint_parts_cover_the_pool(tmp_path):
    stages = "".join(f"stage s{k} {{ mix {{ a = part({k}, 3) }} }}\n" for k in (1, 2, 3))
    result = compile_text(tmp_path, 'recipe "t" {}' + MODEL + 'source a { format = parquet  path = "a"  expect = 1000 }\n' + stages)
    assert result.ok
    assert [s.composition.total for s in result.recipe.stages] == [334, 333, 333]


def test_derived_recipe_overrides_adds_and_removes(tmp_path):
    (tmp_path / "base.recipe").write_text('recipe "base" { seed = 1 }' + MODEL + '''
source a { format = parquet  path = "a"  expect = 100 }
source b { format = parquet  path = "b"  expect = 100 }
stage s { lr = 1e-3  mix { a = all  b = all } }
''')
    result = compile_text(tmp_path, '''recipe "child" { extends = "base.recipe"  seed = 2 }
remove source.b
source c { format = parquet  path = "c"  expect = 50 }
stage s { lr = 2e-3  mix { remove b  c = all } }
''', "child.recipe")
    assert result.ok, [d.header() for d in result.diagnostics]
    r = result.recipe
    assert (r.name, r.base, r.seed) == ("child", "base", 2)
    assert set(r.sources) == {"a", "c"}
    assert r.stages[0].lr == 2e-3
    assert r.stages[0].composition.by_source == {"a": 100, "c": 50}


def test_paths_are_relative_to_the_file_that_names_them(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "base.recipe").write_text('recipe "base" {}\nsource a { format = parquet  path = "data/a.parquet" }\n')
    result = compile_text(tmp_path, 'recipe "child" { extends = "base/base.recipe" }\n', "child.recipe")
    assert result.ok
    assert result.recipe.sources["a"].paths == ("base/data/a.parquet",)


def test_fingerprint_ignores_layout_and_comments(tmp_path):
    text = (ROOT / "recipes" / "aquila-vl-2b.recipe").read_text()
    squashed = re.sub(r"(?m)(^|\s)(//|#)[^\n]*", " ", text)  # comments, not the // of a URL
    squashed = re.sub(r"\s+", " ", squashed)
    shutil.copytree(ROOT / "recipes" / "prompts", tmp_path / "prompts")  # a link out of tmp_path is refused
    shutil.copytree(ROOT / "recipes" / "taxonomies", tmp_path / "taxonomies")
    original = compile_file(str(ROOT / "recipes" / "aquila-vl-2b.recipe")).recipe
    reflowed = compile_text(tmp_path, squashed, "aquila-vl-2b.recipe").recipe
    assert ir.fingerprint(original) == ir.fingerprint(reflowed)


def test_trust_remote_code_only_where_asked():
    recipe = compile_file(str(ROOT / "recipes" / "aquila-vl-2b.recipe")).recipe
    trusted = {name for name, m in recipe.model_refs.items() if m.trust_remote_code}
    assert trusted == {"minicpm_v"}
    assert recipe.syntheses["synthetic"].model.trust_remote_code is True
    assert not any(m.vision.trust_remote_code or m.language.trust_remote_code for m in recipe.models.values())


def test_unknown_model_tower_is_a_diagnostic(tmp_path):
    result = compile_text(tmp_path, 'recipe "t" {}\nmodel m { architecture = llava_onevision  vision = "nobody/nothing"  language = "tiny://qwen2" }\n')
    assert codes(result) == ["E501"]
    assert "nobody/nothing" in result.diagnostics[0].message


def test_taxonomy_is_loaded_with_its_leaves():
    recipe = compile_file(str(ROOT / "recipes" / "aquila-vl-2b.recipe")).recipe
    taxonomy = recipe.taxonomies["instructions"]
    assert len(taxonomy.tree) == 6
    assert taxonomy.leaves >= 190


def test_shares_are_split_once_so_they_add_up(tmp_path):
    sources = "".join(f'source s{i} {{ format = parquet  path = "s{i}"  expect = 1K }}\n' for i in range(3))
    result = compile_text(tmp_path, 'recipe "t" {}' + MODEL + sources +
                          "stage s { samples = 100  mix { s0 = 33.34%  s1 = 33.33%  s2 = 33.33% } }\n")
    assert result.ok, [d.header() for d in result.diagnostics]
    composition = result.recipe.stages[0].composition
    assert composition.total == 100 and sum(composition.by_source.values()) == 100


# ---- the image tagger's vocabulary ----------------------------------------------------------------

TAGGER = '''recipe "t" {}
source s {
  format = llava_jsonl
  path = "s.jsonl"
  images = "images"
}
image_tagger tags {
  model = "tiny://siglip-tagger"
  on = [s]
  vocabulary = "VOCAB"
}
'''


def test_the_tag_vocabulary_is_read_into_the_recipe(tmp_path):
    (tmp_path / "tags.txt").write_text("# objects\ndog\ncat  # pets\n\ndog\nstreet\n", encoding="utf-8")
    result = compile_text(tmp_path, TAGGER.replace("VOCAB", "tags.txt"))
    assert codes(result) == []
    tagger = result.recipe.image_taggers["tags"]
    assert tagger.tags == ("dog", "cat", "street") and tagger.vocabulary == "tags.txt"
    # the tags are part of what the plan fingerprints: editing the file re-runs the tagging
    from recipec.plan import build_plan

    before = build_plan(result.recipe).steps["tag_images.tags"].fingerprint
    (tmp_path / "tags.txt").write_text("dog\ncat\nstreet\nsky\n", encoding="utf-8")
    after = build_plan(compile_text(tmp_path, TAGGER.replace("VOCAB", "tags.txt")).recipe).steps["tag_images.tags"]
    assert after.fingerprint != before


def test_an_empty_or_missing_vocabulary_is_located(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing here\n\n", encoding="utf-8")
    empty = compile_text(tmp_path, TAGGER.replace("VOCAB", "empty.txt"))
    [diagnostic] = [d for d in empty.diagnostics if d.is_error]
    assert (diagnostic.code, diagnostic.span.line) == ("E202", 10) and "holds no tag" in diagnostic.message
    missing = compile_text(tmp_path, TAGGER.replace("VOCAB", "absent.txt"))
    assert codes(missing) == ["E402"]


def test_seeds_of_a_synthesis_share_one_image_folder(tmp_path):
    text = '''recipe "t" {}
source a {
  format = llava_jsonl
  path = "a.jsonl"
  images = "images/a"
}
source b {
  format = llava_jsonl
  path = "b.jsonl"
  images = "images/b"
}
synthesize synthetic {
  from = [a, b]
  model = "tiny://llava-onevision"
}
'''
    result = compile_text(tmp_path, text)
    [diagnostic] = [d for d in result.diagnostics if d.is_error]
    assert (diagnostic.code, diagnostic.span.line, diagnostic.span.column) == ("E204", 12, 12)
    assert "images/a, images/b" in diagnostic.message
