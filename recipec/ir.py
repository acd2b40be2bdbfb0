"""The compiled recipe: names resolved, units normalised, defaults applied, derived numbers computed.

Every model here is frozen. `canonical_json` is the one serialisation that fingerprints are taken
from: sorted keys, no whitespace, no source positions, so layout and comments never change it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_serializer

IR_VERSION = 1

DATA_TYPES = ("general", "ocr", "doc_chart_screen", "math_reasoning", "text", "synthetic")
CATEGORIES = ("caption", "comprehensive", "selective", "gpt4", "synthetic", "other")
FORMATS = ("llava_json", "llava_jsonl", "parquet", "hf_dataset", "image_folder")
ENGINES = ("transformers", "vllm", "openai")
TRAINABLE_PARTS = ("vision", "projector", "language")
ANSWER_STYLES = ("short", "brief_reason", "detailed_reason")

DataType = Literal["general", "ocr", "doc_chart_screen", "math_reasoning", "text", "synthetic", "mixed"]


class Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---- models -------------------------------------------------------------------------------------


class ModelUse(Node):
    """A model some step loads: where from, at which revision, and whether its code may run."""

    ref: str
    revision: str | None = None
    trust_remote_code: bool = False
    engine: Literal["transformers", "vllm", "openai"] = "transformers"
    dtype: str = "bfloat16"
    endpoint: str | None = None
    api_key_env: str | None = None  # the environment variable holding the HTTP engine's API key, never the key

    @model_serializer(mode="wrap")
    def _without_unset_key_variable(self, handler: Any) -> Any:
        data = handler(self)  # a recipe that names no key serialises (and fingerprints) as before
        if isinstance(data, dict) and data.get("api_key_env") is None:
            data.pop("api_key_env", None)
        return data


class ParamCounts(Node):
    vision: int
    projector: int
    language: int
    image_newline: int = 0  # LLaVA-OneVision's learnt separator after each row of tile features
    total: int

    def trainable(self, parts: tuple[str, ...]) -> int:
        """Parameters that `parts` train; the separator trains with the projector, which it feeds."""
        extra = self.image_newline if "projector" in parts else 0
        return sum(getattr(self, part) for part in parts) + extra


class Architecture(Node):
    """The model being trained (LLaVA-OneVision: vision tower, projector, language tower)."""

    name: str
    architecture: Literal["llava_onevision"] = "llava_onevision"
    vision: ModelUse
    language: ModelUse
    projector: str = "mlp2x_gelu"
    vision_layer: int = -1
    tie_word_embeddings: bool | None = None
    # derived from the towers' configs
    image_size: int
    patch_size: int
    tokens_per_tile: int
    params: ParamCounts
    config_origin: dict[str, str]  # tower -> where its config was found


# ---- data ---------------------------------------------------------------------------------------


class Source(Node):
    name: str
    format: Literal["llava_json", "llava_jsonl", "parquet", "hf_dataset", "image_folder"]
    paths: tuple[str, ...]
    images: str | None = None
    category: str = "other"
    data_type: DataType = "general"
    expect: int | None = None
    license: str | None = None
    revision: str | None = None
    max_pixels: int = 89_478_485
    columns: dict[str, str] = Field(default_factory=dict)  # unified field -> column in this source
    scores: tuple[str, ...] = ()  # the numeric fields its records carry (`keep`/`drop` rules may test them)


class TaxonomyNode(Node):
    name: str
    children: tuple["TaxonomyNode", ...] = ()


class Taxonomy(Node):
    name: str
    file: str
    sha256: str
    levels: tuple[str, ...]
    tree: tuple[TaxonomyNode, ...]
    leaves: int


class Prompt(Node):
    name: str
    text: str
    file: str | None = None


class Condition(Node):
    """A keep/drop rule: a threshold (`keep score >= 8`) or a percentile (`drop loss top 5%`)."""

    verb: Literal["keep", "drop"]
    field: str
    op: Literal[">=", "<=", ">", "<", "==", "!=", "top", "bottom"]
    value: float
    model: ModelUse | None = None  # the model that computes `field`, when the data doesn't carry it
    prompt: Prompt | None = None


class ImageTagger(Node):
    name: str
    model: ModelUse
    on: tuple[str, ...]
    threshold: float = 0.68
    max_tags: int = 20
    vocabulary: str | None = None  # the file the tags came from
    tags: tuple[str, ...] = ()  # the vocabulary (empty: the model's own, e.g. RAM++)


class InstructionTagger(Node):
    name: str
    model: ModelUse
    taxonomy: str
    on: tuple[str, ...]
    prompt: Prompt | None = None
    max_tags: int = 3


class Mapping(Node):
    name: str
    method: Literal["tfidf"] = "tfidf"
    image_tags: str
    instruction_tags: str
    min_count: int = 1
    top_k: int = 3
    smooth_idf: bool = True
    sublinear_tf: bool = False
    min_score: float = 0.0


class Synthesis(Node):
    name: str
    from_sources: tuple[str, ...]
    mapping: str | None = None
    model: ModelUse
    images: int | None = None  # how many seed images to synthesize for (None: all)
    few_shot: int = 2
    questions_per_image: int = 3
    styles: tuple[str, ...] = ANSWER_STYLES
    prompts: dict[str, Prompt] = Field(default_factory=dict)
    rules: tuple[Condition, ...] = ()
    merge: Literal["per_image", "none"] = "per_image"
    max_new_tokens: int = 512
    temperature: float = 0.7
    category: str = "synthetic"
    data_type: DataType = "synthetic"
    expect: int | None = None


class DedupExact(Node):
    op: Literal["dedup_exact"] = "dedup_exact"
    by: tuple[str, ...] = ("image", "text")
    prefer_sources: tuple[str, ...] = ()  # whose copy is kept first (recipec.ops.dedup)


class DedupPhash(Node):
    op: Literal["dedup_phash"] = "dedup_phash"
    max_distance: int = 4
    keep: Literal["best", "largest", "first"] = "best"  # the recipe's `prefer`
    prefer_sources: tuple[str, ...] = ()


class Clean(Node):
    op: Literal["clean"] = "clean"
    rules: dict[str, Any]


class Threshold(Node):
    op: Literal["threshold"] = "threshold"
    condition: Condition


class Percentile(Node):
    op: Literal["percentile"] = "percentile"
    condition: Condition


FilterOp = Annotated[Union[DedupExact, DedupPhash, Clean, Threshold, Percentile], Field(discriminator="op")]


class Filter(Node):
    name: str
    on: tuple[str, ...]
    ops: tuple[FilterOp, ...]


class Pool(Node):
    name: str
    sources: tuple[str, ...]


# ---- stages -------------------------------------------------------------------------------------


class MixEntry(Node):
    """One line of a stage's mixture: which source or pool, and how much of it."""

    name: str
    kind: Literal["all", "count", "first", "random", "share", "weight", "part", "cap"]
    count: int | None = None
    share: float | None = None
    weight: float | None = None
    part: tuple[int, int] | None = None  # (k, n): the k-th of n disjoint parts


