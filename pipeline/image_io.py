"""Decoding untrusted user images into RGB arrays, and encoding results without metadata.

Every input arrives from a stranger (a chat upload, a file on disk), so decoding is
defensive: sizes are checked before any pixel is allocated, the pixel data is decoded in
full so that truncation is noticed, and every failure becomes an ``ImageError`` whose text
can be shown to the user as is. Outputs are built from bare pixels, because the whole point
of the tool is anonymity: a face swap is worthless if the file still carries the camera's
GPS position.
"""

from __future__ import annotations

import io
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageError", "ImageLimits", "encode_image", "load_image", "save_image"]

# Restricting the decoders keeps exotic plugins (EPS hands the file to Ghostscript, for one)
# away from untrusted data. Multi-picture JPEGs from phones open through the JPEG factory.
_READABLE_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")
_NOT_AN_IMAGE = (
    "The file is not an image we can read (PNG, JPEG, WebP, TIFF, BMP, GIF; HEIC is not supported)"
)
_CORRUPT = "The image data is truncated or corrupt"
_UNREADABLE = "The file could not be read"

_SUFFIX_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageError(ValueError):
    """An input image was refused; ``str(error)`` is written for the end user."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 60 * 2**20
    max_pixels: int = 100_000_000
    max_side: int = 30_000


def load_image(
    source: str | os.PathLike[str] | bytes | bytearray, limits: ImageLimits = ImageLimits()
) -> np.ndarray:
    """Decode ``source`` (a path, or the file's bytes) into an upright H x W x 3 RGB uint8 array."""
    data = _read_source(source, limits)
    if not data:
        raise ImageError("The file is empty")
    if len(data) > limits.max_bytes:
        raise ImageError(_file_too_large(len(data), limits))
    return _decode(data, limits)


def encode_image(image_rgb: np.ndarray, fmt: str = "JPEG", quality: int = 92) -> bytes:
    """Encode an H x W x 3 RGB uint8 array as JPEG, PNG or WebP bytes carrying no metadata."""
    fmt = fmt.upper()
    if fmt not in ("JPEG", "PNG", "WEBP"):
        raise ValueError(f"unsupported output format {fmt!r}; use JPEG, PNG or WEBP")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be between 1 and 100, got {quality}")
    if not (
        isinstance(image_rgb, np.ndarray)
        and image_rgb.dtype == np.uint8
        and image_rgb.ndim == 3
        and image_rgb.shape[2] == 3
    ):
        raise ValueError("image_rgb must be an H x W x 3 uint8 array")

    # A fresh image has an empty ``info``; the explicit empty options are a second guard, in
    # case a future Pillow starts defaulting any of them from somewhere else.
    image = Image.fromarray(np.ascontiguousarray(image_rgb))
    no_metadata: dict[str, object] = {"exif": b"", "icc_profile": b""}
    if fmt == "JPEG":
        options = {**no_metadata, "quality": quality, "comment": b"", "xmp": b""}
    elif fmt == "PNG":
        options = {**no_metadata, "pnginfo": None}
    else:
        options = {**no_metadata, "quality": quality, "xmp": b""}
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def save_image(image_rgb: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write ``image_rgb`` to ``path`` (format from the suffix), replacing any file atomically."""
    target = Path(path)
    fmt = _SUFFIX_FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot tell the image format from {target.name!r}; use .jpg, .png or .webp"
        )
    data = encode_image(image_rgb, fmt)

    # A reader of ``target`` must see either the old file or the complete new one, never a
    # half-written image, so the bytes go to a sibling first (same file system, so
    # os.replace is atomic). Mode 0o666 leaves the permissions to the umask, as open() would;
    # tempfile.mkstemp would make every output private to its owner.
    temp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _read_source(source: str | os.PathLike[str] | bytes | bytearray, limits: ImageLimits) -> bytes:
    # Reading the whole file up front means no handle outlives this call, however Pillow's
    # lazy loading behaves, and the size limit is enforced on what was actually read.
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or bytes, not {type(source).__name__}")
    try:
        # O_NONBLOCK so that a FIFO given as the path cannot hang the open; it is then refused
        # below, like any other file that is not a regular one. Regular files ignore the flag,
        # and Windows, which lacks it, has no FIFOs to open by path.
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ImageError(_UNREADABLE)
            if info.st_size > limits.max_bytes:
                raise ImageError(_file_too_large(info.st_size, limits))
            # One byte past the limit reveals a file that grew after fstat.
            return file.read(limits.max_bytes + 1)
    except OSError as exc:
        raise ImageError(_UNREADABLE) from exc


def _decode(data: bytes, limits: ImageLimits) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data), formats=_READABLE_FORMATS) as image:
            _check_dimensions(image.size, limits)
            image.load()
            # In place, because an upright image would otherwise be copied for nothing.
            ImageOps.exif_transpose(image, in_place=True)
            return _to_rgb(image)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(_NOT_AN_IMAGE) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow refused from the header alone (the warning arrives as an exception only
        # where warnings are made errors); its own message names internals.
        raise ImageError(
            f"The image is too large; the limit is {_megapixels(limits)} megapixels"
        ) from exc
    except Exception as exc:
        # Hostile or damaged files make Pillow's decoders fail in many ways (OSError,
        # SyntaxError, EOFError, struct.error, ValueError, ...); to the user they are one case.
        raise ImageError(_CORRUPT) from exc


def _check_dimensions(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width > limits.max_side or height > limits.max_side:
        raise ImageError(
            f"The image is too large: {width} x {height} pixels; "
            f"the limit is {limits.max_side} pixels per side"
        )
    if width * height > limits.max_pixels:
        raise ImageError(
            f"The image is too large: {width} x {height} pixels; "
            f"the limit is {_megapixels(limits)} megapixels"
        )


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion to "L" clips at 255, turning most of a 16-bit photo white;
        # 257 maps 0..65535 exactly onto 0..255. Mode "I" gets the same scale, as that is
        # how Pillow hands over 16-bit samples from some files.
        wide = np.asarray(image).astype(np.int64)
        gray = np.clip((wide + 128) // 257, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # The detector and the output both use these RGB pixels, so they must be what a
        # viewer sees: flattened onto white, a half-transparent face is visible to the
        # detector, and nothing hidden behind transparency survives into the output.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    # np.asarray would give a read-only view, and later stages draw into the array.
    return np.array(image)


def _megapixels(limits: ImageLimits) -> str:
    return f"{limits.max_pixels / 1e6:g}"


def _file_too_large(size: int, limits: ImageLimits) -> str:
    return (
        f"The file is too large: {_human_bytes(size)}; "
        f"the limit is {_human_bytes(limits.max_bytes)}"
    )


def _human_bytes(count: int) -> str:
    for scale, unit in ((2**30, "GB"), (2**20, "MB"), (2**10, "KB")):
        if count >= scale:
            return f"{count / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{count} bytes"
