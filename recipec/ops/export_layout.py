"""The layout of an export that the runtime reads back, without pyarrow: the image list and the
LLaVA-NeXT data YAML (recipec.ops.export writes the first, recipec.runtime.report the second)."""

from __future__ import annotations

import json
import re

IMAGE_LIST = "images.sha256"


def format_image_list(images: dict[str, str]) -> bytes:
    """`sha256sum` lines (`<sha256>  <name>`) for `images` (name -> sha256), sorted by name; a name
    holding a backslash or a line break is escaped as GNU sha256sum does (a leading backslash)."""
    lines = []
    for name in sorted(images):
        if "\\" in name or "\n" in name or "\r" in name:
            escaped = name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
            lines.append(f"\\{images[name]}  {escaped}\n")
        else:
            lines.append(f"{images[name]}  {name}\n")
    return "".join(lines).encode("utf-8")


def parse_image_list(data: bytes) -> list[tuple[str, str, str]]:
    """(sha256, source, path) of each line of an `images.sha256` file."""
    result = []
    for line in data.decode("utf-8").split("\n"):
        if not line:
            continue
        escaped = line.startswith("\\")
        digest, _, name = line[1 if escaped else 0:].partition("  ")
        if escaped:
            name = re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r", "\\": "\\"}[m.group(1)], name)
        source, _, path = name.partition("/")
        result.append((digest, source, path))
    return result


def data_yaml(stage: str, json_path: str, image_folder: str | None, samples: int) -> bytes:
    """LLaVA-NeXT's data YAML for `--data_path`, with absolute paths (written by the runtime)."""
    lines = [
        f"# LLaVA-NeXT training data for stage {stage} (written by recipec): {samples} samples.",
        "# Paths are absolute: LLaVA-NeXT opens json_path relative to its working directory. A moved",
        "# output folder needs `recipec run` again (or --data_path <stage>.json in its new place).",
        "# " + (f"--data_path {_shell_word(json_path.removesuffix('.json') + '.yaml')} --image_folder "
                f"{_shell_word(image_folder)}" if image_folder else "text only: no --image_folder needed"),
        "datasets:",
        # JSON strings are YAML strings: quoting this way survives any file name
        f"  - json_path: {json.dumps(json_path, ensure_ascii=False)}",
        "    sampling_strategy: all  # the mixture is already drawn",
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _shell_word(text: str) -> str:
    return text if re.fullmatch(r"[A-Za-z0-9_./@%+=:,-]+", text) else "'" + text.replace("'", "'\"'\"'") + "'"