class Order(Node):
    kind: Literal["shuffle", "sequential", "ascending", "descending"] = "shuffle"
    field: str | None = None


class Balance(Node):
    by: Literal["data_type", "source", "category"] = "data_type"
    min_share: float = 0.0
    max_share: float = 1.0


class Composition(Node):
    """Planned samples of a stage, derived from the sources' expected sizes."""

    total: int | None
    by_source: dict[str, int | None]
    by_data_type: dict[str, int]
    by_category: dict[str, int]


class Stage(Node):
    name: str
    model: str
    train: tuple[str, ...]
    image_size: int
    grid: tuple[int, int] = (1, 1)
    max_tiles: int | None = None
    image_token_budget: int | None = None
    lr: float
    part_lr: dict[str, float] = Field(default_factory=dict)
    batch: int = 512
    micro_batch: int | None = None
    epochs: float = 1.0
    warmup: float = 0.03
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_length: int = 8192
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500  # optimizer steps between intermediate checkpoints; 0: none
    grad_clip: float = 1.0  # max gradient norm; 0: no clipping
    samples: int | None = None
    balance: Balance | None = None
    order: Order = Order()
    mix: tuple[MixEntry, ...]
    after: str | None = None  # the stage whose checkpoint this one starts from
    # derived
    max_image_tokens: int
    trainable_params: int
    total_params: int
    composition: Composition


EXPORT_FORMATS = ("llava", "hf_dataset", "parquet", "messages")
IMAGE_MODES = ("link", "copy", "hardlink")


class Export(Node):
    """What each stage's export writes (recipec.ops.export) and how its image folder is made."""

    formats: tuple[Literal["llava", "hf_dataset", "parquet", "messages"], ...] = ("llava",)
    images: Literal["link", "copy", "hardlink"] = "link"  # per-file links, copies or hard links
    embed_images: bool = False  # hf_dataset and parquet hold the image bytes (an `Image` feature)


class Recipe(Node):
    ir_version: int = IR_VERSION
    name: str
    description: str | None = None
    version: str | None = None
    seed: int = 0
    base: str | None = None
    models: dict[str, Architecture] = Field(default_factory=dict)
    model_refs: dict[str, ModelUse] = Field(default_factory=dict)  # the models steps use (taggers, synthesis, scoring)
    sources: dict[str, Source] = Field(default_factory=dict)
    taxonomies: dict[str, Taxonomy] = Field(default_factory=dict)
    prompts: dict[str, Prompt] = Field(default_factory=dict)
    image_taggers: dict[str, ImageTagger] = Field(default_factory=dict)
    instruction_taggers: dict[str, InstructionTagger] = Field(default_factory=dict)
    mappings: dict[str, Mapping] = Field(default_factory=dict)
    syntheses: dict[str, Synthesis] = Field(default_factory=dict)
    filters: tuple[Filter, ...] = ()
    pools: dict[str, Pool] = Field(default_factory=dict)
    stages: tuple[Stage, ...] = ()
    export: Export = Export()

    def datasets(self) -> dict[str, Source | Synthesis]:
        """Every name a mixture or filter can draw from directly: sources and synthesized sets."""
        return {**self.sources, **self.syntheses}


TaxonomyNode.model_rebuild()


def canonical_json(model: BaseModel | Any) -> str:
    data = model.model_dump(mode="json") if isinstance(model, BaseModel) else model
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(model: BaseModel | Any) -> str:
    return hashlib.sha256(canonical_json(model).encode("utf-8")).hexdigest()
