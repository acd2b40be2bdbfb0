"""map_tags: which instruction types suit an image with given tags (Infinity-MM 3.2.2), by TF-IDF.

The seed records tagged on both sides are joined by id. Each instruction type (a taxonomy leaf)
is a document whose terms are the image tags of the records of that type, counted; counts below
`min_count` are dropped. scikit-learn's `TfidfTransformer` weighs them (`smooth_idf`,
`sublinear_tf`, L2-normalised per type), so a tag that goes with every type weighs little and one
that singles a type out weighs much. For a new image, a type's score is the sum of the weights of
the image's tags; the `top_k` types above `min_score` are asked.

The mapping is written as `mapping.json`, readable by people (per instruction type, its image tags
and weights, heaviest first) and read by generate_questions. The tagged records are context for
the mapping, not passed on: the step outputs no records.
"""

from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa

from recipec.ops.base import Chunk, StepContext
from recipec.ops.collect import concat


def tfidf_weights(pairs: list[tuple[list[str], list[str]]], *, min_count: int = 1, smooth_idf: bool = True,
                  sublinear_tf: bool = False) -> dict[str, dict[str, float]]:
    """(image tags, instruction tags) per record -> instruction type -> image tag -> weight."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfTransformer

    counts: dict[str, dict[str, int]] = {}
    for image_tags, instruction_tags in pairs:
        for kind in dict.fromkeys(instruction_tags):
            row = counts.setdefault(kind, {})
            for tag in dict.fromkeys(image_tags):
                row[tag] = row.get(tag, 0) + 1
    kinds = sorted(counts)
    for kind in kinds:
        counts[kind] = {t: n for t, n in counts[kind].items() if n >= min_count}
    terms = sorted({t for kind in kinds for t in counts[kind]})
    if not kinds or not terms:
        return {kind: {} for kind in kinds}
    index = {t: j for j, t in enumerate(terms)}
    matrix = np.zeros((len(kinds), len(terms)))
    for i, kind in enumerate(kinds):
        for tag, n in counts[kind].items():
            matrix[i, index[tag]] = n
    weights = TfidfTransformer(smooth_idf=smooth_idf, sublinear_tf=sublinear_tf, norm="l2").fit_transform(matrix).toarray()
    return {kind: {terms[j]: round(float(weights[i, j]), 6)
                   for j in sorted(np.flatnonzero(weights[i]), key=lambda j: (-weights[i, j], terms[j]))}
            for i, kind in enumerate(kinds)}


def rank_types(weights: dict[str, dict[str, float]], image_tags: list[str], *, top_k: int,
               min_score: float = 0.0) -> list[tuple[str, float]]:
    """The instruction types for an image with `image_tags`, best first (ties by name)."""
    scores = {kind: sum(row.get(tag, 0.0) for tag in set(image_tags)) for kind, row in weights.items()}
    ranked = sorted(((k, s) for k, s in scores.items() if s > min_score), key=lambda x: (-x[1], x[0]))
    return ranked[:top_k]


def run(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    mapping = ctx.params["mapping"]
    image_side, instruction_side = (concat([t]) for t in inputs)
    image_tags = dict(zip(image_side.column("id").to_pylist(), image_side.column("image_tags").to_pylist()))
    pairs = []
    for record_id, tags in zip(instruction_side.column("id").to_pylist(), instruction_side.column("instruction_tags").to_pylist()):
        if record_id in image_tags and tags and image_tags[record_id]:
            pairs.append((image_tags[record_id], tags))
    weights = tfidf_weights(pairs, min_count=mapping["min_count"], smooth_idf=mapping["smooth_idf"],
                            sublinear_tf=mapping["sublinear_tf"])
    document = {"mapping": mapping["name"], "method": mapping["method"], "records": len(pairs),
                "top_k": mapping["top_k"], "min_score": mapping["min_score"], "min_count": mapping["min_count"],
                "types": weights}
    text = json.dumps(document, indent=1, ensure_ascii=False, sort_keys=False) + "\n"
    ctx.log.info("mapping %s: %d joined records, %d instruction types, %d image tags", mapping["name"], len(pairs),
                 len(weights), len({t for row in weights.values() for t in row}))
    yield Chunk(files={"mapping.json": text.encode("utf-8")})
