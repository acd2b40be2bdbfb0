"""Syntax tree -> IR: every block checked against what it may say, names resolved, numbers derived.

All problems are collected in one pass; the IR is built only when there are none.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import yaml

from recipec import ir
from recipec.allocate import allocate
from recipec.compiler import towers
from recipec.compiler import values as v
from recipec.compiler.files import IncludeError, Includes, include_root
from recipec.compiler.reader import MISSING, Context, Reader
from recipec.diagnostics import Span, did_you_mean, printable
from recipec.syntax import ast

# libyaml's safe loader when present: the same safety, ten times faster on a 200-node taxonomy
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

BLOCK_KINDS = ("recipe", "model", "source", "taxonomy", "prompt", "image_tagger", "instruction_tagger",
               "mapping", "synthesize", "filter", "pool", "stage")
NAMED = set(BLOCK_KINDS) - {"recipe"}
SYNTHESIS_FIELDS = {"relevance", "score"}  # what a synthesis's own judge steps compute
# words with a meaning of their own wherever a name may stand (`on = all`, `keep ...`, `x = true`)
RESERVED = {"all", "true", "false", "keep", "drop", "remove", "top", "bottom"}

MODEL_USE_KEYS = {"engine", "trust_remote_code", "revision", "dtype", "endpoint", "api_key_env"}
CLEAN_RULES = {
    "min_turns": "int", "max_turns": "int", "min_answer_chars": "int", "max_text_chars": "int",
    "min_image_side": "int", "max_aspect_ratio": "real", "drop_empty_answers": "bool", "require_image": "bool",
}


def _enum(options: tuple[str, ...] | set[str], what: str):
    def convert(value: ast.Value) -> str:
        if isinstance(value, ast.Name) and value.name in options:
            return value.name
        if isinstance(value, ast.Name):
            raise v.ValueProblem("E203", f"unknown {what} `{value.name}`",
                                 did_you_mean(value.name, options))
        raise v.ValueProblem("E201", f"expected a {what} ({', '.join(sorted(options))}), found {v.describe(value)}")
    return convert


class Lowering:
    def __init__(self, document: ast.Document, ctx: Context, root: Path, includes: Includes | None = None):
        self.document = document
        self.ctx = ctx
        self.root = root  # the directory of the recipe being compiled: IR paths are relative to it
        self.includes = includes or Includes(include_root(document.path))  # prompts, taxonomies
        self.blocks: dict[str, dict[str, ast.Block]] = {k: {} for k in BLOCK_KINDS}
        self.model_refs: dict[str, ir.ModelUse] = {}
        self.architectures: dict[str, ir.Architecture] = {}
        self.prompts: dict[str, ir.Prompt] = {}
        self.rule_spans: dict[int, Span] = {}  # id(ir.Condition) -> where its field is written
        self._folders: dict[str, str] = {}  # a recipe file -> its folder relative to `root`

    # ---- helpers --------------------------------------------------------------------------------

    def path_of(self, text: str, span: Span) -> str:
        """A path written in the file at `span`, made relative to the compiled recipe's directory."""
        if os.path.isabs(text):
            return text
        # relpath(normpath(dir/text), root) == normpath(relpath(dir, root)/text): both are lexical, and
        # the folder's part is worked out once per file (relpath per path was most of lowering a
        # recipe of thousands of sources)
        folder = self._folders.get(span.path)
        if folder is None:
            folder = self._folders[span.path] = os.path.relpath(os.path.dirname(span.path) or ".", self.root)
        relative = os.path.normpath(os.path.join(folder, text))
        return relative if os.sep == "/" else Path(relative).as_posix()

    def read_file(self, text: str, span: Span) -> tuple[str, str] | None:
        """(relative path, content) of a file a recipe includes, or None after reporting why not."""
        relative = self.path_of(text, span)
        target = Path(relative) if Path(relative).is_absolute() else self.root / relative
        try:
            return relative, self.includes.read(target)
        except IncludeError as error:
            self.ctx.error("E402", f"cannot read `{printable(text)}`: {error.reason}", span, error.hint)
            return None

    def ref_names(self, reader: Reader, key: str, kinds: dict[str, Any], what: str, default: Any = MISSING) -> tuple[str, ...]:
        node = reader.node(key)
        if node is None:
            if default is MISSING:
                reader.get(key, v.name)
                return ()
            return default
        if isinstance(node.value, ast.Name) and node.value.name == "all":
            return tuple(kinds)
        try:
            pairs = v.names(node.value)
        except v.ValueProblem as problem:
            self.ctx.error(problem.code, f"`{key}`: {problem.message}", node.value.span, problem.hint)
            return ()
        found = []
        for name, name_node in pairs:
            if name not in kinds:
                self.ctx.error("E105", f"unknown {what} `{name}`", name_node.span, did_you_mean(name, kinds))
            else:
                found.append(name)
        return tuple(found)

    def ref_name(self, reader: Reader, key: str, kinds: dict[str, Any], what: str, default: Any = MISSING) -> str | None:
        node = reader.node(key)
        if node is None:
            return reader.get(key, v.name, default)
        if not isinstance(node.value, ast.Name):
            self.ctx.error("E201", f"`{key}`: expected the name of a {what}, found {v.describe(node.value)}", node.value.span)
            return None
        if node.value.name not in kinds:
            self.ctx.error("E105", f"unknown {what} `{node.value.name}`", node.value.span, did_you_mean(node.value.name, kinds))
            return None
        return node.value.name

    def model_use(self, reader: Reader, key: str = "model", default: Any = MISSING) -> ir.ModelUse | None:
        """`model = some_model_block` or `model = "org/name"`, with per-use overrides beside it."""
        node = reader.node(key)
        if node is None:
            return reader.get(key, v.string, default)
        base: ir.ModelUse | None = None
        if isinstance(node.value, ast.String):
            base = ir.ModelUse(ref=node.value.value)
        elif isinstance(node.value, ast.Name):
            name = node.value.name
            if name in self.model_refs:
                base = self.model_refs[name]
            elif name in self.architectures or _has_architecture(self.blocks["model"].get(name)):
                self.ctx.error("E307", f"`{name}` is the model the stages train, not one a step can run", node.value.span,
                               'name a reference model (`model = "Qwen/Qwen2-VL-2B-Instruct"`) or declare '
                               f'`model {name}_ref {{ ref = "org/name" }}`')
                return None
            elif name in self.blocks["model"]:
                return None  # its own block reported the problem
            else:
                self.ctx.error("E105", f"unknown model `{name}`", node.value.span,
                               did_you_mean(name, self.blocks["model"]) or f'declare `model {name} {{ ref = "org/name" }}` or write the reference as a string')
                return None
        else:
            self.ctx.error("E201", f"`{key}`: expected a model name or reference string, found {v.describe(node.value)}", node.value.span)
            return None
        overrides = self.model_overrides(reader)
        return base.model_copy(update=overrides) if overrides else base

    def model_overrides(self, reader: Reader) -> dict[str, Any]:
        overrides: dict[str, Any] = {}
        if reader.has("engine"):
            overrides["engine"] = reader.get("engine", _enum(ir.ENGINES, "engine"))
        if reader.has("trust_remote_code"):
            overrides["trust_remote_code"] = reader.get("trust_remote_code", v.boolean)
        if reader.has("revision"):
            overrides["revision"] = reader.get("revision", v.string)
        if reader.has("dtype"):
            overrides["dtype"] = reader.get("dtype", _enum(("bfloat16", "float16", "float32"), "dtype"))
        if reader.has("endpoint"):
            overrides["endpoint"] = reader.get("endpoint", v.string)
        if reader.has("api_key_env"):
            name = reader.get("api_key_env", v.string)
            if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                self.ctx.error("E201", "`api_key_env` names an environment variable, such as \"OPENAI_API_KEY\"",
                               reader.value_span("api_key_env"), "the key itself never goes into a recipe")
                name = None
            overrides["api_key_env"] = name
        return {k: val for k, val in overrides.items() if val is not None}

    def prompt_value(self, reader: Reader, key: str, name: str) -> ir.Prompt | None:
        """A prompt given by name, inline text or `file("...")`."""
        node = reader.node(key)
        if node is None:
            return None
        value = node.value
        if isinstance(value, ast.Name):
            if value.name not in self.prompts:
                if value.name not in self.blocks["prompt"]:
                    self.ctx.error("E105", f"unknown prompt `{value.name}`", value.span, did_you_mean(value.name, self.blocks["prompt"]))
                return None
            return self.prompts[value.name]
        if isinstance(value, ast.String):
            return ir.Prompt(name=name, text=value.value)
        if isinstance(value, ast.Call) and value.name == "file":
            included = self.file_call(value)
            return ir.Prompt(name=name, text=included[1], file=included[0]) if included else None
        self.ctx.error("E201", f"`{key}`: expected a prompt name, a string or file(\"...\"), found {v.describe(value)}", value.span)
        return None

    def file_call(self, value: ast.Call) -> tuple[str, str] | None:
        if len(value.args) != 1 or not isinstance(value.args[0], ast.String):
            self.ctx.error("E201", "file(...) takes one path string", value.span, 'write `file("prompts/question.txt")`')
            return None
        return self.read_file(value.args[0].value, value.args[0].span)

    # ---- the recipe ---------------------------------------------------------------------------

    def index(self) -> ast.Block | None:
        header = None
        for item in self.document.items:
            if not isinstance(item, ast.Block):
                span = item.span
                if isinstance(item, ast.Removal):
                    self.ctx.error("E403", f"nothing named `{'.'.join(item.path)}` to remove", span,
                                   "`remove` drops a part inherited through `extends`")
                else:
                    self.ctx.error("E101", "only blocks may appear at the top level", span,
                                   "put settings inside a block, e.g. `recipe \"name\" { seed = 42 }`")
                continue
            if item.kind not in BLOCK_KINDS:
                self.ctx.error("E101", f"unknown block kind `{item.kind}`", item.kind_span, did_you_mean(item.kind, BLOCK_KINDS))
                continue
            if item.kind == "recipe":
                if header is not None:
                    self.ctx.error("E103", "a recipe has one `recipe` header", item.kind_span, f"the first is at line {header.span.line}")
                    continue
                header = item
                if len(item.labels) != 1:
                    self.ctx.error("E106", "the `recipe` header needs exactly one name", item.kind_span, 'write `recipe "my-recipe" { ... }`')
                continue
            if len(item.labels) != 1:
                span = item.label_spans[1] if len(item.labels) > 1 else item.kind_span
                self.ctx.error("E106", f"a `{item.kind}` block needs exactly one name", span, f"write `{item.kind} my_name {{ ... }}`")
                continue
            name = item.labels[0]
            if name in RESERVED and not (item.quoted and item.quoted[0]):
                self.ctx.error("E107", f"`{name}` is a reserved word and cannot name a {item.kind}", item.label_spans[0],
                               f"choose another name, e.g. `{name}_{item.kind}`")
                continue
            table = self.blocks[item.kind]
            if name in table:
                self.ctx.error("E103", f"duplicate {item.kind} `{name}`", item.label_spans[0], f"`{name}` is first declared at line {table[name].span.line}")
                continue
            shared = ("source", "synthesize", "pool")  # one namespace: mixtures name any of them
            clash = next((k for k in shared if k != item.kind and name in self.blocks[k]), None) if item.kind in shared else None
            if clash:
                self.ctx.error("E103", f"`{name}` is already a {clash}", item.label_spans[0], "sources, synthesized sets and pools share one namespace")
                continue
            table[name] = item
        if header is None:
            self.ctx.error("E106", "the recipe has no `recipe` header", Span(self.document.path, 1, 1, 1, 2),
                           'start the file with `recipe "my-recipe" { seed = 42 }`')
        return header

    def lower(self) -> ir.Recipe | None:
        header = self.index()
        recipe: dict[str, Any] = {"name": header.labels[0] if header and header.labels else "recipe"}
        if header is not None:
            r = Reader(self.ctx, header, keys={"description", "seed", "version", "extends"}, blocks={"export"},
                       what="the recipe header")
            recipe["description"] = r.get("description", v.string, None)
            recipe["version"] = r.get("version", v.string, None)
            recipe["seed"] = r.get("seed", lambda x: v.integer(x, minimum=0, maximum=2**63 - 1), 0)
            if r.has("extends"):
                recipe["base"] = Path(r.get("extends", v.string, "")).stem
            export = self.export(r)
            if export is not None:
                recipe["export"] = export
        for name, block in self.blocks["model"].items():
            self.model(name, block)
        for name, block in self.blocks["prompt"].items():
            self.prompt(name, block)
        taxonomies = {n: t for n, b in self.blocks["taxonomy"].items() if (t := self.taxonomy(n, b))}
        sources = {n: s for n, b in self.blocks["source"].items() if (s := self.source(n, b))}
        syntheses_names = dict(self.blocks["synthesize"])
        datasets = {**self.blocks["source"], **syntheses_names}
        image_taggers = {n: t for n, b in self.blocks["image_tagger"].items() if (t := self.image_tagger(n, b, datasets))}
        instruction_taggers = {n: t for n, b in self.blocks["instruction_tagger"].items() if (t := self.instruction_tagger(n, b, datasets))}
        mappings = {n: m for n, b in self.blocks["mapping"].items() if (m := self.mapping(n, b))}
        syntheses = {n: s for n, b in syntheses_names.items() if (s := self.synthesis(n, b))}
        for name, syn in syntheses.items():
            # synthetic records point at their seeds' images, relative to one image folder
            folders = sorted({str(sources[s].images) for s in syn.from_sources if s in sources})
            if len(folders) > 1:
                self.ctx.error("E204", f"the seed sources of synthesize `{name}` keep their images in different folders "
                               f"({', '.join(folders)})", syntheses_names[name].label_spans[0],
                               "synthesize from sources that share one `images` folder, or write one synthesis per folder")
        filters = tuple(f for n, b in self.blocks["filter"].items() if (f := self.filter(n, b, datasets)))
        pools = {n: p for n, b in self.blocks["pool"].items() if (p := self.pool(n, b, datasets, sources))}
        stages = self.stages({**sources, **syntheses}, pools)
        if not self.ctx.failed:
            self.check_fields(sources, syntheses, filters)
        if self.ctx.failed:
            return None
        return ir.Recipe(
            **recipe, models=self.architectures, model_refs=self.model_refs, sources=sources,
            taxonomies=taxonomies, prompts=self.prompts, image_taggers=image_taggers,
            instruction_taggers=instruction_taggers, mappings=mappings, syntheses=syntheses,
            filters=filters, pools=pools, stages=stages,
        )

    def export(self, header: Reader) -> ir.Export | None:
        """`export { formats = [llava, hf_dataset]  images = copy  embed_images = true }` in the header."""
        nested = header.nested("export")
        if not nested:
            return None
        for extra in nested[1:]:
            self.ctx.error("E104", "`export` is set twice in the recipe header", extra.kind_span,
                           f"first set at line {nested[0].span.line}")
        r = Reader(self.ctx, nested[0], keys={"formats", "images", "embed_images"}, what="`export`")
        formats: tuple[str, ...] = ir.Export().formats
        node = r.node("formats")
        if node is not None:
            try:
                pairs = v.names(node.value)
            except v.ValueProblem as problem:
                self.ctx.error(problem.code, f"`formats`: {problem.message}", node.value.span, problem.hint)
                return None
            for name, name_node in pairs:
                if name not in ir.EXPORT_FORMATS:
                    self.ctx.error("E203", f"unknown export format `{name}`", name_node.span,
                                   did_you_mean(name, ir.EXPORT_FORMATS) or f"use {', '.join(ir.EXPORT_FORMATS)}")
                    return None
            if not pairs:
                self.ctx.error("E202", "`formats` is empty", node.value.span, "write e.g. `formats = [llava]`")
                return None
            formats = tuple(dict.fromkeys(name for name, _ in pairs))
        images = r.get("images", _enum(ir.IMAGE_MODES, "image mode"), "link")
        embed = r.get("embed_images", v.boolean, False)
        if images is None or embed is None:
            return None
        if embed and not {"hf_dataset", "parquet"} & set(formats):
            self.ctx.warning("W601", "`embed_images` applies to the hf_dataset and parquet formats, which `formats` "
                             "does not name", r.key_span("embed_images"), "add `hf_dataset` or `parquet` to `formats`")
        return ir.Export(formats=formats, images=images, embed_images=embed)

    # ---- blocks -------------------------------------------------------------------------------

    def model(self, name: str, block: ast.Block) -> None:
        keys = {"architecture", "vision", "language", "projector", "vision_layer", "tie_word_embeddings", "ref"} | MODEL_USE_KEYS
        r = Reader(self.ctx, block, keys=keys, what=f"model `{name}`")
        overrides = self.model_overrides(r)
        if not r.has("architecture"):
            ref = r.get("ref", v.string)
            for key in ("vision", "language", "projector", "vision_layer", "tie_word_embeddings"):
                if r.has(key):
                    self.ctx.error("E102", f"`{key}` applies to a model with an `architecture`", r.key_span(key),
                                   "add `architecture = llava_onevision`, or remove the key")
            if ref:
                self.model_refs[name] = ir.ModelUse(ref=ref, **overrides)
            return
        r.get("architecture", _enum(("llava_onevision",), "architecture"))
        if r.has("ref"):
            self.ctx.error("E102", "a model with an `architecture` is built from `vision` and `language`, not `ref`", r.key_span("ref"))
        vision = r.get("vision", v.string)
        language = r.get("language", v.string)
        projector = r.get("projector", _projector, "mlp2x_gelu")
        vision_layer = r.get("vision_layer", lambda x: v.integer(x, minimum=-64, maximum=64), -1)
        tie = r.get("tie_word_embeddings", v.boolean, None)
        if not (vision and language and projector) or vision_layer is None:
            return
        from recipec.models import configs  # no torch: plain JSON configs and arithmetic

        origin: dict[str, str] = {}
        resolved = {}
        for tower, ref, key in (("vision", vision, "vision"), ("language", language, "language")):
            try:
                found = configs.resolve_config(ref, revision=overrides.get("revision"), base_dir=self.root)
            except configs.ModelConfigError as error:
                shipped = [*configs.shipped_refs(), *(f"{configs.TINY_SCHEME}{n}" for n in sorted(configs._TINY))]
                close = did_you_mean(ref, shipped)
                self.ctx.error("E501", f"cannot resolve the {tower} tower `{ref}`: {error}", r.value_span(key),
                               (f"{close} Otherwise use" if close else "Use") + " a local directory with a "
                               "config.json, a model in the local Hugging Face cache, or one recipec ships: "
                               + ", ".join(shipped) + " (docs/language.md)")
                continue
            origin[tower] = found.origin
            resolved[tower] = found.config
            tower_config = (configs.vision_tower_config if tower == "vision" else configs.language_tower_config)(found.config)
            wrong = towers.problems(tower_config, towers.VISION_SIZES if tower == "vision" else towers.LANGUAGE_SIZES)
            for problem in wrong:
                self.ctx.error("E502", f"the {tower} tower's config `{printable(found.location)}`: {problem}",
                               r.value_span(key), "fix the config.json, or name another model")
            if wrong:
                del resolved[tower]
        if len(resolved) != 2:
            return
        try:
            vision_cfg = configs.vision_tower_config(resolved["vision"])
            geometry = configs.vision_geometry(vision_cfg)
            counts = configs.count_params(vision_cfg, resolved["language"], projector=projector,
                                         vision_feature_layer=vision_layer, tie_word_embeddings=tie)
        except (configs.ModelConfigError, TypeError, ValueError, KeyError, ArithmeticError) as error:
            # what the checks above do not know of still becomes a located error, never a traceback
            self.ctx.error("E501", f"model `{name}`: {printable(str(error))}", block.kind_span)
            return
        self.architectures[name] = ir.Architecture(
            name=name, vision=ir.ModelUse(ref=vision, **overrides), language=ir.ModelUse(ref=language, **overrides),
            projector=projector, vision_layer=vision_layer, tie_word_embeddings=tie,
            image_size=geometry.image_size, patch_size=geometry.patch_size, tokens_per_tile=geometry.tokens_per_tile,
            params=ir.ParamCounts(**counts), config_origin=origin,
        )

    def prompt(self, name: str, block: ast.Block) -> None:
        r = Reader(self.ctx, block, keys={"text", "file"}, what=f"prompt `{name}`")
        if r.has("text") == r.has("file"):
            self.ctx.error("E106", f"prompt `{name}` needs either `text` or `file`", block.kind_span)
            return
        if r.has("text"):
            text = r.get("text", v.string)
            if text is not None:
                self.prompts[name] = ir.Prompt(name=name, text=text)
            return
        path = r.get("file", v.string)
        if path is not None and (included := self.read_file(path, r.value_span("file"))):
            self.prompts[name] = ir.Prompt(name=name, text=included[1], file=included[0])

    def taxonomy(self, name: str, block: ast.Block) -> ir.Taxonomy | None:
        r = Reader(self.ctx, block, keys={"file"}, what=f"taxonomy `{name}`")
        node = r.node("file")
        path = None
        if node is not None and isinstance(node.value, ast.Call) and node.value.name == "file":
            included = self.file_call(node.value)
        else:
            path = r.get("file", v.string)
            included = self.read_file(path, r.value_span("file")) if path is not None else None
        if not included:
            return None
        relative, text = included
        span = r.value_span("file")
        try:
            _plain_yaml(text)
            data = yaml.load(text, Loader=_YAML_LOADER)
            if not isinstance(data, dict) or not isinstance(data.get("tree"), list):
                raise ValueError("its top level must be a mapping whose `tree` is a list of nodes")
            tree = tuple(_taxonomy_node(n) for n in data["tree"])
            levels = tuple(str(x) for x in data.get("levels", ()))
        except (yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as error:
            self.ctx.error("E402", f"`{printable(relative)}` is not a taxonomy: {_yaml_problem(error)}", span,
                           "a taxonomy file has `tree:` with nodes of `name` and `children`")
            return None
        return ir.Taxonomy(name=name, file=relative, sha256=hashlib.sha256(text.encode()).hexdigest(),
                           levels=levels, tree=tree, leaves=sum(_leaves(n) for n in tree))

    def source(self, name: str, block: ast.Block) -> ir.Source | None:
        keys = {"format", "path", "images", "category", "type", "expect", "license", "revision", "max_pixels", "scores"}
        r = Reader(self.ctx, block, keys=keys, blocks={"columns"}, what=f"source `{name}`")
        fmt = r.get("format", _enum(ir.FORMATS, "format"))
        paths = r.get("path", v.strings)
        if paths is not None:
            paths = [self.path_of(p, r.value_span("path")) for p in paths]
        images = r.get("images", v.string, None)
        if images is not None:
            images = self.path_of(images, r.value_span("images"))
        columns: dict[str, str] = {}
        for nested in r.nested("columns"):
            c = Reader(self.ctx, nested, keys={"id", "image", "images", "conversations", "data_type", "category", "text"},
                       what=f"`columns` of source `{name}`")
            for key in c.attributes:
                value = c.get(key, v.string)
                if value is not None:
                    columns[key] = value
        fields = dict(
            name=name, format=fmt, paths=tuple(paths or ()), images=images,
            category=r.get("category", _enum(ir.CATEGORIES, "category"), "other"),
            data_type=r.get("type", _enum((*ir.DATA_TYPES, "mixed"), "data type"), "general"),
            expect=r.get("expect", v.count, None), license=r.get("license", v.string, None),
            revision=r.get("revision", v.string, None),
            max_pixels=r.get("max_pixels", lambda x: v.count(x), 89_478_485), columns=columns,
            scores=tuple(dict.fromkeys(n for n, _ in (r.get("scores", v.names, []) or []))),
        )
        if fmt is None or paths is None or None in (fields["category"], fields["data_type"], fields["max_pixels"]):
            return None
        return ir.Source(**fields)

    def image_tagger(self, name: str, block: ast.Block, datasets: dict) -> ir.ImageTagger | None:
        r = Reader(self.ctx, block, keys={"model", "on", "threshold", "max_tags", "vocabulary"} | MODEL_USE_KEYS,
                   what=f"image_tagger `{name}`")
        model = self.model_use(r)
        on = self.ref_names(r, "on", datasets, "source")
        threshold = r.get("threshold", lambda x: v.real(x, minimum=0.0, maximum=1.0), 0.68)
        max_tags = r.get("max_tags", lambda x: v.integer(x, minimum=1, maximum=1000), 20)
        vocabulary = r.get("vocabulary", v.string, None)
        included = self.read_file(vocabulary, r.value_span("vocabulary")) if vocabulary else None
        if model is None or threshold is None or max_tags is None or (vocabulary and included is None):
            return None
        tags: tuple[str, ...] = ()
        if included is not None:
            # one tag per line; blank lines and `#` comments skipped; the first spelling of a tag wins
            lines = (line.split("#", 1)[0].strip() for line in included[1].splitlines())
            tags = tuple(dict.fromkeys(line for line in lines if line))
            if not tags:
                self.ctx.error("E202", f"the tag vocabulary `{printable(vocabulary)}` holds no tag", r.value_span("vocabulary"),
                               "write one tag per line (objects, scenes, actions)")
                return None
        return ir.ImageTagger(name=name, model=model, on=on, threshold=threshold, max_tags=max_tags,
                              vocabulary=included[0] if included else None, tags=tags)

    def instruction_tagger(self, name: str, block: ast.Block, datasets: dict) -> ir.InstructionTagger | None:
        r = Reader(self.ctx, block, keys={"model", "on", "taxonomy", "prompt", "max_tags"} | MODEL_USE_KEYS,
                   what=f"instruction_tagger `{name}`")
        model = self.model_use(r)
        on = self.ref_names(r, "on", datasets, "source")
        taxonomy = self.ref_name(r, "taxonomy", self.blocks["taxonomy"], "taxonomy")
        prompt = self.prompt_value(r, "prompt", f"{name}.prompt")
        max_tags = r.get("max_tags", lambda x: v.integer(x, minimum=1, maximum=100), 3)
        if model is None or taxonomy is None or max_tags is None:
            return None
        return ir.InstructionTagger(name=name, model=model, taxonomy=taxonomy, on=on, prompt=prompt, max_tags=max_tags)

    def mapping(self, name: str, block: ast.Block) -> ir.Mapping | None:
        keys = {"method", "image_tags", "instruction_tags", "min_count", "top_k", "smooth_idf", "sublinear_tf", "min_score"}
        r = Reader(self.ctx, block, keys=keys, what=f"mapping `{name}`")
        fields = dict(
            method=r.get("method", _enum(("tfidf",), "mapping method"), "tfidf"),
            image_tags=self.ref_name(r, "image_tags", self.blocks["image_tagger"], "image tagger"),
            instruction_tags=self.ref_name(r, "instruction_tags", self.blocks["instruction_tagger"], "instruction tagger"),
            min_count=r.get("min_count", lambda x: v.integer(x, minimum=1), 1),
            top_k=r.get("top_k", lambda x: v.integer(x, minimum=1, maximum=199), 3),
            smooth_idf=r.get("smooth_idf", v.boolean, True),
            sublinear_tf=r.get("sublinear_tf", v.boolean, False),
            min_score=r.get("min_score", lambda x: v.real(x, minimum=0.0), 0.0),
        )
        if None in fields.values():
            return None
        return ir.Mapping(name=name, **fields)

    def condition(self, rule: ast.Rule, owner: str, *, model_fields: bool = True) -> ir.Condition | None:
        body = Reader(self.ctx, None, keys={"model", "prompt"} | MODEL_USE_KEYS, items=rule.body or (),
                      what=f"the `{rule.verb} {rule.field}` rule of {owner}", span=rule.field_span)
        try:
            if rule.op in ("top", "bottom"):
                value = v.fraction(rule.value)
            else:
                value = v.real(rule.value)
        except v.ValueProblem as problem:
            self.ctx.error(problem.code, f"`{rule.verb} {rule.field}`: {problem.message}", rule.value.span, problem.hint)
            return None
        model = self.model_use(body, default=None) if rule.body else None
        prompt = self.prompt_value(body, "prompt", f"{owner}.{rule.field}") if rule.body else None
        if rule.body and body.has("model") and model is None:
            return None  # reported: a rule that lost its model would test a field nothing computes
        condition = ir.Condition(verb=rule.verb, field=rule.field, op=rule.op, value=value, model=model, prompt=prompt)
        self.rule_spans[id(condition)] = rule.field_span
        return condition

    def check_fields(self, sources: dict[str, ir.Source], syntheses: dict[str, ir.Synthesis],
                     filters: tuple[ir.Filter, ...]) -> None:
        """Each keep/drop rule tests a field its records have: one their source declares (`scores`), one
        the synthesis computes (`relevance`, `score`), or one a model rule computes on them before it."""
        have: dict[str, set[str]] = {name: set(src.scores) for name, src in sources.items()}
        for name, syn in syntheses.items():
            have[name] = set()
            for condition in syn.rules:
                if condition.model is None and condition.field not in SYNTHESIS_FIELDS:
                    self.unknown_field(condition, [name], f"synthesize `{name}` computes only "
                                       + " and ".join(f"`{f}`" for f in sorted(SYNTHESIS_FIELDS)))
                have[name].add(condition.field)
        for flt in filters:
            for op in flt.ops:
                condition = getattr(op, "condition", None)
                if condition is None:
                    continue
                if condition.model is None:
                    lacking = [d for d in flt.on if condition.field not in have.get(d, set())]
                    if lacking:
                        self.unknown_field(condition, lacking, None)
                for d in flt.on:
                    have.setdefault(d, set()).add(condition.field)

    def unknown_field(self, condition: ir.Condition, lacking: list[str], why: str | None) -> None:
        field = condition.field
        shown = ", ".join(f"`{d}`" for d in lacking[:3]) + (f" and {len(lacking) - 3} more" if len(lacking) > 3 else "")
        message = why or f"no step computes `{field}` and {shown} {'does' if len(lacking) == 1 else 'do'} not declare it"
        hint = (f"compute it with a model (`{condition.verb} {field} ... {{ model = \"org/name\" }}`)"
                + ("" if why else f", or declare it on the source: `scores = [{field}]`"))
        self.ctx.error("E108", f"`{condition.verb} {field}`: {message}", self.rule_spans.get(id(condition)), hint)

    def synthesis(self, name: str, block: ast.Block) -> ir.Synthesis | None:
        keys = {"from", "mapping", "model", "images", "few_shot", "questions_per_image", "styles", "merge",
                "max_new_tokens", "temperature", "category", "type", "expect"} | MODEL_USE_KEYS
        r = Reader(self.ctx, block, keys=keys, blocks={"prompts"}, rules=True, what=f"synthesize `{name}`")
        from_sources = self.ref_names(r, "from", self.blocks["source"], "source")
        prompts: dict[str, ir.Prompt] = {}
        roles = {"question", "relevance", "answer_short", "answer_brief_reason", "answer_detailed_reason", "score"}
        for nested in r.nested("prompts"):
            p = Reader(self.ctx, nested, keys=roles, what=f"the prompts of synthesize `{name}`")
            for role in p.attributes:
                prompt = self.prompt_value(p, role, f"{name}.{role}")
                if prompt is not None:
                    prompts[role] = prompt
        rules = tuple(c for rule in r.rules if (c := self.condition(rule, f"synthesize `{name}`")))
        styles_node = r.node("styles")
        styles = ir.ANSWER_STYLES
        if styles_node is not None:
            try:
                styles = tuple(s for s, node in v.names(styles_node.value))
                for s, node in v.names(styles_node.value):
                    if s not in ir.ANSWER_STYLES:
                        self.ctx.error("E203", f"unknown answer style `{s}`", node.span, did_you_mean(s, ir.ANSWER_STYLES))
            except v.ValueProblem as problem:
                self.ctx.error(problem.code, f"`styles`: {problem.message}", styles_node.value.span, problem.hint)
        fields = dict(
            name=name, from_sources=from_sources,
            mapping=self.ref_name(r, "mapping", self.blocks["mapping"], "mapping", None),
            model=self.model_use(r), images=r.get("images", v.count, None),
            few_shot=r.get("few_shot", lambda x: v.integer(x, minimum=0, maximum=16), 2),
            questions_per_image=r.get("questions_per_image", lambda x: v.integer(x, minimum=1, maximum=64), 3),
            styles=styles, prompts=prompts, rules=rules,
            merge=r.get("merge", _enum(("per_image", "none"), "merge mode"), "per_image"),
            max_new_tokens=r.get("max_new_tokens", lambda x: v.integer(x, minimum=1, maximum=65536), 512),
            temperature=r.get("temperature", lambda x: v.real(x, minimum=0.0, maximum=5.0), 0.7),
            category=r.get("category", _enum(ir.CATEGORIES, "category"), "synthetic"),
            data_type=r.get("type", _enum((*ir.DATA_TYPES, "mixed"), "data type"), "synthetic"),
            expect=r.get("expect", v.count, None),
        )
        if any(fields[k] is None for k in ("model", "few_shot", "questions_per_image", "merge", "max_new_tokens",
                                           "temperature", "category", "data_type")):
            return None
        return ir.Synthesis(**fields)

    def filter(self, name: str, block: ast.Block, datasets: dict) -> ir.Filter | None:
        r = Reader(self.ctx, block, keys={"on"}, blocks={"dedup", "clean"}, rules=True, what=f"filter `{name}`")
        on = self.ref_names(r, "on", datasets, "source", default=tuple(datasets))
        ops: list = []
        # the order written is the order applied: walk the block's items, not the reader's groups
        for item in block.items:
            if isinstance(item, ast.Block) and item.kind == "dedup":
                ops.append(self.dedup(name, item, datasets))
            elif isinstance(item, ast.Block) and item.kind == "clean":
                c = Reader(self.ctx, item, keys=set(CLEAN_RULES), what=f"`clean` of filter `{name}`")
                rules = {}
                for key, kind in CLEAN_RULES.items():
                    if c.has(key):
                        convert = {"int": lambda x: v.integer(x, minimum=0), "real": lambda x: v.real(x, minimum=1.0),
                                   "bool": v.boolean}[kind]
                        rules[key] = c.get(key, convert)
                ops.append(ir.Clean(rules=rules))
            elif isinstance(item, ast.Rule):
                condition = self.condition(item, f"filter `{name}`")
                if condition is not None:
                    ops.append(ir.Percentile(condition=condition) if condition.op in ("top", "bottom") else ir.Threshold(condition=condition))
        if any(op is None for op in ops):
            return None
        return ir.Filter(name=name, on=on, ops=tuple(ops))

    def dedup(self, owner: str, block: ast.Block, datasets: dict | None = None):
        method = block.name
        if method == "exact":
            r = Reader(self.ctx, block, keys={"by", "prefer_sources"}, what=f"`dedup exact` of filter `{owner}`")
            by = ("image", "text")
            if r.has("by"):
                try:
                    by = tuple(n for n, _ in v.names(r.node("by").value))
                except v.ValueProblem as problem:
                    self.ctx.error(problem.code, f"`by`: {problem.message}", r.value_span("by"))
                for n in by:
                    if n not in ("image", "text"):
                        self.ctx.error("E203", f"dedup can compare `image` and `text`, not `{n}`", r.value_span("by"))
            prefer = self.ref_names(r, "prefer_sources", datasets or {}, "source", default=())
            return ir.DedupExact(by=by, prefer_sources=prefer)
        if method == "phash":
            # `prefer` picks the copy kept from each group of near-duplicates (IR: `keep`)
            r = Reader(self.ctx, block, keys={"max_distance", "prefer", "prefer_sources"},
                       what=f"`dedup phash` of filter `{owner}`")
            distance = r.get("max_distance", lambda x: v.integer(x, minimum=0, maximum=32), 4)
            keep = r.get("prefer", _enum(("best", "largest", "first"), "preference"), "best")
            prefer = self.ref_names(r, "prefer_sources", datasets or {}, "source", default=())
            if distance is None or keep is None:
                return None
            return ir.DedupPhash(max_distance=distance, keep=keep, prefer_sources=prefer)
        span = block.label_spans[0] if block.label_spans else block.kind_span
        self.ctx.error("E203", f"unknown dedup method `{method or ''}`", span, did_you_mean(method or "", ("exact", "phash")) or "use `dedup exact` or `dedup phash`")
        return None

    def pool(self, name: str, block: ast.Block, datasets: dict, sources: dict[str, ir.Source]) -> ir.Pool | None:
        r = Reader(self.ctx, block, keys={"sources", "category"}, what=f"pool `{name}`")
        members: tuple[str, ...] = ()
        if r.has("sources"):
            members = self.ref_names(r, "sources", datasets, "source")
        if r.has("category"):
            category = r.get("category", _enum(ir.CATEGORIES, "category"))
            members += tuple(s for s, src in sources.items() if src.category == category and s not in members)
            members += tuple(s for s, b in self.blocks["synthesize"].items() if category == "synthetic" and s not in members)
        if not members:
            self.ctx.error("E106", f"pool `{name}` has no sources", block.kind_span, "add `sources = [...]` or `category = ...`")
            return None
        return ir.Pool(name=name, sources=members)

    # ---- stages -------------------------------------------------------------------------------

    def stages(self, datasets: dict[str, ir.Source | ir.Synthesis], pools: dict[str, ir.Pool]) -> tuple[ir.Stage, ...]:
        result: list[ir.Stage] = []
        parts_taken: dict[str, dict[int, tuple[str, Span]]] = {}
        parts_n: dict[str, tuple[int, str, Span]] = {}
        previous: str | None = None
        for name, block in self.blocks["stage"].items():
            stage = self.stage(name, block, datasets, pools, previous, parts_taken, parts_n)
            if stage is not None:
                result.append(stage)
            previous = name
        self.check_order(result)
        return tuple(result)

    def check_order(self, stages: list[ir.Stage]) -> None:
        """`after` links stages into chains of checkpoints: a cycle would start no stage at all."""
        after = {s.name: s.after for s in stages}
        reported: set[str] = set()
        for start in after:
            seen: list[str] = []
            current: str | None = start
            while current is not None and current not in seen and current not in reported:
                seen.append(current)
                current = after.get(current)
            if current is not None and current in seen:
                cycle = seen[seen.index(current):]
                reported.update(cycle)
                written = [(n, next((i for i in self.blocks["stage"][n].items if isinstance(i, ast.Attribute)
                                     and i.key == "after"), None)) for n in cycle]
                name, node = next(((n, i) for n, i in written if i is not None), written[0])
                block = self.blocks["stage"][name]
                path = " -> ".join([*cycle, cycle[0]])
                self.ctx.error("E306", f"stages wait for each other in a cycle: {path}",
                               node.value.span if node else block.kind_span,
                               "one stage of the cycle must start from the one before it or from the base model")
            reported.update(seen)

    def stage(self, name, block, datasets, pools, previous, parts_taken, parts_n) -> ir.Stage | None:
        keys = {"model", "train", "image_size", "grid", "max_tiles", "image_token_budget", "lr", "vision_lr",
                "projector_lr", "language_lr", "batch", "micro_batch", "epochs", "warmup", "schedule",
                "weight_decay", "max_length", "samples", "balance", "order", "after", "gradient_checkpointing",
                "checkpoint_every", "grad_clip"}
        r = Reader(self.ctx, block, keys=keys, blocks={"mix", "balance"}, what=f"stage `{name}`")
        model_name = self.stage_model(r, name, block)
        architecture = self.architectures.get(model_name) if model_name else None
        train = self.train_parts(r)
        grid = r.get("grid", v.dims, (1, 1))
        max_tiles = r.get("max_tiles", lambda x: v.integer(x, minimum=1, maximum=1024), None)
        budget = r.get("image_token_budget", v.token_budget, None)
        image_size = r.get("image_size", lambda x: v.integer(x, minimum=14, maximum=8192), architecture.image_size if architecture else 384)
        lr = r.get("lr", lambda x: v.real(x, minimum=0.0, maximum=10.0, exclusive_minimum=True), 1e-5)
        part_lr = {}
        for part in ir.TRAINABLE_PARTS:
            if r.has(f"{part}_lr"):
                part_lr[part] = r.get(f"{part}_lr", lambda x: v.real(x, minimum=0.0, maximum=10.0))
        if isinstance(getattr(r.node("after"), "value", None), ast.Name) and r.node("after").value.name == name:
            self.ctx.error("E306", f"stage `{name}` cannot come after itself", r.value_span("after"),
                           f"name the stage whose checkpoint `{name}` starts from")
            after = None
        else:
            after = self.ref_name(r, "after", {k: 1 for k in self.blocks["stage"] if k != name}, "stage", previous)
        samples = r.get("samples", v.count, None)
        order = r.get("order", _order, ir.Order())
        balance = self.balance(r)
        fields = dict(
            batch=r.get("batch", lambda x: v.integer(x, minimum=1), 512),
            micro_batch=r.get("micro_batch", lambda x: v.integer(x, minimum=1), None),
            epochs=r.get("epochs", lambda x: v.real(x, minimum=0.0, exclusive_minimum=True), 1.0),
            warmup=r.get("warmup", v.fraction, 0.03),
            schedule=r.get("schedule", _enum(("cosine", "linear", "constant"), "schedule"), "cosine"),
            weight_decay=r.get("weight_decay", lambda x: v.real(x, minimum=0.0), 0.0),
            max_length=r.get("max_length", lambda x: v.integer(x, minimum=16), 8192),
            gradient_checkpointing=r.get("gradient_checkpointing", v.boolean, False),
            checkpoint_every=r.get("checkpoint_every", lambda x: v.integer(x, minimum=0), 500),  # steps; 0: none
            grad_clip=r.get("grad_clip", lambda x: v.real(x, minimum=0.0), 1.0),  # 0: no clipping
        )
        mixes = r.nested("mix")
        if not mixes:
            self.ctx.error("E106", f"stage `{name}` has no `mix`", block.kind_span, "add `mix { source = all }`")
            return None
        if len(mixes) > 1:
            self.ctx.error("E104", f"stage `{name}` has two `mix` blocks", mixes[1].kind_span)
        entries = self.mix(name, mixes[0], datasets, pools, parts_taken, parts_n)

        tokens = None
        if architecture is not None and grid is not None and image_size is not None:
            from recipec.models import configs

            per_tile = (image_size // architecture.patch_size) ** 2
            tokens = configs.max_image_tokens(per_tile, grid, max_tiles)
            if budget is not None and tokens > budget:
                tiles = min(grid[0] * grid[1], max_tiles or grid[0] * grid[1])
                fit = budget // per_tile - 1
                self.ctx.error("E304", f"grid {grid[0]}x{grid[1]} with up to {tiles} tiles gives {tokens:,} image tokens, "
                               f"over the stage's budget of {budget:,}", r.value_span("grid"),
                               f"set `max_tiles = {max(fit, 1)}` or a smaller grid" if fit >= 1 else "raise `image_token_budget`")
        grid_written = r.node("grid") is None or isinstance(r.node("grid").value, ast.Dims)  # not a default after an error
        if max_tiles is not None and grid is not None and grid == (1, 1) and grid_written:
            self.ctx.warning("W301", "`max_tiles` has no effect with a 1x1 grid", r.key_span("max_tiles"))
        elif max_tiles is not None and grid is not None and max_tiles > grid[0] * grid[1] and grid_written:
            self.ctx.warning("W302", f"`max_tiles = {max_tiles}` is never reached: a {grid[0]}x{grid[1]} grid has "
                             f"{grid[0] * grid[1]} tiles", r.value_span("max_tiles"),
                             f"set `max_tiles = {grid[0] * grid[1]}`, or a grid with more tiles")
        if tokens is not None and fields["max_length"] is not None and tokens >= fields["max_length"] \
                and not (budget is not None and tokens > budget):  # one report for one grid
            self.ctx.error("E305", f"up to {tokens:,} image tokens per sample leave no room in `max_length = "
                           f"{fields['max_length']:,}`", r.value_span("grid") if r.has("grid") else block.kind_span,
                           f"raise `max_length` above {tokens:,}, or lower `grid` or `max_tiles`")
        required = {k: val for k, val in fields.items() if k != "micro_batch"}
        if entries is None or architecture is None or None in required.values() or None in part_lr.values():
            return None
        composition = self.composition(name, r, entries, datasets, pools, samples, balance)
        if None in (tokens, lr, train, grid, order) or composition is None:
            return None
        params = architecture.params
        trainable = params.trainable(train)
        return ir.Stage(
            name=name, model=model_name, train=train, image_size=image_size, grid=grid, max_tiles=max_tiles,
            image_token_budget=budget, lr=lr, part_lr=part_lr, samples=samples, balance=balance, order=order,
            mix=entries, after=after, max_image_tokens=tokens, trainable_params=trainable,
            total_params=params.total, composition=composition, **fields,
        )

    def stage_model(self, r: Reader, name: str, block: ast.Block) -> str | None:
        if r.has("model"):
            return self.ref_name(r, "model", self.blocks["model"], "model")
        trained = [n for n, b in self.blocks["model"].items() if any(isinstance(i, ast.Attribute) and i.key == "architecture" for i in b.items)]
        if len(trained) == 1:
            return trained[0]
        if not trained:
            self.ctx.error("E106", f"stage `{name}` trains no model", block.kind_span,
                           "declare `model my_vlm { architecture = llava_onevision ... }`")
        else:
            self.ctx.error("E106", f"stage `{name}` must say which model it trains", block.kind_span,
                           f"add `model = {trained[0]}`")
        return None

    def train_parts(self, r: Reader) -> tuple[str, ...] | None:
        node = r.node("train")
        if node is None:
            return ir.TRAINABLE_PARTS
        if isinstance(node.value, ast.Name) and node.value.name == "all":
            return ir.TRAINABLE_PARTS
        try:
            pairs = v.names(node.value)
        except v.ValueProblem as problem:
            self.ctx.error(problem.code, f"`train`: {problem.message}", node.value.span)
            return None
        parts = []
        for part, part_node in pairs:
            if part not in ir.TRAINABLE_PARTS:
                self.ctx.error("E203", f"unknown model part `{part}`", part_node.span, did_you_mean(part, ir.TRAINABLE_PARTS))
                return None
            parts.append(part)
        if not parts:
            self.ctx.error("E202", "`train = []` trains nothing", node.value.span,
                           "name what the stage trains: `train = [projector]`, `train = [projector, language]` or `train = all`")
            return None
        return tuple(p for p in ir.TRAINABLE_PARTS if p in parts)

    def balance(self, r: Reader) -> ir.Balance | None:
        nested = r.nested("balance")
        if r.has("balance") and nested:
            self.ctx.error("E104", "`balance` is set twice", nested[0].kind_span)
        if r.has("balance"):
            by = r.get("balance", _enum(("data_type", "source", "category"), "balancing key"))
            return ir.Balance(by=by) if by else None
        if nested:
            b = Reader(self.ctx, nested[0], keys={"by", "min_share", "max_share"}, what="`balance`")
            by = b.get("by", _enum(("data_type", "source", "category"), "balancing key"), "data_type")
            low = b.get("min_share", v.fraction, 0.0)
            high = b.get("max_share", v.fraction, 1.0)
            if None in (by, low, high):
                return None
            if low > high:
                self.ctx.error("E202", "`min_share` is above `max_share`", b.value_span("min_share"))
                return None
            return ir.Balance(by=by, min_share=low, max_share=high)
        return None

    def mix(self, stage: str, block: ast.Block, datasets, pools, parts_taken, parts_n) -> tuple[ir.MixEntry, ...] | None:
        names = {**datasets, **pools}
        known_names = {**self.blocks["source"], **self.blocks["synthesize"], **self.blocks["pool"]}
        entries: list[ir.MixEntry] = []
        ok = True
        seen: dict[str, ast.Attribute] = {}
        for item in block.items:
            if not isinstance(item, ast.Attribute):
                Reader(self.ctx, None, keys=set(), items=(item,), what=f"the mix of stage `{stage}`", span=block.kind_span)
                ok = False
                continue
            key, attribute = item.key, item
            if key not in known_names:
                self.ctx.error("E105", f"unknown source or pool `{key}`", item.key_span, did_you_mean(key, known_names))
                ok = False
                continue
            if key in seen:
                self.ctx.error("E104", f"`{key}` appears twice in the mix of stage `{stage}`", item.key_span,
                               f"first at line {seen[key].span.line}")
                ok = False
                continue
            seen[key] = item
            if key not in names:
                ok = False  # the block declaring it reported the problem
                continue
            try:
                entry = _mix_entry(key, attribute.value)
            except v.ValueProblem as problem:
                self.ctx.error(problem.code, f"`{key}`: {problem.message}", attribute.value.span, problem.hint)
                ok = False
                continue
            if entry.kind == "part":
                k, n = entry.part
                if key in parts_n and parts_n[key][0] != n:
                    first_n, first_stage, _ = parts_n[key]
                    self.ctx.error("E303", f"`{key}` is split into {n} parts here but into {first_n} in stage `{first_stage}`",
                                   attribute.value.span, "disjoint parts of one pool must use the same split")
                    ok = False
                elif k in parts_taken.get(key, {}):
                    other, _ = parts_taken[key][k]
                    self.ctx.error("E303", f"part {k} of {n} of `{key}` is already taken by stage `{other}`",
                                   attribute.value.span, "each stage takes its own part: " + ", ".join(
                                       f"part({i}, {n})" for i in range(1, n + 1) if i not in parts_taken.get(key, {})) or None)
                    ok = False
                else:
                    parts_n.setdefault(key, (n, stage, attribute.value.span))
                    parts_taken.setdefault(key, {})[k] = (stage, attribute.value.span)
            entries.append(entry)
        if not entries and ok:
            self.ctx.error("E106", f"the mix of stage `{stage}` is empty", block.kind_span, "add `source = all`")
            return None
        return tuple(entries) if ok else None

    def composition(self, name, r, entries, datasets, pools, samples, balance) -> ir.Composition | None:
        def members(entry_name: str) -> tuple[str, ...]:
            return pools[entry_name].sources if entry_name in pools else (entry_name,)

        expected = {n: d.expect for n, d in datasets.items()}
        unknown = sorted({m for e in entries for m in members(e.name) if expected.get(m) is None})
        available = {e.name: {m: expected.get(m) or 0 for m in members(e.name)} for e in entries}
        groups = {n: (d.data_type if balance is None or balance.by == "data_type" else
                      d.category if balance.by == "category" else n) for n, d in datasets.items()}
        allocation = allocate(entries, available, samples=samples, balance=balance, groups=groups)
        mix_block = r.nested("mix")[0]
        spans = {i.key: i.value.span for i in mix_block.items if isinstance(i, ast.Attribute)}
        for problem in allocation.problems:
            if problem.capacity and unknown:
                continue  # capacity is only known for sources that state `expect`
            if problem.entry in spans:
                self.ctx.error(problem.code, f"stage `{name}` {problem.message}", spans[problem.entry], problem.hint)
            else:
                span = r.key_span("samples") if r.has("samples") else mix_block.kind_span
                self.ctx.error(problem.code, f"stage `{name}`: {problem.message}", span, problem.hint)
        by_source: dict[str, int | None] = {}
        for source, count in allocation.by_source().items():
            by_source[source] = None if source in unknown else count
        by_type: dict[str, int] = {}
        by_category: dict[str, int] = {}
        for source, count in by_source.items():
            if count is None:
                continue
            d = datasets[source]
            by_type[d.data_type] = by_type.get(d.data_type, 0) + count
            by_category[d.category] = by_category.get(d.category, 0) + count
        total = None if unknown and samples is None else (samples if samples is not None and balance is None else allocation.total)
        return ir.Composition(total=total, by_source=by_source, by_data_type=by_type, by_category=by_category)


def _mix_entry(name: str, value: ast.Value) -> ir.MixEntry:
    if isinstance(value, ast.Name):
        if value.name == "all":
            return ir.MixEntry(name=name, kind="all")
        raise v.ValueProblem("E203", f"unknown amount `{value.name}`",
                             "write `all`, a count (`500K`), a share (`30%`), first(N), random(N), cap(N), weight(x) or part(k, n)")
    if isinstance(value, ast.Number):
        if v.is_share(value):
            return ir.MixEntry(name=name, kind="share", share=v.fraction(value))
        return ir.MixEntry(name=name, kind="random", count=v.count(value))
    if isinstance(value, ast.Call):
        args = value.args
        if value.name in ("first", "random", "cap"):
            if len(args) != 1:
                raise v.ValueProblem("E201", f"{value.name}(...) takes one count", f"write `{value.name}(500K)`")
            return ir.MixEntry(name=name, kind=value.name, count=v.count(args[0]))
        if value.name == "weight":
            if len(args) != 1:
                raise v.ValueProblem("E201", "weight(...) takes one number", "write `weight(2)`")
            return ir.MixEntry(name=name, kind="weight", weight=v.real(args[0], minimum=0.0, exclusive_minimum=True))
        if value.name == "part":
            if len(args) != 2:
                raise v.ValueProblem("E201", "part(...) takes the part and the number of parts", "write `part(1, 3)`")
            n = v.integer(args[1], minimum=1, maximum=1000)
            k = v.integer(args[0], minimum=1)
            if k > n:
                raise v.ValueProblem("E202", f"part {k} of {n} does not exist", f"parts are numbered 1 to {n}")
            return ir.MixEntry(name=name, kind="part", part=(k, n))
        raise v.ValueProblem("E203", f"unknown mixture function `{value.name}`",
                             did_you_mean(value.name, ("first", "random", "cap", "weight", "part")))
    raise v.ValueProblem("E201", f"expected an amount, found {v.describe(value)}",
                         "write `all`, a count (`500K`), a share (`30%`), first(N), random(N), cap(N), weight(x) or part(k, n)")


def _order(value: ast.Value) -> ir.Order:
    if isinstance(value, ast.Name) and value.name in ("shuffle", "sequential"):
        return ir.Order(kind=value.name)
    if isinstance(value, ast.Call) and value.name in ("ascending", "descending"):
        if len(value.args) != 1 or not isinstance(value.args[0], ast.Name):
            raise v.ValueProblem("E201", f"{value.name}(...) takes a field name", f"write `{value.name}(difficulty)`")
        return ir.Order(kind=value.name, field=value.args[0].name)
    raise v.ValueProblem("E203", "unknown order", "write `shuffle`, `sequential`, ascending(field) or descending(field)")


def _projector(value: ast.Value) -> str:
    if isinstance(value, ast.Name) and (value.name == "linear" or re.fullmatch(r"mlp[1-9]x_gelu", value.name)):
        return value.name
    raise v.ValueProblem("E203", "unknown projector", "use `mlp2x_gelu` (LLaVA-OneVision), `mlpNx_gelu` or `linear`")


MAX_YAML_DEPTH = 64  # mappings and lists inside one another: a 3-level taxonomy needs 7
MAX_YAML_NODES = 200_000


def _plain_yaml(text: str) -> None:
    """Refuse YAML that could expand or recurse: aliases (`*a`, a billion laughs or a cycle), deep nesting, huge counts.

    Checked on the parser's events, before anything is built from them.
    """
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, yaml.AliasEvent):
            raise ValueError(f"it uses a YAML alias (line {event.start_mark.line + 1}); write the nodes out")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ValueError(f"it nests deeper than {MAX_YAML_DEPTH} levels (line {event.start_mark.line + 1})")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        if isinstance(event, (yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            nodes += 1
            if nodes > MAX_YAML_NODES:
                raise ValueError(f"it has more than {MAX_YAML_NODES:,} nodes")


def _yaml_problem(error: Exception) -> str:
    """What is wrong with a YAML file, without quoting it."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return printable(f"{error.problem or error.context or 'not valid YAML'}{where}")
    if isinstance(error, KeyError):
        return f"it has no {error}"
    return printable(str(error).splitlines()[0] if str(error) else type(error).__name__)


def _has_architecture(block: ast.Block | None) -> bool:
    return block is not None and any(isinstance(i, ast.Attribute) and i.key == "architecture" for i in block.items)


def _taxonomy_node(data: Any) -> ir.TaxonomyNode:
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError("every node needs a `name`")
    return ir.TaxonomyNode(name=str(data["name"]), children=tuple(_taxonomy_node(c) for c in data.get("children") or ()))


def _leaves(node: ir.TaxonomyNode) -> int:
    return 1 if not node.children else sum(_leaves(c) for c in node.children)
