import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
SHIPPED = sorted(RECIPES.glob("*.recipe"))
UPDATE_GOLDEN = os.environ.get("RECIPEC_UPDATE_GOLDEN") == "1"


@pytest.fixture(autouse=True)
def _offline_model_cache(tmp_path_factory, monkeypatch):
    """Resolve model configs from what recipec ships, never from a local Hugging Face cache."""
    empty = tmp_path_factory.mktemp("hf-cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    monkeypatch.setenv("HF_HOME", str(empty))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """One folder of tiny:// models for the whole session (each is built once, then loaded)."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture
def model_cache(tiny_models, monkeypatch):
    """Runs in this test build their tiny:// models in the session's folder."""
    monkeypatch.setenv("RECIPEC_MODEL_CACHE", str(tiny_models))
    return tiny_models


def check_golden(path: Path, text: str) -> None:
    if UPDATE_GOLDEN or not path.exists():
        if not UPDATE_GOLDEN and os.environ.get("CI"):
            raise AssertionError(f"missing golden file {path}; run with RECIPEC_UPDATE_GOLDEN=1")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.read_text(encoding="utf-8") == text, f"{path} differs; run with RECIPEC_UPDATE_GOLDEN=1 if intended"
