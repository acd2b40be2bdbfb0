"""The model a stage trains: built from its towers as the recipe says, saved and reloaded unchanged."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from recipec.models import configs  # noqa: E402
from recipec.train import data  # noqa: E402
from recipec.train.model import configure_stage, freeze, from_towers, part_of  # noqa: E402
from recipec.train.settings import SettingsError, StageSettings  # noqa: E402
from tests import train_toy as toy  # noqa: E402


def test_the_towers_give_the_parameters_plan_counts_and_the_checkpoint_reloads_with_the_same_logits(
        tmp_path, tiny_models):
    import transformers as tf
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    from recipec.models.multimodal import Encoder, LlavaOnevisionImages
    from recipec.ops.images import open_image
    from recipec.train.checkpoint import save_final

    settings = StageSettings.from_params(toy.stage("s", ["vision", "projector"], 1e-3, grid=[2, 2], max_tiles=3))
    architecture = {**toy.ARCHITECTURE, "vision_layer": -2}
    model, tokenizer, processor = from_towers(architecture, settings, seed=3, models_dir=tiny_models, base_dir=tmp_path)
    configure_stage(model, processor, settings)
    counts = freeze(model, settings.train)
    planned = configs.count_params(configs.resolve_config("tiny://siglip").config,
                                   configs.resolve_config("tiny://qwen2").config, vision_feature_layer=-2)
    assert model.config.vision_config.num_hidden_layers == 1  # LLaVA's truncation: the last layer dropped
    assert counts["projector"] == planned["projector"] + planned["image_newline"]
    assert counts["language"] == planned["language"]
    # transformers keeps SigLIP's post-layernorm, which a truncated tower never uses
    assert counts["vision"] == planned["vision"] + 2 * model.config.vision_config.hidden_size
    assert model.config.vision_aspect_ratio == "anyres_max_3"
    assert processor.image_grid_pinpoints == [[32, 32], [32, 64], [64, 32], [64, 64]]
    trainable = {part_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vision", "projector"}

    rows = toy.records(tmp_path / "images", 2, seed=9).to_pylist()
    encoder = Encoder(tokenizer, LlavaOnevisionImages(processor, model.config, tokenizer, settings.tiles()))
    from PIL import Image

    wide = tmp_path / "images" / "wide.png"
    Image.open(tmp_path / "images" / rows[0]["images"][0]["path"]).resize((64, 32)).save(wide)
    items = [encoder.encode([{"role": "user", "content": toy.QUESTION}, {"role": "assistant", "content": "red"}],
                            [open_image(tmp_path / "images", name)]) for name in (rows[1]["images"][0]["path"], "wide.png")]
    batch = encoder.collate(items, labels=True)
    model.eval()
    with torch.no_grad():
        before = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    save_final(model, tokenizer, processor, tmp_path / "checkpoint")
    again = tf.LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "checkpoint").eval()
    processor_again = LlavaOnevisionImageProcessorPil.from_pretrained(tmp_path / "checkpoint")
    assert processor_again.image_grid_pinpoints == processor.image_grid_pinpoints
    with torch.no_grad():
        after = again(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.equal(before, after)
    assert (items[1].image_tokens > items[0].image_tokens)  # the wide image takes two tiles beside its base


def test_sizes_measured_without_pixels_match_the_real_encoding(tmp_path, tiny_models):
    settings = StageSettings.from_params(toy.stage("s", ["projector"], 1e-3, grid=[3, 3], max_tiles=4))
    model, tokenizer, processor = from_towers(toy.ARCHITECTURE, settings, seed=0, models_dir=tiny_models,
                                              base_dir=tmp_path, random_init=True)
    configure_stage(model, processor, settings)
    from recipec.models.multimodal import Encoder, LlavaOnevisionImages

    encoder = Encoder(tokenizer, LlavaOnevisionImages(processor, model.config, tokenizer, settings.tiles()), 4096)
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i, (w, h) in enumerate([(32, 32), (96, 40), (40, 100), (200, 150)]):
        Image.new("RGB", (w, h), (i * 40, 80, 120)).save(folder / f"{i}.png")
        rows.append(toy._row(f"r{i}", "toy", [{"path": f"{i}.png", "sha256": "", "width": w, "height": h}],
                             [{"from": "human", "value": toy.QUESTION}, {"from": "gpt", "value": "blue"}]))
    rows.append(toy._row("two", "toy", [{"path": "0.png", "sha256": "", "width": 32, "height": 32},
                                        {"path": "1.png", "sha256": "", "width": 96, "height": 40}],
                         [{"from": "human", "value": "<image><image>\nSame?"}, {"from": "gpt", "value": "no"}]))
    rows.append(toy._row("bad", "toy", [], [{"from": "human", "value": "hi"}]))
    prepared = data.prepare(rows, {"toy": "images"}, tmp_path, encoder)
    assert [r.reason for r in prepared.rejects] == ["conversation_unusable"]
    for sample in prepared.samples:
        batch, kept, rejects = data.encode([sample], encoder)
        assert kept == [0] and not rejects
        assert batch["input_ids"].shape[1] == sample.length
        assert int((batch["labels"][:, 1:] != -100).sum()) == sample.label_tokens


def test_batches_group_by_modality_and_length_within_each_global_batch():
    samples = [data.Sample(i, f"s{i}", "toy", [], [("r", "p")] if i % 3 else [], [(32, 32)] if i % 3 else [],
                           length=10 + (i * 7) % 13, label_tokens=1 + i % 4) for i in range(20)]
    steps = data.schedule(samples, batch=8, micro=4, epochs=1.5)
    assert len(steps) == 4 and [s.samples for s in steps] == [8, 8, 8, 6]  # 30 samples seen
    order = [i % 20 for i in range(30)]
    for k, step in enumerate(steps):
        members = sorted(i for mb in step.micro_batches for i in mb)
        assert members == sorted(order[k * 8:(k + 1) * 8])  # a global batch is the next `batch` samples
        assert step.label_tokens == sum(samples[i].label_tokens for i in members)
        flat = [i for mb in step.micro_batches for i in mb]
        keys = [(-samples[i].modality, -samples[i].length) for i in flat]
        assert keys == sorted(keys)


def test_batch_geometry_splits_the_global_batch_over_devices():
    stage = StageSettings.from_params(toy.stage("s", ["projector"], 1e-3, batch=512, micro_batch=4))
    assert stage.geometry(1) == (4, 128) and stage.geometry(8) == (4, 16)
    assert StageSettings.from_params(toy.stage("s", ["projector"], 1e-3, batch=48, micro_batch=None)).geometry(2) == (8, 3)
    with pytest.raises(SettingsError, match="micro_batch"):
        StageSettings.from_params(toy.stage("s", ["projector"], 1e-3, batch=24, micro_batch=5)).geometry(1)
    with pytest.raises(SettingsError, match="does not split"):
        stage.geometry(3)


def test_the_stage_settings_of_training_compile_into_the_ir(tmp_path):
    from recipec.compiler import compile_or_raise
    from tests.test_train import RECIPE

    recipe = tmp_path / "toy.recipe"
    recipe.write_text(RECIPE.replace("  checkpoint_every = 6\n", "  checkpoint_every = 6\n  grad_clip = 0.5\n"))
    s1, s2 = compile_or_raise(recipe).stages
    assert (s1.gradient_checkpointing, s1.checkpoint_every, s1.grad_clip) == (False, 500, 1.0)
    assert (s2.gradient_checkpointing, s2.checkpoint_every, s2.grad_clip) == (True, 6, 0.5)
    settings = StageSettings.from_params(s2.model_dump(mode="json"))
    assert settings.gradient_checkpointing and settings.checkpoint_every == 6 and settings.grad_clip == 0.5
