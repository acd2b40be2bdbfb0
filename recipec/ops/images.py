"""Safe, validated image inspection for the ingest step.

Every image a recipe touches goes through here. Two promises from the design:

* data paths stay inside the roots the recipe declares (``resolve_inside``);
* a corrupt or hostile image (truncated file, decompression bomb, random bytes) is *rejected with a
  stable reason code*, never fatal: no PIL exception escapes ``inspect_image`` / ``open_image``.

We also leave PIL's global state alone (``Image.MAX_IMAGE_PIXELS``,
``ImageFile.LOAD_TRUNCATED_IMAGES``): other callers in the same process may rely on it. Limits are
enforced by explicit checks on the header instead.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image, UnidentifiedImageError

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "REASONS",
    "ImageInfo",
    "ImageReject",
    "inspect_image",
    "open_image",
    "resolve_inside",
]

# PIL's own default limit (about 89.5 megapixels, ~256 MiB as 24-bit RGB).
DEFAULT_MAX_PIXELS = 89_478_485
# A file larger than this is not read into memory at all.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

# Formats PIL may even try. Restricting them keeps exotic plugins (EPS, which shells out to
# Ghostscript; and a long tail of rarely fuzzed decoders) out of reach of untrusted data.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

REASONS = frozenset(
    {
        "image_missing",
        "image_unreadable",
        "image_corrupt",
        "image_truncated",
        "image_too_large",
        "image_path_escapes_root",
        "image_path_invalid",
    }
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the fixed 12-byte IEND chunk (length 0, CRC)


@dataclass(frozen=True)
class ImageInfo:
    """What ingest records about a valid image."""

    path: str  # relative to the root, POSIX form, lexically normalised
    sha256: str  # of the file bytes, hex
    width: int
    height: int
    format: str  # PIL's name: "JPEG", "PNG", ...


class ImageReject(Exception):
    """An image (or the path to it) that ingest must drop; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:  # a typo here would silently create a new report bucket
            raise ValueError(f"unknown image reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep reason/detail when pickled across worker processes
        return (type(self), (self.reason, self.detail))


# --------------------------------------------------------------------------------------------
# paths


def _normalise(relative: str) -> str:
    """Check ``relative`` lexically and return it in normal POSIX form (no '.', '..', '//')."""
    if not isinstance(relative, str):
        raise ImageReject("image_path_invalid", f"image path must be a string, got {type(relative).__name__}")
    if relative == "":
        raise ImageReject("image_path_invalid", "empty image path")
    if "\x00" in relative:
        raise ImageReject("image_path_invalid", f"NUL byte in image path {relative!r}")
    # (a path with no '/' first, ':' or '\\' has neither a root nor a drive: pathlib is not asked)
    if (relative.startswith("/") or ":" in relative or "\\" in relative) and \
            (PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).drive):
        raise ImageReject("image_path_escapes_root", f"absolute image path {relative!r}")
    if "\\" in relative:
        # A backslash is a separator on Windows and a file-name character on POSIX; accepting it
        # would make the same recipe read different files on different machines.
        raise ImageReject("image_path_invalid", f"backslash in image path {relative!r}; use '/'")
    parts: list[str] = []
    for part in relative.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ImageReject("image_path_escapes_root", f"image path {relative!r} leaves its root")
            parts.pop()
        else:
            parts.append(part)
    if not parts:
        raise ImageReject("image_path_invalid", f"image path {relative!r} names the root itself")
    return "/".join(parts)


class ResolvedRoot:
    """A root folder resolved once, for many paths under it (``resolve_inside`` then resolves only
    theirs). Raises OSError for a symlink loop."""

    def __init__(self, root: str | os.PathLike[str]):
        self.real = _resolved(os.fspath(root))


def resolved_root(root: str | os.PathLike[str]) -> Path | ResolvedRoot:
    """``root`` resolved once for many paths under it; as given when it cannot be resolved (a
    symlink loop), so that each path gets the reject ``resolve_inside`` gives it."""
    try:
        return ResolvedRoot(root)
    except OSError:
        return Path(root)


