"""The exported stages of the quickstart data load where users load them: LLaVA-NeXT's data loading
(copied below) run from another directory, `datasets` (newest, and the oldest supported when
RECIPEC_DATASETS_OLD_PYTHON names a Python that has it, as CI does), `load_from_disk`, Parquet;
a moved output in copy mode still loads, a moved one in link mode fails loudly."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from recipec.cli.main import main

REPO = Path(__file__).resolve().parents[1]
CHECK = Path(__file__).with_name("export_check.py")

# The data part of examples/quickstart.recipe, with every export format, copied images and
# embedded image bytes.
RECIPE = """\
recipe "qs-export" {
  seed = 1234
  export {
    formats = [llava, hf_dataset, parquet, messages]
    images = %(images)s
    embed_images = true
  }
}

model tiny_vlm {
  architecture = llava_onevision
  vision = "tiny://siglip"
  language = "tiny://qwen2"
}

source captions {
  format = llava_jsonl  path = "quickstart/captions/captions.jsonl"  images = "quickstart/captions/images"
  category = caption  type = general  expect = 80
}
source general {
  format = llava_json  path = "quickstart/general/general.json"  images = "quickstart/general/images"
  category = comprehensive  type = general  expect = 50
}
source ocr_docs {
  format = llava_jsonl  path = "quickstart/ocr_docs/ocr_docs.jsonl"  images = "quickstart/ocr_docs/images"
  category = comprehensive  type = mixed  expect = 50
}
source math {
  format = parquet  path = "quickstart/math/math.parquet"  images = "quickstart/math/images"
  category = comprehensive  type = math_reasoning  expect = 30
}
source text {
  format = llava_jsonl  path = "quickstart/text/text.jsonl"  category = comprehensive  type = text  expect = 30
}

filter processing {
  dedup exact { by = [image, text] }
  dedup phash { max_distance = 4 }
}

pool instructions { category = comprehensive }

stage s1 {
  train = [projector]  grid = 1x1  lr = 1e-3  batch = 8
  mix { captions = all }
}
stage s2a {
  train = all  grid = 2x2  max_tiles = 4  lr = 1e-5  batch = 8
  mix { instructions = all }
}
"""
STAGES = ("s1", "s2a")


def make_project(root: Path, images: str) -> Path:
    if not (root / "quickstart").exists():
        shutil.copytree(REPO / "examples" / "quickstart", root / "quickstart")
    recipe = root / f"qs-{images}.recipe"
    recipe.write_text(RECIPE % {"images": images})
    return recipe


def run(recipe: Path, store: Path, out: Path) -> None:
    code = main(["run", str(recipe), "--store", str(store), "--out", str(out), "-q", "--workers", "1", "--data-only"])
    assert code == 0


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    outs = {}
    for mode in ("copy", "link"):
        outs[mode] = root / f"out-{mode}"
        run(make_project(root, mode), root / "store", outs[mode])
    return {"root": root, **outs}


# ---- LLaVA-NeXT's data loading, as in llava/train/train.py (LazySupervisedDataset) --------------


def llava_next_list_data(data_path: str) -> list[dict]:
    """LazySupervisedDataset.__init__'s list building: a YAML of json_path + sampling_strategy, or one JSON."""
    list_data_dict: list[dict] = []
    if data_path.endswith(".yaml"):
        with open(data_path, "r") as file:
            yaml_data = yaml.safe_load(file)
            datasets = yaml_data.get("datasets")
            for dataset in datasets:
                json_path = dataset.get("json_path")
                sampling_strategy = dataset.get("sampling_strategy", "all")
                sampling_number = None
                if json_path.endswith(".jsonl"):
                    cur_data_dict = []
                    with open(json_path, "r") as json_file:
                        for line in json_file:
                            cur_data_dict.append(json.loads(line.strip()))
                elif json_path.endswith(".json"):
                    with open(json_path, "r") as json_file:
                        cur_data_dict = json.load(json_file)
                else:
                    raise ValueError(f"Unsupported file type: {json_path}")
                if ":" in sampling_strategy:
                    sampling_strategy, sampling_number = sampling_strategy.split(":")
                    if "%" in sampling_number:
                        sampling_number = math.ceil(int(sampling_number.split("%")[0]) * len(cur_data_dict) / 100)
                    else:
                        sampling_number = int(sampling_number)
                if sampling_strategy == "first" and sampling_number is not None:
                    cur_data_dict = cur_data_dict[:sampling_number]
                elif sampling_strategy == "end" and sampling_number is not None:
                    cur_data_dict = cur_data_dict[-sampling_number:]
                elif sampling_strategy == "random" and sampling_number is not None:
                    random.shuffle(cur_data_dict)
                    cur_data_dict = cur_data_dict[:sampling_number]
                list_data_dict.extend(cur_data_dict)
    else:
        with open(data_path, "r") as file:
            list_data_dict.extend(json.load(file))
    return list_data_dict


def llava_next_images(sample: dict, image_folder: str) -> list[Image.Image]:
    """_get_item's image part: `image` a path or a list of paths, joined to --image_folder."""
    if "image" not in sample:
        return []
    image_file = sample["image"]
    files = image_file if type(image_file) is list else [image_file]
    return [Image.open(os.path.join(image_folder, f)).convert("RGB") for f in files]


