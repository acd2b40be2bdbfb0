"""docs/language.md, generated from the compiler itself so that it cannot drift.

    python -m recipec.compiler.reference            print the reference
    python -m recipec.compiler.reference --write    rewrite docs/language.md

Which keys each block accepts and their defaults are not written here: they are read off the
compiler by compiling the shipped recipes (and a small recipe holding the blocks they do not use)
with `Reader` instrumented, so a key added to `lower.py` appears here, or rendering fails until it
is described below. Allowed values come from the IR's enumerations, the plan's steps from
`plan.OP_VERSIONS`, reject reasons from the operations, model references from `recipec.models`.
tests/test_language_doc.py fails when docs/language.md differs from what this module renders.
"""

from __future__ import annotations

import argparse
import glob
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from recipec import ir

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "language.md"

# What a key means, by block (the kind of the block a `Reader` reads; `rule` for a keep/drop rule's
# body). `{allowed}` is filled from the IR's enumerations below.
_MODEL_USE = {
    "engine": "which engine runs the model: {ENGINES}",
    "trust_remote_code": "bool; run the model repository's own code (off unless the recipe says so)",
    "revision": "string; the hub revision (branch, tag or commit)",
    "dtype": "bfloat16, float16 or float32",
    "endpoint": "string; the URL of an OpenAI-compatible server (`engine = openai`)",
    "api_key_env": "string; the environment variable that holds the endpoint's API key",
}
KEYS: dict[str, dict[str, str]] = {
    "recipe": {
        "description": "string", "version": "string",
        "seed": "integer 0..2^63-1; every random choice of the run derives from it",
        "extends": "string; the recipe this one derives from (a path relative to this file)",
    },
    "export": {
        "formats": "list of {EXPORT_FORMATS}; what each stage's export writes",
        "images": "{IMAGE_MODES}; how the stage's image folder holds its images",
        "embed_images": "bool; `hf_dataset` and `parquet` hold the image bytes (an `Image` feature)",
    },
    "model": {
        "architecture": "`llava_onevision`: a model to train, built from `vision` and `language`",
        "vision": "model reference (string): the vision tower", "language": "model reference (string): the language tower",
        "projector": "`mlp2x_gelu` (LLaVA-OneVision), `mlpNx_gelu` or `linear`",
        "vision_layer": "integer -64..64; the vision layer whose features feed the projector",
        "tie_word_embeddings": "bool; overrides the language config",
        "ref": "model reference (string): a model that steps use (tagger, synthesis, judge, loss)",
        **_MODEL_USE,
    },
    "prompt": {"text": "string (`\"\"\"...\"\"\"` for several lines)", "file": "string; a text file to read"},
    "taxonomy": {"file": "string or file(\"...\"); a YAML tree of `name`/`children` nodes, `levels`"},
    "source": {
        "format": "{FORMATS}", "path": "string or list of strings; globs relative to the recipe",
        "images": "string; the folder image paths are relative to (they may not leave it)",
        "category": "{CATEGORIES}", "type": "{DATA_TYPES} or `mixed` (each record says its own)",
        "expect": "count (`10M`); the planned size, which mixtures are computed from",
        "license": "string", "revision": "string; the data set's revision",
        "max_pixels": "count; larger images are rejected `image_too_large` (decompression bombs)",
        "scores": "list of names; the score fields the records carry (`loss`, `score`, ...)",
    },
    "columns": {k: f"string; the source's column for `{k}`" for k in
                ("id", "image", "images", "conversations", "data_type", "category", "text")},
    "image_tagger": {
        "model": "a model block's name or a reference string", "on": "list of sources or `all`",
        "threshold": "real 0..1; a tag's minimum probability", "max_tags": "integer 1..1000",
        "vocabulary": "string; a file of tags, one a line", **_MODEL_USE,
    },
    "instruction_tagger": {
        "model": "a model block's name or a reference string", "on": "list of sources or `all`",
        "taxonomy": "a taxonomy block's name", "prompt": "a prompt name, a string or file(\"...\")",
        "max_tags": "integer 1..100", **_MODEL_USE,
    },
    "mapping": {
        "method": "`tfidf`", "image_tags": "an image_tagger's name", "instruction_tags": "an instruction_tagger's name",
        "min_count": "integer >= 1", "top_k": "integer 1..199; instruction types chosen per image",
        "smooth_idf": "bool", "sublinear_tf": "bool", "min_score": "real >= 0",
    },
    "synthesize": {
        "from": "list of sources; the seed images", "mapping": "a mapping's name (image tags -> instruction types)",
        "model": "a model block's name or a reference string", "images": "count; seed images used (default: all)",
        "few_shot": "integer 0..16; examples of the same type in each question prompt",
        "questions_per_image": "integer 1..64", "styles": "list of {ANSWER_STYLES}",
        "merge": "`per_image` (one multi-turn sample per image) or `none`",
        "max_new_tokens": "integer 1..65536", "temperature": "real 0..5",
        "category": "{CATEGORIES}", "type": "{DATA_TYPES} or `mixed`", "expect": "count", **_MODEL_USE,
    },
    "prompts": {role: "a prompt name, a string or file(\"...\")" for role in
                ("question", "relevance", "answer_short", "answer_brief_reason", "answer_detailed_reason", "score")},
    "filter": {"on": "list of sources or `all`; the records the filter judges (others pass)"},
    "dedup exact": {
        "by": "list of `image`, `text`; what must be equal",
        "prefer_sources": "list of sources; whose copy is kept first (then input order)",
    },
    "dedup phash": {
        "max_distance": "integer 0..32; Hamming distance between pHashes that makes near duplicates",
        "prefer": "`best` (larger, then less lossy, then `prefer_sources`, then input order), `largest` or `first`",
        "prefer_sources": "list of sources; preferred between otherwise equal copies",
    },
    "clean": {
        "min_turns": "integer", "max_turns": "integer", "min_answer_chars": "integer", "max_text_chars": "integer",
        "min_image_side": "integer (pixels)", "max_aspect_ratio": "real >= 1", "drop_empty_answers": "bool",
        "require_image": "bool",
    },
    "rule": {"model": "the model that computes the field when the data does not carry it",
             "prompt": "the judge's prompt", **_MODEL_USE},
    "pool": {"sources": "list of sources and synthesized sets", "category": "{CATEGORIES}; every source of it"},
    "stage": {
        "model": "the model block trained (default: the only one with an `architecture`)",
        "train": "`all` or a list of {TRAINABLE_PARTS}", "image_size": "integer 14..8192 (pixels per tile side)",
        "grid": "`NxM`; the largest tile grid (anyres)", "max_tiles": "integer 1..1024; LLaVA-OneVision's anyres_max",
        "image_token_budget": "`NxM` or a count; the most image tokens a sample may take",
        "lr": "real (0, 10]", "vision_lr": "real; the vision tower's own learning rate",
        "projector_lr": "real", "language_lr": "real",
        "batch": "integer; the global batch", "micro_batch": "integer; per device",
        "epochs": "real > 0", "warmup": "share (`3%` or 0.03)", "schedule": "`cosine`, `linear` or `constant`",
        "weight_decay": "real >= 0", "max_length": "integer >= 16 (tokens)",
        "samples": "count; the stage's total (shares and `balance` fill it)",
        "balance": "`data_type`, `source` or `category` (or a `balance { ... }` block)",
        "order": "`shuffle`, `sequential`, ascending(field) or descending(field)",
        "after": "the stage whose checkpoint this one starts from (default: the one before)",
        "gradient_checkpointing": "bool; recompute activations in the backward pass to save memory",
        "checkpoint_every": "integer >= 0; optimizer steps between intermediate checkpoints (0: none)",
        "grad_clip": "real >= 0; the largest gradient norm (0: no clipping)",
    },
    "balance": {"by": "`data_type`, `source` or `category`", "min_share": "share", "max_share": "share"},
}
NESTED = {"recipe": ["export"], "source": ["columns"], "synthesize": ["prompts"], "filter": ["dedup exact", "dedup phash",
          "clean"], "stage": ["mix", "balance"]}
