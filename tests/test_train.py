"""Training: a tiny LLaVA-OneVision learns a toy task through `recipec run`'s machinery, stage after stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from recipec.compiler import compile_or_raise  # noqa: E402
from recipec.plan import build_plan  # noqa: E402
from recipec.runtime.executor import execute  # noqa: E402
from recipec.runtime.store import Store  # noqa: E402
from tests import train_toy as toy  # noqa: E402

RECIPE = """
recipe "toy" {
  seed = 7
}

model tiny_vlm {
  architecture = llava_onevision
  vision = "tiny://siglip"
  language = "tiny://qwen2"
  projector = mlp2x_gelu
}

source toy {
  format = llava_jsonl
  path = "toy/train.jsonl"
  images = "toy/images"
  category = caption
  type = general
  expect = 66
}

stage s1 {
  train = [projector]
  grid = 1x1
  lr = 1e-2
  batch = 16
  micro_batch = 8
  epochs = 3
  warmup = 10%
  max_length = 80
  mix {
    toy = all
  }
}

stage s2 {
  train = all
  grid = 1x1
  lr = 1e-3
  batch = 16
  micro_batch = 8
  epochs = 4
  warmup = 10%
  max_length = 80
  checkpoint_every = 6
  gradient_checkpointing = true
  mix {
    toy = all
  }
}
"""


def write_project(root: Path) -> Path:
    table = toy.records(root / "toy" / "images", 64, seed=1)
    lines = [json.dumps({"id": r["id"], "image": r["images"][0]["path"], "conversations": r["conversations"]})
             for r in table.to_pylist()]
    long_answer = " ".join(["the red circle is left of the blue square"] * 5)
    for i in range(2):  # over the stages' max_length of 80 tokens: rejected there, never truncated
        lines.append(json.dumps({"id": f"long-{i}", "image": table.to_pylist()[i]["images"][0]["path"],
                                 "conversations": [{"from": "human", "value": toy.QUESTION},
                                                   {"from": "gpt", "value": long_answer}]}))
    (root / "toy" / "train.jsonl").write_text("\n".join(lines) + "\n")
    recipe = root / "toy.recipe"
    recipe.write_text(RECIPE)
    return recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("train")
    recipe = write_project(root)
    plan = build_plan(compile_or_raise(recipe))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECIPEC_MODEL_CACHE", str(tiny_models))
        store = Store(root / "store")
        with store.locked():
            result = execute(plan, store=store, recipe_dir=root, workers=1)
    outcomes = {o.id: o for o in result.outcomes}
    return {"root": root, "store": store, "plan": plan, "keys": result.keys, "outcomes": outcomes,
            "dirs": {s: store.step_dir(result.keys[s]) / "files" for s in ("train.s1", "train.s2")}}


def greedy_answers(checkpoint: Path, rows: list[dict], image_root: Path) -> list[str]:
    import transformers as tf
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    from recipec.models.multimodal import Encoder, LlavaOnevisionImages
    from recipec.ops.images import open_image

    model = tf.LlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(checkpoint)
    processor = LlavaOnevisionImageProcessorPil.from_pretrained(checkpoint)
    encoder = Encoder(tokenizer, LlavaOnevisionImages(processor, model.config, tokenizer, 1))
    items = [encoder.encode([{"role": "user", "content": toy.QUESTION}],
                            [open_image(image_root, r["images"][0]["path"])], generation_prompt=True) for r in rows]
    batch = encoder.collate(items, padding_side="left")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    return [t.strip() for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]


def log_of(files: Path) -> list[dict]:
    return [json.loads(line) for line in (files / "train_log.jsonl").read_text().splitlines()]


def test_the_model_learns_the_task_across_a_projector_stage_and_a_full_stage(trained):
    held_out = toy.records(trained["root"] / "held_out", 24, seed=2).to_pylist()
    answers = greedy_answers(trained["dirs"]["train.s2"] / "checkpoint", held_out, trained["root"] / "held_out")
    truth = [r["conversations"][1]["value"] for r in held_out]
    accuracy = sum(a == t for a, t in zip(answers, truth)) / len(truth)
    assert accuracy >= 0.6, list(zip(answers, truth))  # chance: 0.25
    first = log_of(trained["dirs"]["train.s1"])[0]["loss"]
    last = log_of(trained["dirs"]["train.s2"])[-1]["loss"]
    assert last < first / 10


def test_each_stage_accounts_for_every_record(trained):
    s1, s2 = trained["outcomes"]["train.s1"], trained["outcomes"]["train.s2"]
    assert (s1.records_in, s1.records_out, s1.dropped) == (66, 0, {"too_long": 2, "trained": 64})
    assert (s2.records_in, s2.records_out, s2.dropped) == (66, 0, {"too_long": 2, "trained": 64})
    store = trained["store"]
    rejects = store.read_rejects(trained["keys"]["train.s1"]).to_pylist()
    assert {r["reason"] for r in rejects} == {"too_long"} and all("more than the limit of 80" in r["detail"] for r in rejects)


def test_the_step_log_has_what_mof_class_i_asks_for(trained):
    entries = log_of(trained["dirs"]["train.s2"])
    result = json.loads((trained["dirs"]["train.s2"] / "train_result.json").read_text())
    assert [e["step"] for e in entries] == list(range(1, result["steps"] + 1))
    assert result["steps"] == 16 and result["accumulation"] == 2 and result["micro_batch"] == 8  # 64 * 4 / 16
    for e in entries:
        assert set(e["lr"]) == {"vision", "projector", "language"}
        assert e["grad_norm"] > 0 and e["tokens"] > 0 and e["flops"] > 0 and e["tokens_per_s"] > 0
    lrs = [e["lr"]["language"] for e in entries]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[len(lrs) // 2] < max(lrs)  # warmup, then cosine decay


def test_frozen_parts_are_bit_identical_and_trained_ones_changed(trained):
    import transformers as tf

    from recipec.models import tiny

    models = trained["store"].models_dir
    vision = tf.SiglipVisionModel.from_pretrained(tiny.materialize("tiny://siglip", models)).state_dict()
    language = tf.Qwen2ForCausalLM.from_pretrained(tiny.materialize("tiny://qwen2", models)).model.state_dict()

    def weights(stage):
        model = tf.LlavaOnevisionForConditionalGeneration.from_pretrained(trained["dirs"][stage] / "checkpoint")
        return model.state_dict()

    s1, s2 = weights("train.s1"), weights("train.s2")
    for name, tensor in vision.items():
        assert torch.equal(s1[f"model.vision_tower.{name}"], tensor), name
    for name, tensor in language.items():
        assert torch.equal(s1[f"model.language_model.{name}"], tensor), name
    projector = [k for k in s1 if k.startswith("model.multi_modal_projector.")]
    assert projector and all(not torch.equal(s1[k], s2[k]) for k in projector)
    changed = [k for k in s1 if not torch.equal(s1[k], s2[k])]
    assert any(k.startswith("model.vision_tower.") for k in changed)
    assert any(k.startswith("model.language_model.") for k in changed)


def test_the_stages_write_their_llava_next_args(trained):
    s1 = (trained["dirs"]["train.s1"] / "llava_next" / "s1.sh").read_text()
    s2 = (trained["dirs"]["train.s2"] / "llava_next" / "s2.sh").read_text()
    assert "--mm_tunable_parts mm_mlp_adapter\n" in s1 and "--model_name_or_path tiny://qwen2" in s1
    assert "--mm_tunable_parts mm_vision_tower,mm_mlp_adapter,mm_language_model" in s2
    assert "--pretrain_mm_mlp_adapter checkpoints/s1/mm_projector.bin" in s2
    assert "--version qwen_1_5" in s2 and "--data_path s2/s2.yaml" in s2 and "--image_folder s2/images" in s2


def test_intermediate_checkpoints_are_kept_with_the_stage(trained):
    files = trained["dirs"]["train.s2"]
    assert sorted(p.name for p in (files / "checkpoints").iterdir()) == ["step-0000006", "step-0000012"]
    state = json.loads((files / "checkpoints" / "step-0000012" / "state.json").read_text())
    assert state["step"] == 12 and state["scheduler"]["last_epoch"] == 12
    assert (files / "checkpoints" / "step-0000006" / "trainable.safetensors").is_file()
    assert not list(files.glob("checkpoints/*/optimizer.safetensors"))  # resuming is over: not kept


def test_a_second_run_finds_the_training_steps_cached(trained):
    store = trained["store"]
    with store.locked():
        again = execute(trained["plan"], store=store, recipe_dir=trained["root"], workers=1)
    assert all(o.cached for o in again.outcomes)


def test_recipec_train_emits_a_launch_script_whose_job_recipec_run_then_stores(tmp_path, tiny_models, monkeypatch):
    import subprocess

    from recipec.cli.main import main
    from recipec.train import launch, trainer

    monkeypatch.setenv("RECIPEC_MODEL_CACHE", str(tiny_models))
    recipe = write_project(tmp_path)
    store = tmp_path / "store"
    assert main(["train", str(recipe), "s1", "--emit", "slurm", "--store", str(store)]) == 2  # export not stored yet
    assert main(["run", str(recipe), "--store", str(store), "--out", str(tmp_path / "out"), "--until", "s1", "-q",
                 "--workers", "1"]) == 0
    for kind in ("slurm", "torchrun"):
        script = tmp_path / f"{kind}.sh"
        assert main(["train", str(recipe), "s1", "--emit", kind, "--store", str(store), "--gpus", "4",
                     "--nodes", "2", "-o", str(script)]) == 0
        text = script.read_text()
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        assert "-m recipec.train.launch" in text and "--only train.s1" in text
    assert "#SBATCH --nodes=2" in (tmp_path / "slurm.sh").read_text()
    assert "srun" in (tmp_path / "slurm.sh").read_text() and "--rdzv_backend=c10d" in (tmp_path / "slurm.sh").read_text()
    jobs = list(store.glob("work/*/job.json"))
    assert len(jobs) == 1
    assert launch.main([str(jobs[0])]) == 0  # what the script's torchrun runs on every rank
    called = []
    monkeypatch.setattr(trainer, "_train", lambda *a, **k: called.append(a))
    assert main(["run", str(recipe), "--store", str(store), "--out", str(tmp_path / "out"), "--until", "train.s1",
                 "-q", "--workers", "1"]) == 0
    assert not called  # the finished job was taken in, not trained again
    plan = build_plan(compile_or_raise(recipe))
    result = [o for o in execute(plan, store=Store(store), recipe_dir=tmp_path, until=["train.s1"]).outcomes
              if o.id == "train.s1"][0]
    assert result.cached and result.dropped == {"too_long": 2, "trained": 64}
