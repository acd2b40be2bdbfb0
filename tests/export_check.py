"""Load an exported stage folder the way users do, under any Python that has `datasets` (no recipec).

    python tests/export_check.py STAGE_DIR...

Loads `<stage>.json` and `<stage>.messages.jsonl` with `datasets.load_dataset("json")`, `hf/` with
`load_from_disk` and `parquet/` with `load_dataset("parquet")` (each that exists), and prints one
JSON object per stage folder (one a line): the `datasets` version and, per file, its rows, columns and the Python types found in
each column. Run by tests/test_export_loaders.py with the newest `datasets` and, in CI, with the
oldest the project supports.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import datasets


def _types(ds) -> dict[str, list[str]]:
    return {name: sorted({type(v).__name__ for v in ds[name]}) for name in ds.column_names}


def check(stage_dir: Path) -> dict:
    stage = stage_dir.name
    found: dict = {"datasets": datasets.__version__}
    cache = tempfile.mkdtemp()
    for name in (f"{stage}.json", f"{stage}.messages.jsonl"):
        if (stage_dir / name).exists():
            ds = datasets.load_dataset("json", data_files=str(stage_dir / name), split="train", cache_dir=cache)
            found[name] = {"rows": len(ds), "ids": list(ds["id"]), "types": _types(ds)}
    if (stage_dir / "hf").is_dir():
        ds = datasets.load_from_disk(str(stage_dir / "hf"))
        images = ds.features["image"]
        found["hf"] = {"rows": len(ds), "ids": list(ds["id"]), "types": _types(ds.select_columns([c for c in ds.column_names
                                                                                           if c != "image"])),
                       "image_feature": type(getattr(images, "feature", images)).__name__}
        with_images = [row for row in ds if row["image"]]
        if with_images and found["hf"]["image_feature"] == "Image":
            first = with_images[0]["image"][0]
            found["hf"]["decoded"] = [type(first).__name__, list(first.size)]
    if (stage_dir / "parquet").is_dir():
        ds = datasets.load_dataset("parquet", data_files=str(stage_dir / "parquet" / "*.parquet"), split="train",
                                   cache_dir=cache)
        found["parquet"] = {"rows": len(ds), "ids": list(ds["id"])}
    return found


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        print(json.dumps(check(Path(folder))))