TITLES = {"recipe": 'recipe "name" { ... }  (the header)', "export": "export { ... }  (in the header)",
          "columns": "columns { ... }  (in a source)", "prompts": "prompts { ... }  (in synthesize)",
          "dedup exact": "dedup exact { ... }  (in a filter)", "dedup phash": "dedup phash { ... }  (in a filter)",
          "clean": "clean { ... }  (in a filter)", "rule": "the body of a keep/drop rule: `drop loss top 5% { ... }`",
          "balance": "balance { ... }  (in a stage)"}
ORDER = ["recipe", "export", "model", "prompt", "taxonomy", "source", "columns", "image_tagger", "instruction_tagger",
         "mapping", "synthesize", "prompts", "filter", "dedup exact", "dedup phash", "clean", "rule", "pool", "stage",
         "balance"]

# Blocks the shipped recipes may not use, and empty blocks (whose defaults the compiler then
# falls back to), so that every Reader is built at least once and every default read.
_EXTRA = '''recipe "reference" {
  export { formats = [llava] }
}
source s { format = llava_jsonl  path = "x.jsonl"  columns { id = "uid" } }
filter f { dedup exact { by = [image] }  dedup phash { max_distance = 4 }  clean { min_turns = 1 }
           drop loss top 5% { model = "tiny://qwen2" } }
stage t { balance { by = source }  mix { s = all } }
model m {}
prompt pr {}
taxonomy tx {}
image_tagger it {}
instruction_tagger itt {}
mapping mp {}
synthesize sy {}
filter f2 {}
pool p {}
stage t2 { mix { s = all } }
'''

