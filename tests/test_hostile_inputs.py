"""Hostile and careless input: what a recipe may read, what reaches a terminal, and no hang or traceback.

The catalogue in tests/invalid/ holds the cases one file can show (each with its exact codes and
positions, checked by test_compiler.py); this file holds those that need other files around them
(links, FIFOs, secrets beside the repository, git), the command line, a time and memory limit over
the whole catalogue, and a fuzz test over the shipped recipes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, SHIPPED
from recipec.compiler import compile_file
from recipec.compiler.files import IncludeError, read_file
from recipec.diagnostics import Diagnostic, Sources, printable, render, render_all

SECRET = "hunter2-do-not-print"


def recipec(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recipec", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=120)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors(result) -> list[tuple[str, int, int]]:
    return [(d.code, d.span.line, d.span.column) for d in result.diagnostics if d.is_error]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A project folder (the include root) with a secret file beside it, outside the root."""
    (tmp_path / "secret.txt").write_text(f"TOKEN={SECRET}\n")
    project = tmp_path / "project"
    project.mkdir()
    return project


# ---- what a recipe may read ---------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["../secret.txt", "{outside}/secret.txt", "link/secret.txt", "linked.txt"])
def test_included_files_stay_inside_the_root(repo: Path, reference: str):
    (repo / "link").symlink_to(repo.parent)  # a folder link out of the root
    (repo / "linked.txt").symlink_to(repo.parent / "secret.txt")  # a file link out of it
    reference = reference.format(outside=repo.parent)
    recipe = write(repo / "r.recipe", f'recipe "r" {{}}\nprompt p {{ file = "{reference}" }}\n')
    result = compile_file(recipe)
    assert errors(result) == [("E402", 2, 19)]
    assert "outside the include root" in result.diagnostics[0].message
    assert SECRET not in render_all(result.diagnostics, result.sources)


def test_root_can_be_widened_explicitly(repo: Path):
    recipe = write(repo / "r.recipe", 'recipe "r" {}\nprompt p { file = "../secret.txt" }\n')
    assert compile_file(recipe, root=repo.parent).ok
    assert compile_file(recipe).ok is False


def test_the_repository_is_the_default_root(tmp_path: Path):
    (tmp_path / ".git").mkdir()
    write(tmp_path / "prompts" / "q.txt", "Ask about the image.")
    recipe = write(tmp_path / "recipes" / "r.recipe", 'recipe "r" {}\nprompt p { file = "../prompts/q.txt" }\n')
    assert compile_file(recipe).ok


def test_a_fifo_is_refused_without_blocking(repo: Path):
    os.mkfifo(repo / "pipe.txt")
    os.mkfifo(repo / "pipe.recipe")
    recipe = write(repo / "r.recipe", 'recipe "r" {}\nprompt p { file = "pipe.txt" }\n')
    result = compile_file(recipe)
    assert errors(result) == [("E402", 2, 19)] and "FIFO" in result.diagnostics[0].message
    derived = write(repo / "d.recipe", 'recipe "d" { extends = "pipe.recipe" }\n')
    assert errors(compile_file(derived)) == [("E402", 1, 24)]


def test_devices_and_directories_are_refused(repo: Path):
    recipe = write(repo / "r.recipe", 'recipe "r" {}\nprompt p { file = "/dev/zero" }\nprompt q { file = "." }\n')
    result = compile_file(recipe, root="/")
    assert errors(result) == [("E402", 2, 19), ("E402", 3, 19)]
    assert "device" in result.diagnostics[0].message and "directory" in result.diagnostics[1].message


def test_files_are_read_with_a_size_cap(tmp_path: Path):
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 1001)
    with pytest.raises(IncludeError, match="larger than 1000 bytes"):
        read_file(big, limit=1000)
    assert read_file(big, limit=1001) == "x" * 1001


def test_extends_names_only_recipes(repo: Path):
    write(repo / "notes.txt", f"{SECRET}\n")
    recipe = write(repo / "r.recipe", 'recipe "r" { extends = "notes.txt" }\n')
    result = compile_file(recipe)
    assert errors(result) == [("E402", 1, 24)]
    assert SECRET not in render_all(result.diagnostics, result.sources)