def image_tokens(sample: dict) -> int:
    """preprocess_multimodal counts `<image>` in each turn."""
    return sum(len(re.findall("<image>", turn["value"])) for turn in sample["conversations"])


def yaml_arguments(stage_dir: Path) -> tuple[str, str | None]:
    """The --data_path and --image_folder the data YAML says to pass."""
    line = next(l for l in (stage_dir / f"{stage_dir.name}.yaml").read_text().splitlines() if l.startswith("# --data_path"))
    words = line.split()
    return words[2], words[4]


# ---- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_llava_next_loads_each_stage_from_another_directory(project, stage, tmp_path, monkeypatch):
    stage_dir = project["copy"] / stage
    data_path, image_folder = yaml_arguments(stage_dir)
    assert os.path.isabs(data_path) and os.path.isabs(image_folder)
    monkeypatch.chdir(tmp_path)  # LLaVA-NeXT runs from its own checkout, not from the stage folder
    samples = llava_next_list_data(data_path)
    report = json.loads((project["copy"] / "report.json").read_text())
    realised = next(s for s in report["stages"] if s["name"] == stage)["realised"]["total"]
    assert len(samples) == realised > 0
    assert samples == llava_next_list_data(str(stage_dir / f"{stage}.json"))  # the JSON alone, too
    for sample in samples:
        images = llava_next_images(sample, image_folder)
        assert image_tokens(sample) == len(images)
        assert sample["source_id"] is None or isinstance(sample["source_id"], str)
    text_only = sum("image" not in s for s in samples)
    assert (text_only > 0) == (stage == "s2a")  # the text source is in s2a only


def test_the_image_folder_holds_exactly_what_the_stage_references(project):
    for mode in ("copy", "link"):
        for stage in STAGES:
            folder = project[mode] / stage / "images"
            samples = json.loads((project[mode] / stage / f"{stage}.json").read_text())
            referenced = {f for s in samples for f in s.get("image", [])}
            present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}
            assert present == referenced
            for name in present:
                path = folder / name
                source = name.split("/")[0]
                assert path.is_symlink() == (mode == "link")
                if mode == "link":  # never a link out of the source's root
                    assert path.resolve().is_relative_to((project["root"] / "quickstart" / source / "images").resolve())
    rejected = {json.loads(line)["record"] for line in (project["copy"] / "rejects/ingest.captions.jsonl").open()}
    assert rejected and not any("stale.png" in name for name in os.listdir(project["copy"] / "s1/images/captions"))


def test_every_file_loads_with_the_newest_datasets(project):
    pytest.importorskip("datasets")
    _check_with(sys.executable, project["copy"])


@pytest.mark.skipif(not os.environ.get("RECIPEC_DATASETS_OLD_PYTHON"),
                    reason="set RECIPEC_DATASETS_OLD_PYTHON to a Python with datasets 2.19 (.ci/run does)")
def test_every_file_loads_with_the_oldest_supported_datasets(project):
    found = _check_with(os.environ["RECIPEC_DATASETS_OLD_PYTHON"], project["copy"])
    assert found[STAGES[0]]["datasets"].startswith("2.")


def _check_with(python: str, out: Path) -> dict[str, dict]:
    found = {}
    done = subprocess.run([python, str(CHECK), *(str(out / stage) for stage in STAGES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for stage, result in zip(STAGES, results, strict=True):
        ids = [s["id"] for s in json.loads((out / stage / f"{stage}.json").read_text())]
        for name in (f"{stage}.json", f"{stage}.messages.jsonl", "hf", "parquet"):
            assert result[name]["ids"] == ids, name
        for name in (f"{stage}.json", f"{stage}.messages.jsonl"):  # one type per field (null aside)
            assert all(len(set(kinds) - {"NoneType"}) == 1 for kinds in result[name]["types"].values()), result[name]
        assert result["hf"]["image_feature"] == "Image"  # embedded bytes, decoded to PIL images
        assert result["hf"]["decoded"][0].endswith("ImageFile") and min(result["hf"]["decoded"][1]) > 0
        found[stage] = result
    return found


def test_parquet_shards_read_with_pyarrow(project):
    table = pq.read_table(project["copy"] / "s2a" / "parquet")
    samples = json.loads((project["copy"] / "s2a" / "s2a.json").read_text())
    assert table.column("id").to_pylist() == [s["id"] for s in samples]
    assert table.column("source_id").to_pylist() == [s["source_id"] for s in samples]


def test_a_moved_copy_still_loads_and_a_moved_link_output_fails_loudly(project, tmp_path, monkeypatch):
    for mode in ("copy", "link"):
        moved = tmp_path / f"moved-{mode}"
        shutil.copytree(project[mode], moved, symlinks=True)  # a move, leaving the original for other tests
        stage_dir = moved / "s1"
        monkeypatch.chdir(tmp_path)
        samples = llava_next_list_data(str(stage_dir / "s1.json"))
        if mode == "copy":
            for sample in samples:
                assert len(llava_next_images(sample, str(stage_dir / "images"))) == image_tokens(sample)
        else:
            with pytest.raises(FileNotFoundError):
                llava_next_images(samples[0], str(stage_dir / "images"))
    # the YAML names where it was written: it reads the original, never a half-moved copy
    data_path, _ = yaml_arguments(tmp_path / "moved-copy" / "s1")
    assert data_path == str(project["copy"] / "s1" / "s1.yaml")