STEPS = {
    "ingest": "reads one source into records, validating each (reject reasons below)",
    "tag_images": "`image_tags`: zero-shot SigLIP tags from the vocabulary file, at or above `threshold`, up to `max_tags`",
    "tag_instructions": "`instruction_tags`: taxonomy leaves chosen level by level by constrained choice, "
                        "with their probabilities in `scores`",
    "map_tags": "TF-IDF of image tags per instruction type: which questions to ask of an image",
    "generate_questions": "new questions per seed image, with few-shot examples of the target type",
    "judge_relevance": "asks the model whether a question fits its image (`keep relevance >= x`)",
    "generate_answers": "answers in each style",
    "judge_score": "a 1-10 score per record by constrained choice (synthesis, or a filter's `keep field >= x { model = ... }`)",
    "score_loss": "per-sample mean token loss over the answers under a model",
    "threshold": "`keep|drop field <op> value`: drops records by a score (`threshold_<field>`)",
    "percentile": "`drop field top|bottom x%`: drops the share of records with the extreme scores",
    "merge_turns": "merges one image's QA pairs into a multi-turn sample",
    "collect": "the data sets in plan order, concatenated",
    "dedup_exact": "drops records with the same images and/or text (`exact_duplicate`)",
    "dedup_phash": "drops near-duplicate images by pHash, keeping the best copy (`near_duplicate`)",
    "clean": "rule-based cleaning (`clean_<rule>`)",
    "mix": "draws a stage's mixture (skips: `not_in_stage`, `not_selected`)",
    "export": "writes the stage's files (formats below); records pass through",
    "train": "trains the stage: a checkpoint, intermediate checkpoints and a log",
}


@contextmanager
def _instrumented() -> Iterator[tuple[dict[str, set[str]], dict[str, dict[str, Any]]]]:
    """Record, per block kind, the keys each `Reader` allows and the defaults `get` falls back to."""
    from recipec.compiler import reader

    keys: dict[str, set[str]] = {}
    defaults: dict[str, dict[str, Any]] = {}
    original_init, original_get = reader.Reader.__init__, reader.Reader.get

    def kind_of(self) -> str:
        block = self.block
        if block is None:
            return "rule"
        if block.kind == "dedup":
            return f"dedup {block.name}"
        return block.kind

    def init(self, ctx, block, *, keys: set[str], **kwargs):
        original_init(self, ctx, block, keys=keys, **kwargs)
        self._reference_kind = kind_of(self)
        if self._reference_kind != "mix":
            keys_of = globals_keys.setdefault(self._reference_kind, set())
            keys_of.update(keys)

    def get(self, key, convert, default=reader.MISSING):
        if key not in self.attributes:
            defaults.setdefault(getattr(self, "_reference_kind", "?"), {}).setdefault(
                key, REQUIRED if default is reader.MISSING else default)
        return original_get(self, key, convert, default)

    globals_keys = keys
    reader.Reader.__init__, reader.Reader.get = init, get
    try:
        yield keys, defaults
    finally:
        reader.Reader.__init__, reader.Reader.get = original_init, original_get