def resolve_inside(root: Path | ResolvedRoot, relative: str) -> Path:
    """The real location of ``relative`` under ``root``, or ``ImageReject`` if it is not inside.

    Lexical checks first (absolute paths, '..' above the root, NUL bytes), then both paths are
    resolved (following symlinks) and compared, so a symlink inside the root that leads outside it
    is caught too. The file need not exist: a missing file is the caller's business.
    """
    normal = _normalise(relative)
    try:
        real_root = root.real if isinstance(root, ResolvedRoot) else _resolved(os.fspath(root))
        real = _resolved(os.path.join(real_root, normal))
    except OSError as e:  # a symlink loop
        raise ImageReject("image_path_invalid", f"cannot resolve image path {relative!r}: {e}") from e
    if real == real_root:
        raise ImageReject("image_path_invalid", f"image path {relative!r} resolves to the root itself")
    if not real.startswith(real_root if real_root.endswith(os.sep) else real_root + os.sep):
        raise ImageReject("image_path_escapes_root", f"image path {relative!r} resolves outside its root")
    return Path(real)


def _resolved(path: str) -> str:
    """What ``Path(path).resolve()`` gives, as a string, without its objects (this runs once an
    image): absolute, symlinks followed, and a symlink loop raised (``realpath`` alone lets it by)."""
    real = os.path.realpath(path)
    try:
        os.stat(real)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise
    return real


# --------------------------------------------------------------------------------------------
# bytes


