"""Engine selection: the recipe's `engine = transformers | vllm | openai` for each model.

`load_engine(model_use, workers=..., models_dir=...)` returns an engine with the interface of
`recipec.models.engine`; the executor wraps it in the request cache. Heavy imports (torch,
transformers, vLLM) happen here, only when a step needs a model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from recipec.models.engine import EngineError

RAM_PLUS = ("xinyu1205/recognize-anything-plus-model", "ram_plus", "ram++")


def load_engine(model_use: dict[str, Any], *, workers: int, models_dir: Path | None = None,
                base_dir: Path | None = None) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models resolve from local files, never a download
    ref = model_use["ref"]
    engine = model_use.get("engine", "transformers")
    if any(name in ref.lower() for name in RAM_PLUS) or "recognize-anything" in ref.lower():
        from recipec.models.tagger import refuse_ram_plus

        raise refuse_ram_plus(ref)
    if engine == "openai":
        from recipec.models import openai_engine

        return openai_engine.load(model_use, workers=workers, models_dir=models_dir)
    if engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise EngineError(f"model {ref!r} asks for engine = vllm, which is not installed here: "
                              "`pip install 'recipec[vllm]'` on a machine with a GPU, or use engine = transformers") from None
        from recipec.models import vllm_engine

        return vllm_engine.load(model_use, workers=workers, models_dir=models_dir, base_dir=base_dir)
    if engine != "transformers":
        raise EngineError(f"unknown engine {engine!r} for model {ref!r}")
    from recipec.models import transformers_engine

    path, identity = transformers_engine.resolve_model_dir(model_use, models_dir=models_dir, base_dir=base_dir)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") == "siglip":
        from recipec.models.tagger import SiglipTagger

        return SiglipTagger(path, identity, threads=workers)
    return transformers_engine.TransformersEngine(path, identity, dtype=model_use.get("dtype", "bfloat16"),
                                                  trust_remote_code=bool(model_use.get("trust_remote_code")),
                                                  threads=workers)
