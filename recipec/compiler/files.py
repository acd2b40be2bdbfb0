"""Reading the files a recipe names: the recipe itself, the recipes it extends, prompts and taxonomies.

One mechanism for all of them, so a hostile recipe cannot make `check` or `diff` read or print what
it should not:

- an included file must lie inside the include root, after symbolic links are resolved: the git
  repository holding the compiled recipe, or its directory outside a repository; `--root DIR` (or
  `RECIPEC_ROOT`) widens or moves it;
- it must be a regular file (a FIFO, a device or a directory is refused before it is opened for
  reading, so nothing blocks), at most `MAX_FILE_BYTES` long, and UTF-8 text;
- a refusal is an `IncludeError` whose reason names the path, never the file's content.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

MAX_FILE_BYTES = 16 * 1024 * 1024  # a 5 MB recipe is far past any real one; a taxonomy is kilobytes
ROOT_VARIABLE = "RECIPEC_ROOT"


class IncludeError(Exception):
    """A file that cannot or may not be read; `reason` completes "cannot read `path`: ..."."""

    def __init__(self, reason: str, hint: str | None = None):
        super().__init__(reason)
        self.reason, self.hint = reason, hint


def find_root(recipe: str | os.PathLike) -> Path:
    """The default include root of a recipe: the top of its git repository, else its directory."""
    start = Path(os.path.realpath(os.path.dirname(os.path.abspath(recipe))))
    for directory in (start, *start.parents):
        if (directory / ".git").exists():
            return directory
    return start


def include_root(recipe: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    explicit = root if root is not None else os.environ.get(ROOT_VARIABLE) or None
    if explicit is not None:
        return Path(os.path.realpath(explicit))
    return find_root(recipe)


def _check_path(text: str) -> None:
    if "\0" in text:
        raise IncludeError("a path cannot contain a NUL character")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise IncludeError("a path cannot contain control characters")


def _within(path: str, root: Path) -> bool:
    root_text = str(root)
    return path == root_text or path.startswith(root_text.rstrip(os.sep) + os.sep)


def check_inside(path: Path, root: Path) -> None:
    """Refuse `path` unless it lies inside `root` once `..` and symbolic links are resolved."""
    _check_path(str(path))
    if not _within(os.path.realpath(os.path.abspath(path)), root):
        raise IncludeError(f"it is outside the include root `{root}`",
                           "a recipe may include only files inside its repository (or its directory); "
                           "`--root DIR` widens that")


def read_file(path: str | os.PathLike, *, limit: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes, or IncludeError."""
    return decode(read_bytes(path, limit=limit))


def read_bytes(path: str | os.PathLike, *, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, or IncludeError."""
    path = os.fspath(path)
    _check_path(path)
    try:
        before = os.stat(path)
    except OSError as error:
        raise _os_error(error) from None
    _check_stat(before, limit)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        raise _os_error(error) from None
    try:
        st = os.fstat(fd)
        _check_stat(st, limit)  # what was opened is what was checked
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        raise _os_error(error) from None
    finally:
        os.close(fd)
    if size > limit:
        raise IncludeError(f"it is larger than {_size(limit)}")
    return b"".join(chunks)


def decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise IncludeError(f"it is not UTF-8 text (byte {error.start + 1})") from None


def bounded(text: str, *, limit: int = MAX_FILE_BYTES) -> str:
    """Text read by other means (a git revision), held to the same cap."""
    if len(text) > limit:
        raise IncludeError(f"it is larger than {_size(limit)}")
    return text


def _check_stat(st: os.stat_result, limit: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise IncludeError("it is a directory")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) \
            else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file"
        raise IncludeError(f"it is {kind}, not a regular file")
    if st.st_size > limit:
        raise IncludeError(f"it is larger than {_size(limit)}")


def _size(limit: int) -> str:
    return f"{limit // (1024 * 1024)} MiB" if limit >= 1024 * 1024 else f"{limit} bytes"


def _os_error(error: OSError) -> IncludeError:
    reason = (error.strerror or type(error).__name__).lower()
    hint = "paths are relative to the recipe that names them" if isinstance(error, FileNotFoundError) else None
    return IncludeError(reason, hint)


class Includes:
    """How one compilation reads files: the include root and, for git revisions, a replacement reader.

    `read(path)` returns the text of an included file or raises IncludeError. `replacement`, when
    given, is called instead of the disk (it raises OSError or UnicodeDecodeError like a file read).
    """

    def __init__(self, root: Path, replacement: Callable[[Path], str] | None = None):
        self.root = root
        self.replacement = replacement

    def read(self, path: Path, *, confined: bool = True) -> str:
        if confined:
            check_inside(path, self.root)
        if self.replacement is None:
            return read_file(path)
        try:
            return bounded(self.replacement(path))
        except UnicodeDecodeError as error:
            raise IncludeError(f"it is not UTF-8 text (byte {error.start + 1})") from None
        except OSError as error:
            raise _os_error(error) from None
        except ValueError as error:  # e.g. an embedded NUL in a path
            raise IncludeError(str(error)) from None