def _read_bytes(path: Path, shown: str, max_bytes: int) -> bytes:
    """Read a regular file in one go, mapping OS errors to reasons."""
    # O_NOFOLLOW: ``path`` is already resolved, so a symlink here means it was swapped in since.
    # O_NONBLOCK: opening a FIFO must not hang the pipeline; we reject non-regular files below.
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ImageReject("image_missing", f"no image file at {shown!r}") from e
    except OSError as e:  # PermissionError, ELOOP, EIO ...
        raise ImageReject("image_unreadable", f"cannot open {shown!r}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageReject("image_unreadable", f"{shown!r} is not a regular file")
        if st.st_size > max_bytes:
            raise ImageReject("image_too_large", f"{shown!r} is {st.st_size} bytes, more than {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            # its size and one byte more, to notice a file that grew while we read it (a read asks
            # for its whole length up front, so asking for `max_bytes` would allocate that much)
            data = f.read(min(st.st_size, max_bytes) + 1)
            if len(data) > st.st_size:
                data += f.read(max_bytes + 1 - len(data))
    except OSError as e:
        raise ImageReject("image_unreadable", f"cannot read {shown!r}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ImageReject("image_too_large", f"{shown!r} is more than {max_bytes} bytes")
    return data


def _jpeg_has_eoi(data: bytes) -> bool:
    """Whether a JPEG's end-of-image marker follows its first scan.

    Walks the marker segments up to the first SOS (skipping APPn payloads, which may embed a
    thumbnail with its own markers), then looks for FF D9: inside entropy-coded data every 0xFF is
    stuffed as FF 00, so FF D9 there can only be the real end marker.
    """
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", i + 2) != -1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return False


def _looks_truncated(data: bytes, fmt: str) -> bool:
    """Structural end-of-file checks, independent of ``ImageFile.LOAD_TRUNCATED_IMAGES``.

    PIL decodes a PNG whose IEND chunk was cut off without complaint, and if some other library in
    the process switched ``LOAD_TRUNCATED_IMAGES`` on, it would accept any truncated file. These
    checks keep our verdict the same either way, without touching that global.
    """
    if fmt == "PNG":
        return data.startswith(_PNG_SIGNATURE) and data.rfind(_PNG_IEND) == -1
    if fmt == "JPEG":
        return not _jpeg_has_eoi(data)
    return False


# --------------------------------------------------------------------------------------------
# decoding


def _decode(root: Path | ResolvedRoot, relative: str, max_pixels: int,
            max_bytes: int) -> tuple[ImageInfo, Image.Image]:
    """Read, check and fully decode one image; every failure becomes an ``ImageReject``."""
    shown = relative if isinstance(relative, str) else repr(relative)
    normal = _normalise(relative)
    path = resolve_inside(root, relative)
    data = _read_bytes(path, shown, max_bytes)
    digest = hashlib.sha256(data).hexdigest()

    with warnings.catch_warnings():
        # PIL warns between its limit and twice its limit, and raises beyond. Our explicit check
        # below is the authority; the warning only matters when it agrees with it.
        pil_limit = Image.MAX_IMAGE_PIXELS
        bomb_is_ours = pil_limit is None or max_pixels <= pil_limit
        warnings.simplefilter("error" if bomb_is_ours else "ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageReject("image_too_large", f"{shown!r}: {e}") from e
        except UnidentifiedImageError as e:
            raise ImageReject("image_corrupt", f"{shown!r} is not a readable image ({', '.join(ALLOWED_FORMATS)})") from e
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
            raise _classify(e, shown) from e

        width, height = img.size
        fmt = img.format or "unknown"
        if width <= 0 or height <= 0:
            raise ImageReject("image_corrupt", f"{shown!r} has an empty size {width}x{height}")
        # Checked before any pixel is decoded: the header alone tells the cost.
        if width * height > max_pixels:
            raise ImageReject(
                "image_too_large",
                f"{shown!r} is {width}x{height} = {width * height} pixels, more than {max_pixels}",
            )
        try:
            img.load()
        except Exception as e:
            raise _classify(e, shown) from e

    if _looks_truncated(data, fmt):
        raise ImageReject("image_truncated", f"{shown!r}: {fmt} data ends before its end marker")
    info = ImageInfo(path=normal, sha256=digest, width=width, height=height, format=fmt)
    return info, img


def _classify(e: BaseException, shown: str) -> ImageReject:
    """Turn an exception raised by PIL while opening or decoding into a reject."""
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageReject("image_too_large", f"{shown!r}: {e}")
    if isinstance(e, MemoryError):
        return ImageReject("image_too_large", f"{shown!r}: out of memory while decoding")
    # PIL signals running out of data as OSError("image file is truncated ...") or
    # OSError("Truncated File Read"), or EOFError from some plugins.
    if isinstance(e, EOFError) or "truncated" in str(e).lower():
        return ImageReject("image_truncated", f"{shown!r}: {e}")
    return ImageReject("image_corrupt", f"{shown!r}: {type(e).__name__}: {e}")


def inspect_image(
    root: Path | ResolvedRoot,
    relative: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ImageInfo:
    """Validate the image at ``root/relative`` and describe it, or raise ``ImageReject``.

    The file is read once; its sha256 is of those bytes, and PIL decodes the same bytes from
    memory (so the hash and the pixels cannot come from two different versions of the file).
    Note: PIL's global ``Image.MAX_IMAGE_PIXELS`` still applies on top of ``max_pixels`` when a
    file exceeds twice that limit; we do not raise it, as it is process-wide.
    """
    info, img = _decode(root, relative, max_pixels, max_bytes)
    img.close()
    return info


def open_image(
    root: Path,
    relative: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """The validated image at ``root/relative``, decoded and converted to RGB."""
    _, img = _decode(root, relative, max_pixels, max_bytes)
    try:
        with warnings.catch_warnings():
            # "Palette images with Transparency expressed in bytes should be converted to RGBA"
            warnings.simplefilter("ignore", UserWarning)
            return img.convert("RGB")
    except Exception as e:  # conversion of an exotic mode is still PIL code on untrusted data
        raise ImageReject("image_corrupt", f"{relative!r}: cannot convert to RGB: {e}") from e
    finally:
        img.close()