def test_a_file_that_is_not_a_recipe_is_never_quoted(repo: Path):
    notes = write(repo / "notes.txt", f"x = 1\nTOKEN {SECRET} ;\n")
    done = recipec("check", str(notes))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{notes}:2:" in done.stderr and SECRET not in done.stderr and "TOKEN" not in done.stderr


def test_diff_never_prints_a_file_outside_the_root(repo: Path):
    base = write(repo / "a.recipe", 'recipe "r" {}\nprompt p { text = "hello" }\n')
    head = write(repo / "b.recipe", 'recipe "r" {}\nprompt p { file = "../secret.txt" }\n')
    for mode in ([], ["--json"], ["--markdown"]):
        done = recipec("diff", str(base), str(head), *mode)
        assert done.returncode == 2, done.stderr
        assert SECRET not in done.stdout + done.stderr


def test_git_revision_reads_are_held_to_the_root(tmp_path: Path):
    project = tmp_path / "project"
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", str(project)], check=True)
    write(project / "r.recipe", 'recipe "r" {}\nprompt p { text = "x" }\n')
    subprocess.run([*git, "-C", str(project), "add", "."], check=True)
    subprocess.run([*git, "-C", str(project), "commit", "-q", "-m", "x"], check=True)
    (tmp_path / "secret.txt").write_text(SECRET)
    write(project / "r.recipe", 'recipe "r" {}\nprompt p { file = "../secret.txt" }\n')
    done = recipec("diff", "HEAD", "r.recipe", cwd=project)
    assert done.returncode == 2 and SECRET not in done.stdout + done.stderr


# ---- exit codes ---------------------------------------------------------------------------------


def test_unreadable_inputs_exit_2_and_recipe_problems_exit_1(tmp_path: Path):
    bad = write(tmp_path / "bad.recipe", "recipe {\n")
    assert recipec("check", str(tmp_path / "missing.recipe")).returncode == 2
    assert recipec("plan", str(tmp_path / "missing.recipe")).returncode == 2
    assert recipec("check", str(tmp_path)).returncode == 2  # a directory
    assert recipec("check", str(bad)).returncode == 1
    assert recipec("check", str(bad), str(tmp_path / "missing.recipe")).returncode == 2


# ---- what reaches a terminal --------------------------------------------------------------------


def test_control_characters_are_escaped_everywhere(tmp_path: Path):
    name = "x\\u001b]0;owned\\u0007\\u001b[2J\\u009b31m\\u202e"
    recipe = write(tmp_path / "r.recipe", f'recipe "{name}" {{}}\nsource s {{ format = parquet }}\n')
    done = recipec("check", str(recipe))
    assert done.returncode == 1
    text = done.stdout + done.stderr
    for raw in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert raw not in text
    ok = write(tmp_path / "ok.recipe", f'recipe "{name}" {{}}\n')
    other = write(tmp_path / "other.recipe", 'recipe "other" {}\n')
    for args in (["plan", str(ok)], ["plan", str(ok), "--json"], ["diff", str(other), str(ok)],
                 ["diff", str(other), str(ok), "--markdown"], ["diff", str(other), str(ok), "--json"]):
        done = recipec(*args)
        assert done.returncode in (0, 1), (args, done.stderr)
        for raw in ("\x1b", "\x07", "\x9b", "\u202e"):
            assert raw not in done.stdout + done.stderr, args
    data = json.loads(recipec("plan", str(ok), "--json").stdout)
    assert data["recipe"] == json.loads(f'"{name}"')  # escaped for the terminal, unchanged as JSON


def test_printable_and_long_lines():
    assert printable("a\x1b[31mb\u202ec\ud800") == "a\\x1b[31mb\\u202ec\\ud800"
    assert printable("one\ntwo\x1b", newlines=True) == "one\ntwo\\x1b"
    sources = Sources()
    sources.add("p.recipe", "x" * 1_000_000 + "?" + "y" * 1_000_000)
    shown = render(Diagnostic("E001", "bad", __import__("recipec.diagnostics", fromlist=["Span"]).Span(
        "p.recipe", 1, 1_000_001, 1, 1_000_002)), sources)
    assert len(shown) < 500
    line, caret = shown.splitlines()[2:4]
    assert line.index("?") == caret.index("^")


# ---- accepted, not rejected ---------------------------------------------------------------------


