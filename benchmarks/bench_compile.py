"""Compile speed: LALR against Earley on the same grammar, and `recipec check` as a whole process.

    python benchmarks/bench_compile.py [--lines 2000] [--repeat 7] [--large-mb 5] [--out FILE]

Prints medians and ratios measured in this run on the same inputs; writes them as JSON with --out.
Targets: compiling a generated 2,000-line recipe in under 100 ms; `recipec check` of the Aquila
recipe in under 0.5 s wall, process start included; `recipec check` of a generated 5 MB recipe
(about 28,000 sources) in a few seconds (`--large-mb 0` skips it).
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
    written = sum(p.count("\n") for p in parts)
    while written < lines - 40:  # a running count: summing every part each time made this quadratic
        name = f"source_{count:04d}"
        sources.append(name)
        parts.append(f'''source {name} {{
  format = llava_jsonl
  path = "data/{name}/*.jsonl"
  images = "data/{name}/images"
  category = comprehensive
  type = {TYPES[count % len(TYPES)]}
  expect = {(count % 9 + 1) * 100}K
  scores = [loss]
}}
''')
        written += parts[-1].count("\n")
        count += 1
    parts.append('filter processing {\n  dedup exact {\n    by = [image, text]\n  }\n  dedup phash {\n    max_distance = 4\n  }\n'
                 '  drop loss top 5%\n}\n')
    parts.append("pool everything {\n  category = comprehensive\n}\n")
    for k in range(1, 4):
        parts.append(f"stage s{k} {{\n  grid = {min(k + 1, 3)}x{min(k + 1, 3)}\n  lr = 1e-5\n  mix {{\n    everything = part({k}, 3)\n  }}\n}}\n")
    return "\n".join(parts)


def generate_size(megabytes: float) -> str:
    """A valid generated recipe of about `megabytes` MB (1 MB is 10^6 characters)."""
    return generate(int(megabytes * 1_000_000 / 22.2))


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
    parser.add_argument("--large-mb", type=float, default=5.0, help="size of the large recipe checked whole")
    parser.add_argument("--out")
    args = parser.parse_args()

    from recipec.compiler import compile_file
    from recipec.syntax.parser import _parser, build_parser, parse

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
            "parse_recipec_s": median_time(lambda: parse(text), args.repeat),
            "parse_earley_s": median_time(lambda: earley.parse(text), max(3, args.repeat // 2)),
            "compile_s": median_time(lambda: compile_file(str(path)), args.repeat),
        }
    figures["earley_over_lalr"] = figures["parse_earley_s"] / figures["parse_lalr_s"]

    aquila = ROOT / "recipes" / "aquila-vl-2b.recipe"
    command = [sys.executable, "-m", "recipec", "check", "-q", str(aquila)]
    subprocess.run(command, check=True, capture_output=True)  # warm the parser-table cache
    figures["check_process_s"] = median_time(lambda: subprocess.run(command, check=True, capture_output=True), args.repeat)
    if args.large_mb > 0:
        with tempfile.TemporaryDirectory() as folder:
            large = Path(folder) / "large.recipe"
            large.write_text(generate_size(args.large_mb))
            figures["large_bytes"] = large.stat().st_size
            figures["large_sources"] = large.read_text().count("\nsource ")
            command = [sys.executable, "-m", "recipec", "check", "-q", str(large)]
            figures["check_large_s"] = median_time(lambda: subprocess.run(command, check=True, capture_output=True),
                                                   max(1, args.repeat // 3))
    figures["python_startup_s"] = median_time(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), args.repeat)

    print(f"generated recipe: {figures['lines']} lines")
    print(f"{'measure':<40}{'seconds':>10}")
    print(f"{'parse, lark LALR (errors only now)':<40}{figures['parse_lalr_s']:>10.4f}")
    print(f"{'parse, Earley (same grammar)':<40}{figures['parse_earley_s']:>10.4f}")
    print(f"{'parse, recipec (tokens to tree)':<40}{figures['parse_recipec_s']:>10.4f}")
    print(f"{'compile (parse + lower + checks)':<40}{figures['compile_s']:>10.4f}")
    print(f"{'recipec check aquila (whole process)':<40}{figures['check_process_s']:>10.4f}")
    if "check_large_s" in figures:
        label = f"recipec check {figures['large_bytes'] / 1e6:.1f} MB ({figures['large_sources']:,} sources)"
        print(f"{label:<40}{figures['check_large_s']:>10.4f}")
    print(f"{'python -c pass (for reference)':<40}{figures['python_startup_s']:>10.4f}")
    print(f"Earley / LALR parse time: {figures['earley_over_lalr']:.1f}x; "
          f"lark LALR / recipec's parse: {figures['parse_lalr_s'] / figures['parse_recipec_s']:.1f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
