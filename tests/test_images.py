"""recipec.ops.images: every reject reason, on files made in tmp_path."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from recipec.ops import images
from recipec.ops.images import (
    REASONS,
    ImageInfo,
    ImageReject,
    inspect_image,
    open_image,
    resolve_inside,
)

# --------------------------------------------------------------------------------------------
# helpers


def _noise_image(w: int = 120, h: int = 80, seed: int = 0) -> Image.Image:
    # noise, so JPEG and PNG payloads are large enough to cut in the middle of pixel data
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_bomb_header(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR (with a correct CRC) claims ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _write(root: Path, relative: str, data: bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _reason(root: Path, relative, **kw) -> str:
    with pytest.raises(ImageReject) as info:
        inspect_image(root, relative, **kw)
    assert info.value.reason in REASONS
    assert info.value.detail  # always a human explanation
    return info.value.reason


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


# --------------------------------------------------------------------------------------------
# valid images


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_valid_image_gives_hash_size_and_format(root: Path, fmt: str, ext: str) -> None:
    data = _encode(_noise_image(120, 80), fmt)
    _write(root, f"images/a.{ext}", data)
    info = inspect_image(root, f"images/./a.{ext}")
    assert info == ImageInfo(
        path=f"images/a.{ext}", sha256=hashlib.sha256(data).hexdigest(), width=120, height=80, format=fmt
    )


def test_open_image_converts_to_rgb(root: Path) -> None:
    _write(root, "gray.png", _encode(Image.new("L", (10, 7), 128), "PNG"))
    _write(root, "pal.png", _encode(Image.new("P", (5, 5), 3), "PNG", transparency=3))
    for name in ("gray.png", "pal.png"):
        img = open_image(root, name)
        assert img.mode == "RGB"
    assert open_image(root, "gray.png").size == (10, 7)
    assert open_image(root, "gray.png").getpixel((0, 0)) == (128, 128, 128)


def test_jpeg_with_trailing_bytes_and_progressive_jpeg_are_valid(root: Path) -> None:
    # data after the EOI marker (e.g. "motion photo" JPEGs) must not read as truncation
    _write(root, "trail.jpg", _encode(_noise_image(), "JPEG") + b"appended-data")
    _write(root, "prog.jpg", _encode(_noise_image(), "JPEG", progressive=True))
    _write(root, "exif.jpg", _encode(_noise_image(), "JPEG", exif=Image.Exif().tobytes()))
    for name in ("trail.jpg", "prog.jpg", "exif.jpg"):
        assert inspect_image(root, name).format == "JPEG"


def test_non_escaping_dotdot_and_internal_symlink_are_allowed(root: Path) -> None:
    _write(root, "images/a.png", _encode(_noise_image(), "PNG"))
    assert inspect_image(root, "images/sub/../a.png").path == "images/a.png"
    try:
        (root / "link.png").symlink_to(root / "images" / "a.png")
    except OSError:
        pytest.skip("symlinks not supported here")
    assert inspect_image(root, "link.png").path == "link.png"


# --------------------------------------------------------------------------------------------
# broken images


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("PNG", "png")])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_images(root: Path, fmt: str, ext: str, keep: float) -> None:
    data = _encode(_noise_image(), fmt)
    _write(root, f"cut.{ext}", data[: int(len(data) * keep)])
    assert _reason(root, f"cut.{ext}") == "image_truncated"


def test_png_missing_only_its_iend_chunk_is_truncated(root: Path) -> None:
    # PIL itself decodes this without complaint: all pixels are there, the file is not.
    data = _encode(_noise_image(), "PNG")
    _write(root, "cut.png", data[:-6])
    assert _reason(root, "cut.png") == "image_truncated"


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("PNG", "png")])
def test_truncation_is_caught_even_if_someone_enabled_load_truncated_images(
    root: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, ext: str
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = _encode(_noise_image(), fmt)
    _write(root, f"cut.{ext}", data[: len(data) // 2])
    assert _reason(root, f"cut.{ext}") == "image_truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # and we left it as the caller set it


def test_random_bytes_are_corrupt(root: Path) -> None:
    _write(root, "noise.jpg", np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _write(root, "empty.png", b"")
    assert _reason(root, "noise.jpg") == "image_corrupt"
    assert _reason(root, "empty.png") == "image_corrupt"


def test_damaged_pixel_data_is_corrupt(root: Path) -> None:
    data = bytearray(_encode(_noise_image(), "PNG"))
    for i in range(200, 300):  # inside the IDAT stream: zlib notices
        data[i] ^= 0x55
    _write(root, "bad.png", bytes(data))
    assert _reason(root, "bad.png") == "image_corrupt"


def test_unsupported_format_is_corrupt(root: Path) -> None:
    # EPS would make PIL run Ghostscript; such formats are never even tried.
    _write(root, "x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    assert _reason(root, "x.eps") == "image_corrupt"


@pytest.mark.parametrize("side", [100_000, 10_000])  # beyond 2x PIL's limit (error); 1x..2x (warning)
def test_decompression_bomb_header_is_too_large(root: Path, side: int) -> None:
    _write(root, "bomb.png", _png_bomb_header(side, side))
    assert (root / "bomb.png").stat().st_size < 200
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _reason(root, "bomb.png") == "image_too_large"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_max_pixels_and_max_bytes_are_checked(root: Path) -> None:
    _write(root, "a.png", _encode(_noise_image(100, 100), "PNG"))
    assert inspect_image(root, "a.png", max_pixels=100 * 100).width == 100
    assert _reason(root, "a.png", max_pixels=100 * 100 - 1) == "image_too_large"
    assert _reason(root, "a.png", max_bytes=100) == "image_too_large"


# --------------------------------------------------------------------------------------------
# files that are not there or cannot be read


def test_missing_file(root: Path) -> None:
    _write(root, "file.png", _encode(_noise_image(), "PNG"))
    assert _reason(root, "nope.png") == "image_missing"
    assert _reason(root, "no/such/dir.png") == "image_missing"
    assert _reason(root, "file.png/child.png") == "image_missing"  # a file used as a folder


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file(root: Path) -> None:
    path = _write(root, "locked.png", _encode(_noise_image(), "PNG"))
    path.chmod(0)
    try:
        assert _reason(root, "locked.png") == "image_unreadable"
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), OSError(5, "Input/output error")])
def test_os_errors_on_open_are_unreadable(root: Path, monkeypatch: pytest.MonkeyPatch, error: OSError) -> None:
    # the chmod 000 case above is skipped as root; this one reaches the same branch anywhere
    _write(root, "a.png", _encode(_noise_image(), "PNG"))

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(os, "open", refuse)
    assert _reason(root, "a.png") == "image_unreadable"


def test_directory_and_fifo_are_unreadable(root: Path) -> None:
    # these exercise image_unreadable even when the tests run as root
    (root / "dir.png").mkdir()
    assert _reason(root, "dir.png") == "image_unreadable"
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe.png")
        assert _reason(root, "pipe.png") == "image_unreadable"  # and does not block


# --------------------------------------------------------------------------------------------
# paths


@pytest.mark.parametrize(
    "relative",
    ["../x.png", "images/../../x.png", "/etc/passwd", "C:/Windows/x.png", "../../etc/passwd"],
)
def test_paths_escaping_the_root(root: Path, relative: str) -> None:
    (root.parent / "x.png").write_bytes(_encode(_noise_image(), "PNG"))  # exists, but outside
    assert _reason(root, relative) == "image_path_escapes_root"
    with pytest.raises(ImageReject):
        resolve_inside(root, relative)


def test_absolute_path_to_a_file_inside_the_root_is_still_rejected(root: Path) -> None:
    path = _write(root, "a.png", _encode(_noise_image(), "PNG"))
    assert _reason(root, str(path)) == "image_path_escapes_root"


def test_symlinks_leading_outside_the_root(root: Path) -> None:
    outside = root.parent / "outside"
    outside.mkdir()
    _write(outside, "secret.png", _encode(_noise_image(), "PNG"))
    try:
        (root / "link.png").symlink_to(outside / "secret.png")
        (root / "linkdir").symlink_to(outside, target_is_directory=True)
        (root / "dangling.png").symlink_to(outside / "gone.png")
    except OSError:
        pytest.skip("symlinks not supported here")
    assert _reason(root, "link.png") == "image_path_escapes_root"
    assert _reason(root, "linkdir/secret.png") == "image_path_escapes_root"
    assert _reason(root, "dangling.png") == "image_path_escapes_root"


def test_a_root_resolved_once_gives_every_verdict_a_root_resolved_each_time_gives(root: Path) -> None:
    """`resolved_root` (once for many images) against a plain root (resolved for each): the same
    image or the same reject and detail, for a root behind a symlink, links inside and out of it,
    '..', a missing file, a folder, a symlink loop below the root, and a root that is one itself."""
    outside = root.parent / "outside"
    outside.mkdir()
    _write(outside, "secret.png", _encode(_noise_image(), "PNG"))
    _write(root, "images/a.png", _encode(_noise_image(), "PNG"))
    try:
        (root / "link.png").symlink_to(root / "images" / "a.png")
        (root / "out.png").symlink_to(outside / "secret.png")
        (root / "outdir").symlink_to(outside, target_is_directory=True)
        (root / "loop1").symlink_to(root / "loop2")
        (root / "loop2").symlink_to(root / "loop1")
        (root.parent / "via").symlink_to(root, target_is_directory=True)
        (root.parent / "rootloop").symlink_to(root.parent / "rootloop")
    except OSError:
        pytest.skip("symlinks not supported here")
    paths = ["images/a.png", "link.png", "images/../link.png", "out.png", "outdir/secret.png",
             "../outside/secret.png", "/etc/passwd", "images/none.png", "loop1/a.png", "images"]

    def verdict(folder: Path | images.ResolvedRoot, relative: str) -> object:
        try:
            return inspect_image(folder, relative)
        except ImageReject as e:
            return (e.reason, e.detail)

    seen = {}
    for folder in (root, root.parent / "via", root.parent / "rootloop"):
        once = images.resolved_root(folder)
        assert isinstance(once, images.ResolvedRoot) == (folder.name != "rootloop")
        seen[folder.name] = [verdict(once, p) for p in paths]
        assert seen[folder.name] == [verdict(folder, p) for p in paths]
    assert seen["via"] == seen["root"]
    reasons = [v[0] if isinstance(v, tuple) else "ok" for v in seen["root"]]
    assert reasons == ["ok"] * 3 + ["image_path_escapes_root"] * 4 + ["image_missing", "image_path_invalid",
                                                                       "image_unreadable"]
    assert "cannot resolve" in seen["root"][8][1]
    # the root itself a loop: what the path alone decides first, then "cannot resolve" for each
    assert [v[0] for v in seen["rootloop"]] == ["image_path_invalid"] * 5 + ["image_path_escapes_root"] * 2 + \
        ["image_path_invalid"] * 3
    assert all("cannot resolve" in v[1] for i, v in enumerate(seen["rootloop"]) if i not in (5, 6))


@pytest.mark.parametrize("relative", ["", ".", "./", "a\x00.png", "images\\a.png", None, 3])
def test_invalid_paths(root: Path, relative) -> None:
    assert _reason(root, relative) == "image_path_invalid"


def test_resolve_inside_returns_the_real_location(root: Path) -> None:
    assert resolve_inside(root, "a/./b.png") == root.resolve() / "a" / "b.png"


# --------------------------------------------------------------------------------------------
# the exception itself


def test_image_reject_is_structured_and_picklable() -> None:
    e = ImageReject("image_corrupt", "bad bytes")
    assert (e.reason, e.detail) == ("image_corrupt", "bad bytes")
    copy = pickle.loads(pickle.dumps(e))
    assert (copy.reason, copy.detail) == (e.reason, e.detail)
    with pytest.raises(ValueError):
        ImageReject("image_wobbly", "not a reason")