def test_bom_crlf_and_cr_only_compile_like_plain_text(tmp_path: Path):
    text = 'recipe "t" {\n  seed = 7\n}\nprompt p {\n  text = "q"\n}\n'
    plain = compile_file(write(tmp_path / "plain.recipe", text)).recipe
    for name, variant in (("bom", "\ufeff" + text), ("crlf", text.replace("\n", "\r\n")), ("cr", text.replace("\n", "\r"))):
        path = tmp_path / f"{name}.recipe"
        path.write_bytes(variant.encode("utf-8"))
        assert compile_file(path).recipe == plain, name
    broken = tmp_path / "broken.recipe"
    broken.write_bytes('recipe "t" {\r  seed = \r}\r'.encode())
    assert errors(compile_file(broken)) == [("E003", 3, 1)]


def test_fractional_counts_that_are_integers(tmp_path: Path):
    recipe = write(tmp_path / "r.recipe", '''
        recipe "t" {}
        model m {
          architecture = llava_onevision
          vision = "google/siglip-so400m-patch14-384"
          language = "Qwen/Qwen2.5-1.5B-Instruct"
        }
        source a { format = parquet  path = "a"  expect = 2.5K }
        stage s { batch = 1.5K  mix { a = all } }
    ''')
    result = compile_file(recipe)
    assert result.ok, [d.header() for d in result.diagnostics]
    assert result.recipe.stages[0].batch == 1500 and result.recipe.sources["a"].expect == 2500


# ---- YAML that expands or recurses ----------------------------------------------------------------


@pytest.mark.parametrize("yaml_text, needle", [
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\ntree: [{name: r, children: [*c]}]\n", "alias"),
    ("tree: &t [{name: x, children: *t}]\n", "alias"),
    ("tree:" + " [" * 200 + " ]" * 200 + "\n", "nest"),
    ("- just\n- a list\n", "mapping"),
])
def test_hostile_taxonomies_are_located_errors(tmp_path: Path, yaml_text: str, needle: str):
    (tmp_path / "t.yaml").write_text(yaml_text)
    recipe = write(tmp_path / "r.recipe", 'recipe "r" {}\ntaxonomy t { file = "t.yaml" }\n')
    result = compile_file(recipe)
    assert errors(result) == [("E402", 2, 21)]
    assert needle in result.diagnostics[0].message


# ---- every catalogue case under a time and memory limit -------------------------------------------

_HARNESS = r"""
import json, resource, signal, sys
resource.setrlimit(resource.RLIMIT_AS, (2 * 1024 ** 3, 2 * 1024 ** 3))
from recipec.compiler import compile_file
from recipec.diagnostics import render_all
from recipec.fmt import format_text
def hang(*_):
    raise SystemExit(f"HANG {current}")
signal.signal(signal.SIGALRM, hang)
out = {}
for current in sys.argv[1:]:
    signal.alarm(60)  # a hang, not a slow machine: each case takes well under a second
    result = compile_file(current)
    render_all(result.diagnostics, result.sources)
    try:
        format_text(open(current, encoding="utf-8", errors="replace").read(), current)
    except Exception as error:
        if type(error).__name__ != "RecipeErrors":
            raise
    signal.alarm(0)
    out[current] = [d.code for d in result.diagnostics if d.is_error]
print(json.dumps(out))
"""


