"""The installed operations by plan op name: `OPERATIONS[op](ctx, input_tables) -> Iterator[Chunk]`.

One line per op; a plan step whose op is missing here cannot run (the executor says so up front).
Model-backed ops (tagging, synthesis, scoring, training) are registered by their modules' owners.
"""

from __future__ import annotations

from recipec.ops import clean, collect, cuts, dedup, export, ingest, judge, loss, mapping, mix, synthesize, tag
from recipec.ops import train
from recipec.models.engine import REQUEST_ERRORS
from recipec.ops.base import Operation

OPERATIONS: dict[str, Operation] = {
    "ingest": ingest.run,
    "collect": collect.run,
    "dedup_exact": dedup.run_exact,
    "dedup_phash": dedup.run_phash,
    "clean": clean.run,
    "threshold": cuts.run_threshold,
    "percentile": cuts.run_percentile,
    "mix": mix.run,
    "export": export.run,
    "tag_images": tag.run_tag_images,
    "tag_instructions": tag.run_tag_instructions,
    "map_tags": mapping.run,
    "generate_questions": synthesize.run_generate_questions,
    "judge_relevance": judge.run_judge_relevance,
    "generate_answers": synthesize.run_generate_answers,
    "judge_score": judge.run_judge_score,
    "score_loss": loss.run,
    "merge_turns": synthesize.run_merge_turns,
    "train": train.run,
}

# Every reason an op here may give a reject (stable codes; `clean_*`, `threshold_<field>`,
# `percentile_<field>` and the engines' `http_<status>` are families). Skipped (not rejected) by
# mix: not_selected, not_in_stage; by synthesis: no_image, same_image, untagged_image,
# over_image_cap, merged_into_multi_turn.
REJECT_REASONS: frozenset[str] = frozenset(
    ingest.REASONS | dedup.REASONS | clean.REASONS | synthesize.REASONS | REQUEST_ERRORS | {"score_missing"})
