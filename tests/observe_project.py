"""A small real run for the report, why, lock and package tests: the quickstart data at a tenth of
its size, the data steps only (ingest with its planted rejects, exact and pHash dedup, a loss
threshold), two stages, licenses declared (one source left without, to be flagged)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from recipec.cli.main import main

REPO = Path(__file__).resolve().parent.parent

RECIPE = """\
recipe "observe" { seed = 3 }

model m {
  architecture = llava_onevision
  vision = "tiny://siglip"
  language = "tiny://qwen2"
}

source captions {
  format = llava_jsonl
  path = "captions/*.jsonl"
  images = "captions/images"
  category = caption
  type = general
  license = "cc0-1.0"
}

source general {
  format = llava_json
  path = "general/*.json"
  images = "general/images"
  category = comprehensive
  type = general
  scores = [loss]
  license = "cc-by-4.0"
}

source text {
  format = llava_jsonl
  path = "text/*.jsonl"
  category = comprehensive
  type = text
}

filter processing {
  on = all
  dedup exact {
    by = [image, text]
  }
  dedup phash {
    max_distance = 4
  }
}

filter quality {
  on = [general]
  keep loss <= 1.2
}

stage s1 {
  model = m
  train = [projector]
  grid = 1x1
  lr = 1e-3
  mix {
    captions = all
  }
}

stage s2 {
  model = m
  train = all
  grid = 2x2
  lr = 1e-5
  mix {
    general = all
    text = all
  }
}
"""


def make_run(root: Path) -> dict[str, Path]:
    """Generate the data, write the recipe, run its data steps; the paths of recipe, store and out."""
    subprocess.run([sys.executable, str(REPO / "examples/make_quickstart_data.py"), "--out", str(root),
                    "--scale", "0.1"], check=True, capture_output=True)
    recipe = root / "observe.recipe"
    recipe.write_text(RECIPE)
    store, out = root / "store", root / "out"
    code = main(["run", str(recipe), "--store", str(store), "--out", str(out), "--data-only", "-q", "--workers", "1"])
    assert code == 0
    return {"root": root, "recipe": recipe, "store": store, "out": out}


def report_of(run: dict[str, Path]) -> dict:
    return json.loads((run["out"] / "report.json").read_text("utf-8"))


def rejects_of(run: dict[str, Path], step: str) -> list[dict]:
    path = run["out"] / "rejects" / f"{step}.jsonl"
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()] if path.exists() else []