def compiler_tables() -> tuple[dict[str, set[str]], dict[str, dict[str, Any]]]:
    from recipec.compiler import compile_file

    with _instrumented() as (keys, defaults):
        for path in sorted(glob.glob(str(REPO / "recipes" / "*.recipe"))) + [str(REPO / "examples" / "quickstart.recipe")]:
            compile_file(path)
        compile_file(str(REPO / "reference.recipe"), text=_EXTRA)
    return keys, defaults


def _fill(text: str) -> str:
    names = {"ENGINES": ir.ENGINES, "EXPORT_FORMATS": ir.EXPORT_FORMATS, "IMAGE_MODES": ir.IMAGE_MODES,
             "FORMATS": ir.FORMATS, "CATEGORIES": ir.CATEGORIES, "DATA_TYPES": ir.DATA_TYPES,
             "ANSWER_STYLES": ir.ANSWER_STYLES, "TRAINABLE_PARTS": ir.TRAINABLE_PARTS}
    for name, values in names.items():
        text = text.replace("{" + name + "}", ", ".join(f"`{v}`" for v in values))
    return text


def _default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(str(v) for v in value) + "]" if value else "[]"
    if isinstance(value, BaseException) or hasattr(value, "model_dump"):
        return "see below" if not hasattr(value, "kind") else str(getattr(value, "kind"))
    return f"{value:g}" if isinstance(value, float) else str(value)


REQUIRED = object()
# Keys the compiler reads without `Reader.get`'s default: their default is the IR's.
_IR_DEFAULTS: dict[str, tuple[type, dict[str, str]]] = {
    "export": (ir.Export, {"formats": "formats"}),
    **{kind: (ir.ModelUse, {k: k for k in ("engine", "trust_remote_code", "dtype", "revision", "endpoint")})
       for kind in ("model", "image_tagger", "instruction_tagger", "synthesize", "rule")},
    "dedup exact": (ir.DedupExact, {"by": "by"}),
    "stage": (ir.Stage, {"train": "__parts__"}),
    "balance": (ir.Balance, {"by": "by"}),
}


def _default_of(kind: str, key: str, defaults: dict[str, dict[str, Any]]) -> str:
    found = defaults.get(kind, {}).get(key, None if key not in defaults.get(kind, {}) else None)
    if key in defaults.get(kind, {}):
        return "required" if found is REQUIRED else _default(found)
    model, fields = _IR_DEFAULTS.get(kind, (None, {}))
    if model is not None and key in fields:
        if fields[key] == "__parts__":
            return "all"
        return _default(model.model_fields[fields[key]].default)
    return "-"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


class StaleReference(Exception):
    pass


