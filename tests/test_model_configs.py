"""Model-config resolution and parameter / image-token arithmetic (no torch, no network).

The exact counts below were checked once against transformers' own models built on the meta
device (SiglipVisionModel, Qwen2ForCausalLM, LlavaOnevisionForConditionalGeneration).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recipec.models.configs import (
    TINY_REFS,
    ModelConfigError,
    ResolvedConfig,
    count_model_params,
    count_params,
    max_image_tokens,
    resolve_config,
    shipped_refs,
    tower_configs,
    vision_geometry,
    vision_tower_config,
)

SIGLIP = "google/siglip-so400m-patch14-384"
QWEN = "Qwen/Qwen2.5-1.5B-Instruct"


@pytest.fixture(autouse=True)
def _empty_hf_cache(tmp_path, monkeypatch):
    # Never let a developer's real cache decide what resolves.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


@pytest.fixture
def towers() -> tuple[dict, dict]:
    vision = vision_tower_config(resolve_config(SIGLIP).config)
    return vision, resolve_config(QWEN).config


# ---------------------------------------------------------------------------- exact counts


def test_aquila_counts_are_exact(towers):
    vision, language = towers
    counts = count_params(vision, language)
    assert counts == {
        "vision": 412_987_248,  # so400m, 27 layers, post_layernorm, no pooling head
        "projector": 4_131_840,  # 1152*1536 + 1536 + 1536*1536 + 1536
        "language": 1_543_714_304,  # Qwen2.5-1.5B, lm_head tied to the embeddings
        "image_newline": 1_536,
        "total": 1_960_834_928,
    }


def test_untied_language_adds_lm_head(towers):
    vision, language = towers
    untied = count_params(vision, language, tie_word_embeddings=False)["language"]
    assert untied == 1_543_714_304 + 151_936 * 1536 == 1_777_088_000


def test_vision_feature_layer_minus_two_drops_one_layer_and_post_layernorm(towers):
    vision, language = towers
    full = count_params(vision, language, vision_feature_layer=-1)["vision"]
    minus_two = count_params(vision, language, vision_feature_layer=-2)["vision"]
    hidden, inter = 1152, 4304
    per_layer = 4 * (hidden * hidden + hidden) + 4 * hidden + 2 * hidden * inter + inter + hidden
    assert minus_two == 397_745_440
    assert full - minus_two == per_layer + 2 * hidden
    # A positive index counts layers from the bottom: 26 layers is the same tower as -2.
    assert count_params(vision, language, vision_feature_layer=26)["vision"] == minus_two


def test_vision_pooling_head_only_when_asked(towers):
    vision, language = towers
    with_head = count_params({**vision, "vision_use_head": True}, language)["vision"]
    assert with_head == 428_225_600


def test_feature_layer_list_widens_projector(towers):
    vision, language = towers
    counts = count_params(vision, language, vision_feature_layer=[-2, -5])
    assert counts["projector"] == 2 * 1152 * 1536 + 1536 + 1536 * 1536 + 1536
    assert counts["vision"] == 397_745_440


def test_projector_spellings(towers):
    vision, language = towers
    assert count_params(vision, language, projector="linear")["projector"] == 1152 * 1536 + 1536
    mlp3 = count_params(vision, language, projector="mlp3x_gelu")["projector"]
    assert mlp3 == 4_131_840 + 1536 * 1536 + 1536


def test_llama_style_counts():
    vision = resolve_config("tiny://siglip").config
    llama = {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "attention_bias": True,
        "mlp_bias": True,
    }
    # values from transformers' LlamaForCausalLM with the same config
    assert count_params(vision, llama)["language"] == 52_080
    plain = {k: v for k, v in llama.items() if k not in ("attention_bias", "mlp_bias")}
    plain.update(num_key_value_heads=None, head_dim=None)
    assert count_params(vision, plain)["language"] == 51_312


def test_tiny_llava_onevision_counts():
    cfg = resolve_config("tiny://llava-onevision").config
    # values from transformers' LlavaOnevisionForConditionalGeneration built from this config
    assert count_model_params(cfg) == {
        "vision": 291_968,
        "projector": 33_024,
        "language": 361_600,
        "image_newline": 128,
        "total": 686_720,
    }


# ---------------------------------------------------------------------------- image tokens


def test_siglip_384_14_gives_729_tokens():
    geometry = vision_geometry(resolve_config(SIGLIP).config)
    assert (geometry.image_size, geometry.patch_size, geometry.hidden_size) == (384, 14, 1152)
    assert geometry.tokens_per_tile == 729


def test_image_size_override():
    vision = vision_tower_config(resolve_config(SIGLIP).config)
    assert vision_geometry(vision, image_size=768).tokens_per_tile == 54 * 54


@pytest.mark.parametrize(
    ("grid", "max_tiles", "tiles"),
    [((1, 1), None, 1), ((2, 2), 4, 5), ((3, 3), 5, 6), ((4, 4), 6, 7), ((6, 6), 9, 10)],
)
def test_max_image_tokens_aquila_stages(grid, max_tiles, tiles):
    assert max_image_tokens(729, grid, max_tiles) == tiles * 729


def test_max_image_tokens_without_cap_counts_every_tile():
    assert max_image_tokens(729, (2, 3), None) == 7 * 729
    assert max_image_tokens(729, (1, 1), 9) == 729


def test_max_image_tokens_rejects_nonsense():
    with pytest.raises(ValueError):
        max_image_tokens(729, (0, 2), None)
    with pytest.raises(ValueError):
        max_image_tokens(729, (2, 2), 0)


# ---------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("ref", TINY_REFS)
def test_tiny_refs_resolve(ref):
    resolved = resolve_config(ref)
    assert (resolved.ref, resolved.origin, resolved.location) == (ref, "tiny", ref)
    assert resolved.config["model_type"] in {"llava_onevision", "siglip_vision_model", "siglip", "qwen2", "qwen2_vl"}


def test_tiny_llava_onevision_shape():
    cfg = resolve_config("tiny://llava-onevision").config
    vision, text = tower_configs(cfg)
    assert cfg["model_type"] == "llava_onevision"
    assert (vision["image_size"], vision["patch_size"], vision["hidden_size"]) == (32, 8, 128)
    assert (text["hidden_size"], text["num_key_value_heads"], text["vocab_size"]) == (128, 1, 512)
    # head_dim 64 in both towers: the smallest vLLM's CPU attention accepts
    assert vision["hidden_size"] // vision["num_attention_heads"] == text["hidden_size"] // text["num_attention_heads"] == 64
    assert cfg["image_token_index"] < text["vocab_size"]
    assert [32, 32] in cfg["image_grid_pinpoints"] and [192, 192] in cfg["image_grid_pinpoints"]


def test_tiny_configs_are_fresh_copies():
    resolve_config("tiny://qwen2").config["hidden_size"] = 999
    assert resolve_config("tiny://qwen2").config["hidden_size"] == 128


def test_local_directory_and_file(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))

    by_dir = resolve_config(str(model))
    assert by_dir.origin == "local"
    assert by_dir.location == str(model / "config.json")
    assert by_dir.config["hidden_size"] == 8

    by_file = resolve_config(str(model / "config.json"))
    assert (by_file.origin, by_file.config) == ("local", by_dir.config)

    relative = resolve_config("my-model", base_dir=tmp_path)
    assert (relative.origin, relative.ref) == ("local", "my-model")


def test_local_path_shadows_hub_id(tmp_path):
    (tmp_path / "Qwen" / "Qwen2.5-1.5B-Instruct").mkdir(parents=True)
    (tmp_path / "Qwen" / "Qwen2.5-1.5B-Instruct" / "config.json").write_text('{"local": true}')
    assert resolve_config(QWEN, base_dir=tmp_path).config == {"local": True}


def _fake_hf_cache(root: Path, ref: str, snapshots: dict[str, dict], refs: dict[str, str]) -> Path:
    repo = root / ("models--" + ref.replace("/", "--"))
    for commit, config in snapshots.items():
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for name, commit in refs.items():
        (repo / "refs" / name).write_text(commit)
    return repo


def test_hf_cache_is_preferred_to_shipped(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = _fake_hf_cache(
        cache,
        QWEN,
        {"aaa111": {"model_type": "qwen2", "which": "main"}, "bbb222": {"which": "v1"}},
        {"main": "aaa111", "v1": "bbb222"},
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    main = resolve_config(QWEN)
    assert main.origin == "hf_cache"
    assert main.location == str(repo / "snapshots" / "aaa111" / "config.json")
    assert main.config["which"] == "main"

    assert resolve_config(QWEN, revision="v1").config["which"] == "v1"  # refs/<revision>
    assert resolve_config(QWEN, revision="bbb222").config["which"] == "v1"  # a snapshot hash
    # A revision the cache lacks is not silently swapped for another snapshot.
    assert resolve_config(QWEN, revision="v9").origin == "shipped"


def test_hf_home_is_used_without_hf_hub_cache(tmp_path, monkeypatch):
    _fake_hf_cache(tmp_path / "home" / "hub", "acme/widget", {"c0ffee": {"x": 1}}, {})
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    resolved = resolve_config("acme/widget")  # no refs/main: the only snapshot
    assert (resolved.origin, resolved.config) == ("hf_cache", {"x": 1})


def test_shipped_configs_resolve():
    assert set(shipped_refs()) == {
        "google/siglip-so400m-patch14-384",
        "Qwen/Qwen2.5-1.5B-Instruct",
        "Qwen/Qwen2-VL-2B-Instruct",
        "Qwen/Qwen2-VL-7B-Instruct",
        "openbmb/MiniCPM-V-2_6",
        "lmms-lab/llava-onevision-qwen2-0.5b-ov",
    }
    for ref in shipped_refs():
        resolved = resolve_config(ref)
        assert resolved.origin == "shipped", ref
        assert Path(resolved.location).name == ref.replace("/", "--") + ".json"
        assert resolved.config["model_type"]


def test_shipped_siglip_is_a_full_siglip_model_config():
    cfg = resolve_config(SIGLIP).config
    assert cfg["model_type"] == "siglip" and "text_config" in cfg
    assert vision_tower_config(cfg)["num_hidden_layers"] == 27
    assert vision_tower_config(cfg) == vision_tower_config(vision_tower_config(cfg))


def test_resolved_config_is_hashable():
    assert isinstance(hash(resolve_config("tiny://siglip")), int)
    assert isinstance(resolve_config("tiny://siglip"), ResolvedConfig)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("ref", ["nobody/no-such-model", "tiny://gpt5", "not a ref", "./missing"])
def test_unknown_refs_name_the_ref(ref, tmp_path):
    with pytest.raises(ModelConfigError, match=r"cannot resolve|unknown tiny") as err:
        resolve_config(ref, base_dir=tmp_path)
    assert repr(ref) in str(err.value)


def test_unknown_hub_id_says_where_it_looked():
    with pytest.raises(ModelConfigError) as err:
        resolve_config("nobody/no-such-model")
    message = str(err.value)
    assert "models--nobody--no-such-model" in message and "shipped" in message


def test_invalid_json_names_ref_and_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2",')
    with pytest.raises(ModelConfigError, match="not valid JSON") as err:
        resolve_config(str(tmp_path))
    assert repr(str(tmp_path)) in str(err.value)
    assert str(tmp_path / "config.json") in str(err.value)


def test_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelConfigError, match="not an object"):
        resolve_config(str(tmp_path / "config.json"))


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ModelConfigError, match="cannot read") as err:
        resolve_config(str(tmp_path))
    assert repr(str(tmp_path)) in str(err.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelConfigError, match=r"no config\.json"):
        resolve_config(str(tmp_path))


def test_unsupported_model_types_are_named(towers):
    vision, language = towers
    qwen2_vl = resolve_config("Qwen/Qwen2-VL-2B-Instruct").config
    with pytest.raises(ModelConfigError, match="'qwen2_vl'"):
        count_params(vision, qwen2_vl)
    with pytest.raises(ModelConfigError, match="'clip_vision_model'"):
        count_params({"model_type": "clip_vision_model"}, language)
    with pytest.raises(ModelConfigError, match="'mlp2x_relu'"):
        count_params(vision, language, projector="mlp2x_relu")


def test_feature_layer_out_of_range(towers):
    vision, language = towers
    with pytest.raises(ModelConfigError, match="out of range"):
        count_params(vision, language, vision_feature_layer=-29)


def test_tower_configs_of_a_non_composite_config():
    legacy = resolve_config("lmms-lab/llava-onevision-qwen2-0.5b-ov").config
    with pytest.raises(ModelConfigError, match="names its vision tower"):
        tower_configs(legacy)
    with pytest.raises(ModelConfigError, match="'qwen2'"):
        tower_configs(resolve_config(QWEN).config)


# ---------------------------------------------------------------------------- start-up cost


def test_module_does_not_import_torch():
    code = (
        "import sys, recipec.models.configs as c; "
        "c.count_params(c.resolve_config('tiny://siglip').config, "
        "c.resolve_config('tiny://qwen2').config); "
        "bad = {'torch', 'transformers'} & set(sys.modules); "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=False
    )
    assert result.returncode == 0, result.stderr or result.stdout
