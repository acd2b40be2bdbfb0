"""The model-backed operations over scripted engines: what they ask, what they keep, what they reject."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest

from recipec import records
from recipec.models.engine import Choice, Generation, LossValue, RequestError, TagScores
from recipec.ops import judge, loss, mapping, synthesize, tag
from recipec.ops.base import StepContext

pytest.importorskip("sklearn")


def record(i, *, source="seed", image=None, question="What is shown?", answer="A cat.", tags=(), itags=(), scores=()):
    images = [{"path": f"{image}.png", "sha256": f"sha-{image}", "width": 32, "height": 32}] if image else []
    conversations = [{"from": "human", "value": ("<image>\n" if image else "") + question}]
    if answer is not None:
        conversations.append({"from": "gpt", "value": answer})
    return {"id": f"id{i}", "source": source, "origin": f"seed.jsonl:{i}", "images": images,
            "conversations": conversations, "category": "gpt4", "data_type": "general", "image_tags": list(tags),
            "instruction_tags": list(itags), "scores": list(scores), "provenance": []}


def table(rows):
    return pa.Table.from_pylist(rows, schema=records.SCHEMA)


class Scripted:
    identity = "scripted@1"

    def __init__(self, answer):
        self.answer = answer
        self.asked = []

    def _reply(self, requests):
        self.asked.extend(requests)
        return [self.answer(r) for r in requests]

    generate = choose = loss = tag = _reply


def context(tmp_path, params, engine, input_dirs=()):
    return StepContext(step_id="step", op="op", params={"roots": {"seed": "images", "synthetic": "images"}, **params},
                       fingerprint="f", recipe_dir=tmp_path, seed=1, engine=lambda model: engine,
                       input_dirs=list(input_dirs))


def run(op, ctx, inputs):
    chunks = list(op(ctx, inputs))
    tables = [c.records for c in chunks if c.records is not None]
    out = pa.concat_tables(tables).to_pylist() if tables else []
    rejects = [r for c in chunks for r in c.rejects]
    consumed = sum(c.consumed for c in chunks)
    skipped = {k: v for c in chunks for k, v in c.skipped.items()}
    assert consumed == len(out) + len(rejects) + sum(skipped.values())  # the conservation law
    return out, rejects, skipped, chunks


# ---- TF-IDF ---------------------------------------------------------------------------------------


def test_tfidf_mapping_matches_a_hand_computed_example():
    # counting: type A sees dog x2, ball x1; type B sees dog x1, chart x2
    pairs = [(["dog", "ball"], ["A"]), (["dog"], ["A"]), (["dog", "chart"], ["B"]), (["chart"], ["B"])]
    weights = mapping.tfidf_weights(pairs, smooth_idf=True)
    idf = {"dog": math.log(3 / 3) + 1, "ball": math.log(3 / 2) + 1, "chart": math.log(3 / 2) + 1}
    raw_a = {"dog": 2 * idf["dog"], "ball": 1 * idf["ball"]}
    norm = math.sqrt(sum(v * v for v in raw_a.values()))
    assert weights["A"] == pytest.approx({k: v / norm for k, v in raw_a.items()}, abs=1e-6)
    raw_b = {"dog": 1 * idf["dog"], "chart": 2 * idf["chart"]}
    norm = math.sqrt(sum(v * v for v in raw_b.values()))
    assert weights["B"] == pytest.approx({k: v / norm for k, v in raw_b.items()}, abs=1e-6)
    assert list(weights["B"]) == ["chart", "dog"]  # heaviest first
    assert mapping.rank_types(weights, ["chart"], top_k=1) == [("B", pytest.approx(weights["B"]["chart"]))]
    assert mapping.rank_types(weights, ["ball", "dog"], top_k=2)[0][0] == "A"
    assert mapping.rank_types(weights, ["unknown"], top_k=3) == []
    # min_count drops rare pairs before weighting
    assert "ball" not in mapping.tfidf_weights(pairs, min_count=2)["A"]


def test_map_tags_writes_a_readable_mapping(tmp_path):
    image_side = table([record(0, image="a", tags=["dog"]), record(1, image="b", tags=["chart"])])
    instruction_side = table([record(0, image="a", itags=["A/x/y"]), record(1, image="b", itags=["B/x/y"])])
    ctx = context(tmp_path, {"mapping": {"name": "m", "method": "tfidf", "min_count": 1, "top_k": 2, "min_score": 0.0,
                                         "smooth_idf": True, "sublinear_tf": False}}, None)
    out, rejects, _, chunks = run(mapping.run, ctx, [image_side, instruction_side])
    assert out == [] and rejects == []
    document = json.loads(chunks[0].files["mapping.json"])
    assert document["records"] == 2 and document["types"] == {"A/x/y": {"dog": 1.0}, "B/x/y": {"chart": 1.0}}


# ---- tagging --------------------------------------------------------------------------------------

TAXONOMY = {"name": "t", "levels": ["category", "task", "subtask"], "tree": [
    {"name": "Perception", "children": [
        {"name": "Count", "children": [{"name": "Count objects", "children": []}, {"name": "Count people", "children": []}]},
        {"name": "Read", "children": [{"name": "Read text", "children": []}]}]},
    {"name": "Reasoning", "children": [{"name": "Math", "children": [{"name": "Solve equation", "children": []}]}]}]}
LEAVES = {"Perception/Count/Count objects", "Perception/Count/Count people", "Perception/Read/Read text",
          "Reasoning/Math/Solve equation"}


def _prefer(order):
    def answer(request):
        weights = [2.0 ** -order.index(label) if label in order else 0.01 for label in request.labels]
        total = sum(weights)
        probs = {label: w / total for label, w in zip(request.labels, weights)}
        return Choice(max(probs, key=probs.get), probs, 10)
    return answer


def test_instruction_tags_are_taxonomy_leaves_chosen_level_by_level(tmp_path):
    engine = Scripted(_prefer(["Perception", "Count", "Count people", "Read", "Count objects"]))
    ctx = context(tmp_path, {"tagger": {"name": "t", "model": {}, "max_tags": 2, "prompt": None}, "taxonomy": TAXONOMY},
                  engine)
    out, rejects, _, _ = run(tag.run_tag_instructions, ctx, [table([record(0, image="a")])])
    assert rejects == []
    [row] = out
    # path probabilities (Perception is 1/1.01): Count people 0.8 x 0.8, Read text 0.2 x 1 (its only leaf), Count objects 0.8 x 0.2
    assert row["instruction_tags"] == ["Perception/Count/Count people", "Perception/Read/Read text"]
    probs = dict(row["scores"])
    assert probs["instruction_tag:Perception/Count/Count people"] == pytest.approx(0.64 / 1.01, abs=1e-5)
    assert probs["instruction_tag:Perception/Read/Read text"] == pytest.approx(0.2 / 1.01, abs=1e-5)
    levels = [r.labels for r in engine.asked]
    assert levels[0] == ("Perception", "Reasoning")  # the classes, then only the children of the beam
    assert all(set(labels) <= {"Count", "Read", "Math", "Count objects", "Count people", "Read text", "Solve equation"}
               for labels in levels[1:])
    assert "What is shown?" in engine.asked[0].messages[0]["content"]  # the instruction, without <image>
    assert "<image>" not in engine.asked[0].messages[0]["content"]


def test_instruction_tagging_with_a_tiny_model_always_yields_real_leaves(tmp_path, tiny_models):
    pytest.importorskip("torch")
    from recipec.models.engines import load_engine

    engine = load_engine({"ref": "tiny://llava-onevision"}, workers=1, models_dir=tiny_models)
    ctx = context(tmp_path, {"tagger": {"name": "t", "model": {}, "max_tags": 3, "prompt": None}, "taxonomy": TAXONOMY},
                  engine)
    rows = [record(i, question=q) for i, q in enumerate(["How many dogs?", "Solve x + 2 = 5", "What does the sign say?"])]
    out, _, _, _ = run(tag.run_tag_instructions, ctx, [table(rows)])
    assert len(out) == 3
    for row in out:
        assert 1 <= len(row["instruction_tags"]) <= 3 and set(row["instruction_tags"]) <= LEAVES


def test_image_tags_threshold_and_cap(tmp_path):
    (tmp_path / "images").mkdir()
    engine = Scripted(lambda r: TagScores((0.9, 0.2, 0.7, 0.95)) if r.images[0].sha256 == "sha-a"
                      else RequestError("image_refused", "unreadable"))
    ctx = context(tmp_path, {"tagger": {"name": "t", "model": {}, "threshold": 0.5, "max_tags": 2,
                                        "tags": ["dog", "cat", "ball", "tree"]}}, engine)
    rows = [record(0, image="a"), record(1, image="a"), record(2, image="b"), record(3)]
    out, rejects, _, _ = run(tag.run_tag_images, ctx, [table(rows)])
    assert [r["image_tags"] for r in out] == [["tree", "dog"], ["tree", "dog"], []]
    assert [r.reason for r in rejects] == ["image_refused"] and rejects[0].id == "id2"
    assert len(engine.asked) == 2  # one request per distinct image


# ---- judging and loss -----------------------------------------------------------------------------


def test_judge_score_cuts_and_rejects_what_cannot_be_judged(tmp_path):
    def answer(request):
        text = request.messages[0]["content"]
        if "bad" in text:
            return RequestError("unparseable_output", "the server answered no label")
        label = "9" if "good" in text else "3"
        return Choice(label, {lab: float(lab == label) for lab in request.labels}, 5)

    engine = Scripted(answer)
    rows = [record(0, image="a", answer="good"), record(1, image="b", answer="poor"), record(2, image="c", answer="bad"),
            record(3, source="other", answer="bad")]
    ctx = context(tmp_path, {"model": {}, "prompt": None, "on": ["seed"],
                             "condition": {"verb": "keep", "field": "score", "op": ">=", "value": 8}}, engine)
    (tmp_path / "images").mkdir()
    out, rejects, _, _ = run(judge.run_judge_score, ctx, [table(rows)])
    assert [r["id"] for r in out] == ["id0", "id3"]  # id3 is not judged (`on`)
    assert dict(out[0]["scores"]) == {"score": 9.0}
    assert {r.id: r.reason for r in rejects} == {"id1": "threshold_score", "id2": "unparseable_output"}
    assert all(r.labels == tuple(str(n) for n in range(1, 11)) for r in engine.asked)
    assert engine.asked[0].messages[0]["content"].startswith("<image>\n") and "good" in engine.asked[0].messages[0]["content"]


def test_relevance_is_the_probability_of_yes(tmp_path):
    engine = Scripted(lambda r: Choice("yes", {"yes": 0.7, "no": 0.3}, 4))
    ctx = context(tmp_path, {"model": {}, "prompt": {"text": "Fits? {question}"},
                             "condition": {"verb": "keep", "field": "relevance", "op": ">=", "value": 0.5}}, engine)
    out, _, _, _ = run(judge.run_judge_relevance, ctx, [table([record(0, image="a", answer=None)])])
    assert dict(out[0]["scores"]) == {"relevance": 0.7}
    assert engine.asked[0].labels == ("yes", "no") and "Fits? What is shown?" in engine.asked[0].messages[0]["content"]


def test_score_loss_keeps_the_loss_and_rejects_with_the_engine_reason(tmp_path):
    engine = Scripted(lambda r: LossValue(1.25, 4, 10) if r.images else RequestError("too_long", "9000 tokens"))
    ctx = context(tmp_path, {"model": {}, "field": "loss", "on": None}, engine)
    out, rejects, _, _ = run(loss.run, ctx, [table([record(0, image="a"), record(1)])])
    assert dict(out[0]["scores"]) == {"loss": 1.25} and [r.reason for r in rejects] == ["too_long"]
    assert [m["role"] for m in engine.asked[0].messages] == ["user", "assistant"]


# ---- synthesis ------------------------------------------------------------------------------------


def test_questions_follow_the_mapping_with_few_shot_examples(tmp_path):
    mapping_dir = tmp_path / "map"
    (mapping_dir / "files").mkdir(parents=True)
    (mapping_dir / "files" / "mapping.json").write_text(json.dumps(
        {"types": {"P/Count/Count objects": {"dog": 1.0}, "P/Read/Read text": {"sign": 1.0}}, "top_k": 2, "min_score": 0.0}))
    seeds = [record(i, image=f"img{i}") for i in range(4)] + [record(9)]
    tagged_images = [record(i, image=f"img{i}", tags=["dog"] if i < 3 else ["nothing"]) for i in range(4)]
    tagged_tasks = [record(i, image=f"img{i}", question=f"How many dogs in {i}?", itags=["P/Count/Count objects"])
                    for i in range(4)]
    replies = iter(["Question: How many dogs are there?", "", "How many?"])
    engine = Scripted(lambda r: Generation(next(replies, "x"), "stop", 30, 5) if "img2" not in r.images[0].path
                      else Generation("cut", "length", 30, 32))
    params = {"source": "synthetic", "seeds": 1, "model": {}, "few_shot": 2, "questions_per_image": 1, "images": None,
              "prompt": None, "seed": 1, "max_new_tokens": 32, "temperature": 0.0}
    ctx = context(tmp_path, params, engine, input_dirs=[tmp_path / "seed", mapping_dir, tmp_path / "t1", tmp_path / "t2"])
    out, rejects, skipped, _ = run(synthesize.run_generate_questions, ctx,
                                   [table(seeds), table([]), table(tagged_images), table(tagged_tasks)])
    assert skipped == {"no_image": 1, "untagged_image": 1}
    assert [r.reason for r in rejects] == ["empty_output", "truncated"]
    assert [r["conversations"][0]["value"] for r in out] == ["<image>\nHow many dogs are there?"]
    assert out[0]["source"] == "synthetic" and out[0]["instruction_tags"] == ["P/Count/Count objects"]
    first = engine.asked[0]
    assert len(first.images) == 3 and first.images[0].sha256 == "sha-img0"  # the image, then two examples
    assert "sha-img0" not in {i.sha256 for i in first.images[1:]}
    assert "P / Count / Count objects" in first.messages[0]["content"]
    assert first.messages[0]["content"].count("<image>") == 3
    again = Scripted(lambda r: Generation("q", "stop", 1, 1))
    run(synthesize.run_generate_questions, context(tmp_path, params, again, ctx.input_dirs),
        [table(seeds), table([]), table(tagged_images), table(tagged_tasks)])
    assert [r.images for r in again.asked] == [r.images for r in engine.asked]  # examples chosen by the seed


def test_answers_in_every_style_and_merge_per_image(tmp_path):
    engine = Scripted(lambda r: Generation("Two." if "single word" in r.messages[0]["content"] else "Because... two.",
                                           "stop", 10, 3))
    questions = [record(0, image="a", question="How many?", answer=None, scores=[("relevance", 0.8)]),
                 record(1, image="a", question="What colour?", answer=None, scores=[("relevance", 0.6)])]
    params = {"model": {}, "styles": ["short", "brief_reason"], "seed": 1, "max_new_tokens": 16, "temperature": 0.0,
              "prompts": {"short": None, "brief_reason": None}}
    answers, rejects, _, _ = run(synthesize.run_generate_answers, context(tmp_path, params, engine), [table(questions)])
    assert len(answers) == 4 and rejects == []
    assert answers[0]["conversations"][0]["value"].endswith("Answer the question using a single word or phrase.")
    merged, _, skipped, _ = run(synthesize.run_merge_turns, context(tmp_path, {"merge": "per_image", "source": "synthetic",
                                                                            "category": "synthetic",
                                                                            "data_type": "synthetic"}, None),
                                [table(answers)])
    assert skipped == {"merged_into_multi_turn": 3}
    [sample] = merged
    assert len(sample["conversations"]) == 8 and sample["category"] == "synthetic"
    assert sum(t["value"].count("<image>") for t in sample["conversations"]) == 1
    assert dict(sample["scores"])["relevance"] == pytest.approx(0.7)
    assert sample["id"] == records.record_id("synthetic", sample["images"], sample["conversations"])
    assert Path(tmp_path).exists()