def test_every_catalogue_case_under_a_time_and_memory_limit():
    cases = sorted(str(p) for p in (ROOT / "tests" / "invalid").glob("*.recipe"))
    done = subprocess.run([sys.executable, "-c", _HARNESS, *cases], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    assert set(found) == set(cases)
    assert all(found.values())  # each is rejected, none crashed or hung


# ---- fuzz: mutated shipped recipes never crash or hang ---------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_TEXTS = {p: p.read_text(encoding="utf-8") for p in SHIPPED}
_HOSTILE = ['"""', '"', "{", "}", "[", "]", "(", ")", "=", "\\u", "\\ud800", "1e999999999", "99999999999999999999",
            "300 K", "10MM", "1.5.3", "\u201c", "\u0430", "\ufeff", "\x00", "\x1b[31m", "\r", "#", "//",
            "keep", "drop", "remove", "all", "top 5%", ">=", "-", "x", "0x0", "1e-999", "/proc/self/environ",
            "../../../../etc/passwd", "extends = ", "file(", "part(0, 0)", "weight(0)", "\n"]


@st.composite
def mutated(draw):
    path = draw(st.sampled_from(sorted(_TEXTS)))
    text = _TEXTS[path]
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace", "duplicate"]))
        piece = draw(st.sampled_from(_HOSTILE) | st.text(max_size=8))
        end = min(len(text), at + draw(st.integers(0, 40)))
        if action == "insert":
            text = text[:at] + piece + text[at:]
        elif action == "delete":
            text = text[:at] + text[end:]
        elif action == "replace":
            text = text[:at] + piece + text[end:]
        else:
            text = text[:at] + text[at:end] * draw(st.integers(2, 50)) + text[end:]
    return path, text


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(mutated())
def test_mutated_shipped_recipes_never_crash(case):
    import signal

    path, text = case

    def hang(*_):
        raise AssertionError("compiling a mutated recipe hung")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)  # a generous limit that only a hang exceeds
    try:
        result = compile_file(path, text=text)  # never raises: problems are diagnostics
        rendered = render_all(result.diagnostics, result.sources)
        assert "\x1b" not in rendered and "\x00" not in rendered
        for d in result.diagnostics:
            assert d.code and d.message
        if result.ok:
            from recipec.plan import build_plan, plan_json

            json.dumps(plan_json(build_plan(result.recipe)), allow_nan=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_few_mutations_through_the_command_line(tmp_path: Path):
    """Exit codes stay 0, 1 or 2 and stderr never holds a traceback, whatever the recipe says."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for sub in ("prompts", "taxonomies"):
        (recipes / sub).symlink_to(ROOT / "recipes" / sub)
    base = (ROOT / "recipes" / "aquila-vl-2b.recipe").read_text()
    variants = [base.replace("seed = 42", "seed = 1e999999999"), base[: len(base) // 2], base.replace("{", "", 3),
                base.replace('"', "\u201c", 1), base + "\x00", '"""' + base]
    paths = []
    for index, text in enumerate(variants):
        (recipes / f"v{index}.recipe").write_text(text)
        paths.append(str(recipes / f"v{index}.recipe"))
    done = recipec("check", *paths, "--root", str(ROOT))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    for command in (["fmt", "--check"], ["plan", "--json"]):
        done = recipec(*command, paths[0])
        assert done.returncode in (0, 1, 2) and "Traceback" not in done.stderr


# ---- model configs read from local directories ----------------------------------------------------

_SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 384, "patch_size": 14,
           "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16}
_QWEN = {"model_type": "qwen2", "hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 2,
         "intermediate_size": 8960, "num_hidden_layers": 28, "vocab_size": 151936}


@pytest.mark.parametrize("tower, change, needle", [
    ("vision", {"hidden_size": "1152"}, "`hidden_size` must be a positive integer"),
    ("vision", {"num_hidden_layers": -3}, "`num_hidden_layers` must be a positive integer"),
    ("vision", {"patch_size": 0}, "`patch_size` must be a positive integer"),
    ("vision", {"image_size": 10}, "smaller than one patch"),
    ("vision", {"num_attention_heads": 7}, "not divisible"),
    ("language", {"intermediate_size": "x"}, "`intermediate_size` must be a positive integer"),
    ("language", {"vocab_size": 1e300}, "`vocab_size` must be a positive integer"),
    ("language", {"num_key_value_heads": 5}, "not divisible by `num_key_value_heads`"),
    ("language", {"hidden_size": True}, "`hidden_size` must be a positive integer"),
])
def test_model_configs_are_validated_with_file_and_key(tmp_path: Path, tower: str, change: dict, needle: str):
    config = {**(_SIGLIP if tower == "vision" else _QWEN), **change}
    write(tmp_path / "tower" / "config.json", json.dumps(config))
    vision = "./tower" if tower == "vision" else "google/siglip-so400m-patch14-384"
    language = "./tower" if tower == "language" else "Qwen/Qwen2.5-1.5B-Instruct"
    recipe = write(tmp_path / "r.recipe", f'recipe "t" {{}}\nmodel m {{\n  architecture = llava_onevision\n'
                                          f'  vision = "{vision}"\n  language = "{language}"\n}}\n')
    result = compile_file(recipe)
    line = 4 if tower == "vision" else 5
    assert {(c, l) for c, l, _ in errors(result)} == {("E502", line)}
    assert needle in result.diagnostics[0].message and "tower/config.json" in result.diagnostics[0].message
