"""Compile speed: LALR against Earley on the same grammar, and `recipec check` as a whole process.

    python benchmarks/bench_compile.py [--lines 2000] [--repeat 7] [--out FILE]

Prints medians and ratios measured in this run on the same inputs; writes them as JSON with --out.
Targets: compiling a generated 2,000-line recipe in under 100 ms; `recipec check` of the Aquila
recipe in under 0.5 s wall, process start included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = '''model vlm {
  architecture = llava_onevision
  vision = "google/siglip-so400m-patch14-384"
  language = "Qwen/Qwen2.5-1.5B-Instruct"
  projector = mlp2x_gelu
}
'''
TYPES = ["general", "ocr", "doc_chart_screen", "math_reasoning", "text"]


def generate(lines: int) -> str:
    """A valid recipe of about `lines` lines: many sources, filters and stages mixing them."""
    parts = ['recipe "generated" {\n  seed = 1\n}\n', MODEL]
    count = 0
    sources = []
    while sum(p.count("\n") for p in parts) < lines - 40:
        name = f"source_{count:04d}"
        sources.append(name)
        parts.append(f'''source {name} {{
  format = llava_jsonl
  path = "data/{name}/*.jsonl"
  images = "data/{name}/images"
  category = comprehensive
  type = {TYPES[count % len(TYPES)]}
  expect = {(count % 9 + 1) * 100}K
}}
''')
        count += 1
    parts.append('filter processing {\n  dedup exact {\n    by = [image, text]\n  }\n  dedup phash {\n    max_distance = 4\n  }\n'
                 '  drop loss top 5%\n}\n')
    parts.append("pool everything {\n  category = comprehensive\n}\n")
    for k in range(1, 4):
        parts.append(f"stage s{k} {{\n  grid = {k + 1}x{k + 1}\n  lr = 1e-5\n  mix {{\n    everything = part({k}, 3)\n  }}\n}}\n")
    return "\n".join(parts)


def median_time(function, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out")
    args = parser.parse_args()

    from recipec.compiler import compile_file
    from recipec.syntax.parser import _parser, build_parser

    text = generate(args.lines)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "generated.recipe"
        path.write_text(text)
        assert compile_file(str(path)).ok, "the generated recipe must compile"
        lalr = _parser()
        earley = build_parser(parser="earley")
        figures = {
            "lines": text.count("\n"),
            "parse_lalr_s": median_time(lambda: lalr.parse(text), args.repeat),
            "parse_earley_s": median_time(lambda: earley.parse(text), max(3, args.repeat // 2)),
            "compile_s": median_time(lambda: compile_file(str(path)), args.repeat),
        }
    figures["earley_over_lalr"] = figures["parse_earley_s"] / figures["parse_lalr_s"]

    aquila = ROOT / "recipes" / "aquila-vl-2b.recipe"
    command = [sys.executable, "-m", "recipec", "check", "-q", str(aquila)]
    subprocess.run(command, check=True, capture_output=True)  # warm the parser-table cache
    figures["check_process_s"] = median_time(lambda: subprocess.run(command, check=True, capture_output=True), args.repeat)
    figures["python_startup_s"] = median_time(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), args.repeat)

    print(f"generated recipe: {figures['lines']} lines")
    print(f"{'measure':<40}{'seconds':>10}")
    print(f"{'parse, LALR (recipec)':<40}{figures['parse_lalr_s']:>10.4f}")
    print(f"{'parse, Earley (same grammar)':<40}{figures['parse_earley_s']:>10.4f}")
    print(f"{'compile (parse + lower + checks)':<40}{figures['compile_s']:>10.4f}")
    print(f"{'recipec check aquila (whole process)':<40}{figures['check_process_s']:>10.4f}")
    print(f"{'python -c pass (for reference)':<40}{figures['python_startup_s']:>10.4f}")
    print(f"Earley / LALR parse time: {figures['earley_over_lalr']:.1f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