def render() -> str:
    from recipec.models import configs
    from recipec.ops.registry import REJECT_REASONS

    keys, defaults = compiler_tables()
    problems = []
    for kind in sorted(set(keys) | set(KEYS)):
        undocumented = keys.get(kind, set()) - set(KEYS.get(kind, {}))
        gone = set(KEYS.get(kind, {})) - keys.get(kind, set())
        if kind not in ORDER and kind in keys:
            problems.append(f"block `{kind}` is not in ORDER")
        if undocumented:
            problems.append(f"`{kind}` accepts {', '.join(sorted(undocumented))}, which KEYS does not describe")
        if gone:
            problems.append(f"KEYS describes {', '.join(sorted(gone))} in `{kind}`, which the compiler does not accept")
    if problems:
        raise StaleReference("recipec/compiler/reference.py is out of date: " + "; ".join(problems))

    out = ["# The recipe language", "",
           "<!-- generated by `python -m recipec.compiler.reference --write` from the compiler's own tables; "
           "do not edit -->", "",
           "A recipe is blocks of `key = value`, nested blocks, `keep`/`drop` rules and, in derived recipes,",
           "`remove kind.name` (a block) or `remove key` (inside a block). Comments start with `#` or `//`.",
           "Nothing in a recipe executes code. `recipec check` reports a key a block does not accept, with",
           "the closest one it does.", "",
           "## Values and units", "",
           "| written | means |", "|---|---|",
           "| `42`, `-2`, `0.5`, `1e-5` | numbers |",
           "| `10M`, `8.6M`, `500K`, `2B`, `1T` | counts (10,000,000, ...) |",
           "| `5%` | a share (0.05); a share may also be written 0.05 |",
           "| `2x2` | a tile grid; `10x729` a token budget (7,290) |",
           '| `"text"`, `"""several lines"""` | strings |',
           "| `name` | a name: a block, an enumerated value, `all`, `true`/`false` |",
           "| `[a, b]` | a list |",
           '| `f(x, ...)` | `file("path")`, mixture amounts, orders |', ""]
    out += ["## Blocks", "",
            "Each block's keys, what they take and their default (`-`: none, the key is required or follows",
            "from the rest of the recipe; `none`: unset).", ""]
    for kind in ORDER:
        if kind not in keys:
            continue
        out += [f"### {TITLES.get(kind, kind + ' NAME { ... }')}", ""]
        if NESTED.get(kind):
            out += ["Nested blocks: " + ", ".join(f"`{n}`" for n in NESTED[kind]) + ".", ""]
        if kind in ("filter", "synthesize"):
            out += ["Rules: `keep FIELD OP VALUE` and `drop FIELD OP VALUE` (OP one of `>=`, `<=`, `>`, `<`, `==`, "
                    "`!=`), `drop FIELD top|bottom SHARE`, each with an optional body (below).", ""]
        out += ["| key | value | default |", "|---|---|---|"]
        for key in sorted(keys[kind]):
            out.append(f"| `{key}` | {_cell(_fill(KEYS[kind][key]))} | {_cell(_default_of(kind, key, defaults))} |")
        out.append("")
    out += ["### mix { ... }  (in a stage)", "",
            "One line per source, synthesized set or pool: `NAME = AMOUNT`, where AMOUNT is `all`, a count (a seeded",
            "random sample), a share of the stage's `samples`, `first(N)`, `random(N)`, `cap(N)`, `weight(x)` or",
            "`part(k, n)` (the k-th of n disjoint parts; the other stages take the other parts).", ""]
    out += ["## Steps", "",
            "`recipec plan` shows the steps a recipe compiles to; each reads the records of the steps before it",
            "and produces records (and rejects with a reason) in one schema: `id` (recipec's content id),",
            "`source_id` (the data set's own id), `source`, `origin`, `images`, `conversations`, `category`,",
            "`data_type`, `image_tags`, `instruction_tags`, `scores`, `provenance`.", "",
            "| op | what it does |", "|---|---|"]
    from recipec.plan import MODEL_OPS, OP_VERSIONS

    for op in OP_VERSIONS:
        out.append(f"| `{op}` | {_cell(STEPS.get(op, ''))}{' (loads a model)' if op in MODEL_OPS else ''} |")
    out += ["", "Filters read: `dedup` the images' sha256 or pHash and the text; `clean` the conversation and",
            "image sizes; `keep`/`drop` a field of `scores` (from the data, declared with a source's `scores`, or",
            "computed by the rule's `model`).", "",
            "Reject reasons: " + ", ".join(f"`{r}`" for r in sorted(REJECT_REASONS)) +
            ", and the families `clean_<rule>`, `threshold_<field>`, `percentile_<field>`, `http_<status>`.", ""]
    out += ["## Exports", "",
            "Per stage, into `OUT/<stage>/`, as the header's `export` block says (default: `llava`):", "",
            "| format | files |", "|---|---|",
            "| `llava` | `<stage>.json` (LLaVA JSON; `image` always a list) and `<stage>.yaml` (LLaVA-NeXT's data "
            "YAML, absolute paths; its first lines give `--data_path` and `--image_folder`) |",
            "| `hf_dataset` | `hf/`, for `datasets.load_from_disk` |",
            "| `parquet` | `parquet/<stage>-0000i-of-0000N.parquet` |",
            "| `messages` | `<stage>.messages.jsonl`: `messages` (user/assistant, image and text parts) and "
            "`images` |",
            "| always | `<stage>.training.json` (the stage's training settings and LLaVA-NeXT arguments), "
            "`images.sha256`, `images/<source>/<path>` (the stage's images only) |", ""]
    tiny = sorted(configs._TINY)
    out += ["## Model references", "",
            "A model reference is resolved offline, in this order: `tiny://NAME` (a small random-weight model",
            "recipec builds), a local directory holding `config.json`, the local Hugging Face cache, then a",
            "config recipec ships.", "",
            "tiny:// models: " + ", ".join(f"`tiny://{n}`" for n in tiny) + ".", "",
            "Shipped configs: " + ", ".join(f"`{r}`" for r in configs.shipped_refs()) + ".", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipec.compiler.reference")
    parser.add_argument("--write", action="store_true", help=f"rewrite {DOC.relative_to(REPO)}")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
