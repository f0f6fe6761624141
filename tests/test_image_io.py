"""Tests for pipeline.image_io: hostile and odd inputs, and metadata-free outputs.

Every input is a real file built here with Pillow (or OpenCV, for 16-bit colour PNGs, which
Pillow cannot write), so the tests exercise the actual decoders rather than mocks.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms, ImageFile

from pipeline import image_io
from pipeline.image_io import ImageError, ImageLimits, encode_image, load_image, save_image

RED = (220, 20, 30)
GREEN = (20, 200, 40)
BLUE = (30, 40, 210)
WHITE = (255, 255, 255)


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _blank_one_bit_png(width: int, height: int) -> bytes:
    """A genuine, decodable all-black 1-bit PNG, built without holding its pixels in memory."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    rows_per_block = max(1, 2**20 // len(row))
    compressor = zlib.compressobj(1)
    parts = []
    for first in range(0, height, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, height - first)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every pixel decode that goes through Pillow's generic ImageFile.load."""
    calls: list[str] = []
    original = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        calls.append(self.format or "?")
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


def _assert_refused(
    source: str | os.PathLike[str] | bytes, *fragments: str, limits: ImageLimits = ImageLimits()
) -> str:
    with pytest.raises(ImageError) as info:
        load_image(source, limits)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    assert "Traceback" not in message and "PIL" not in message
    return message


# --- bad inputs -------------------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    _assert_refused(_write(tmp_path / "empty.jpg", b""), "The file is empty")


def test_zero_bytes_given_directly() -> None:
    _assert_refused(b"", "The file is empty")


def test_missing_file_does_not_leak_the_path(tmp_path: Path) -> None:
    path = tmp_path / "secret_folder" / "nope.jpg"
    message = _assert_refused(path, "The file could not be read")
    assert "secret_folder" not in message


def test_directory_is_refused(tmp_path: Path) -> None:
    _assert_refused(tmp_path, "The file could not be read")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    _assert_refused(fifo, "The file could not be read")


def test_random_bytes(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    _assert_refused(_write(tmp_path / "noise.jpg", data), "not an image we can read")


def test_text_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "notes.png", b"Meeting at noon.\nBring the photos.\n" * 20)
    _assert_refused(path, "not an image we can read")


def test_heic_is_named_as_unsupported() -> None:
    heic_start = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic" + bytes(200)
    _assert_refused(heic_start, "not an image we can read", "HEIC is not supported")


def test_formats_outside_the_allowed_list_are_refused() -> None:
    ppm = _encode(Image.new("RGB", (8, 8), RED), "PPM")
    assert Image.open(io.BytesIO(ppm)).format == "PPM"  # Pillow itself would read it
    _assert_refused(ppm, "not an image we can read")


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = _encode(Image.fromarray(_noise(128, 128)), "JPEG", quality=90)
    _assert_refused(_write(tmp_path / "half.jpg", data[: len(data) // 2]), "truncated or corrupt")


def test_truncated_png(tmp_path: Path) -> None:
    data = _encode(Image.fromarray(_noise(128, 128)), "PNG")
    _assert_refused(_write(tmp_path / "half.png", data[: len(data) // 2]), "truncated or corrupt")


def test_corrupt_png_data() -> None:
    data = bytearray(_encode(Image.fromarray(_noise(128, 128)), "PNG"))
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(16)
    _assert_refused(bytes(data), "truncated or corrupt")


def test_decompression_bomb_is_refused_from_the_header(
    tmp_path: Path, decode_calls: list[str]
) -> None:
    # 40000 x 40000 = 1.6 gigapixels, about 5 GB as RGB, in a file under a megabyte.
    path = _write(tmp_path / "bomb.png", _blank_one_bit_png(40_000, 40_000))
    assert path.stat().st_size < 2**20
    start = time.perf_counter()
    _assert_refused(path, "The image is too large", "100 megapixels")
    assert time.perf_counter() - start < 1.0
    assert decode_calls == []


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_over_our_pixel_limit_but_under_pillows_is_refused_before_decoding(
    decode_calls: list[str],
) -> None:
    # 120 megapixels: Pillow only warns at this size, so the refusal must be ours.
    bomb = _blank_one_bit_png(12_000, 10_000)
    message = _assert_refused(bomb, "12000 x 10000 pixels", "100 megapixels")
    assert message == "The image is too large: 12000 x 10000 pixels; the limit is 100 megapixels"
    assert decode_calls == []


def test_decode_spy_sees_normal_decodes(decode_calls: list[str]) -> None:
    # Control for the two tests above: the spy does observe a decode when there is one.
    load_image(_encode(Image.new("RGB", (8, 8), RED), "PNG"))
    assert "PNG" in decode_calls


def test_custom_pixel_and_side_limits() -> None:
    png = _encode(Image.new("RGB", (200, 50), RED), "PNG")
    few_pixels, short_sides = ImageLimits(max_pixels=5_000), ImageLimits(max_side=150)
    _assert_refused(png, "200 x 50 pixels", "0.005 megapixels", limits=few_pixels)
    _assert_refused(png, "200 x 50 pixels", "150 pixels per side", limits=short_sides)
    assert load_image(png, ImageLimits(max_pixels=10_000, max_side=200)).shape == (50, 200, 3)


def test_file_above_max_bytes(tmp_path: Path) -> None:
    data = _encode(Image.fromarray(_noise(64, 64)), "PNG")
    assert len(data) > 5_000
    path = _write(tmp_path / "big.png", data)
    small = ImageLimits(max_bytes=5_000)
    _assert_refused(path, "The file is too large", "the limit is 4.9 KB", limits=small)
    _assert_refused(data, "The file is too large", "the limit is 4.9 KB", limits=small)
    assert load_image(path, ImageLimits(max_bytes=len(data))).shape == (64, 64, 3)


def test_huge_file_is_refused_by_size_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.jpg"
    with path.open("wb") as file:  # sparse: 100 GB declared, nothing written
        file.truncate(100 * 2**30)
    start = time.perf_counter()
    _assert_refused(path, "The file is too large: 100 GB; the limit is 60 MB")
    assert time.perf_counter() - start < 1.0


# --- odd but valid inputs -------------------------------------------------------------


def _assert_rgb_array(result: np.ndarray, height: int, width: int) -> None:
    assert result.dtype == np.uint8
    assert result.shape == (height, width, 3)
    assert result.flags.c_contiguous
    assert result.flags.writeable


def _two_frames(fmt: str) -> bytes:
    first = Image.new("RGB", (16, 12), RED)
    second = Image.new("RGB", (16, 12), BLUE)
    options: dict[str, object] = {
        "save_all": True,
        "append_images": [second],
        "duration": 100,
        "loop": 0,
    }
    if fmt == "WEBP":
        options["lossless"] = True
    return _encode(first, fmt, **options)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_image_gives_first_frame(fmt: str) -> None:
    data = _two_frames(fmt)
    with Image.open(io.BytesIO(data)) as source:
        assert source.n_frames == 2
    result = load_image(data)
    _assert_rgb_array(result, 12, 16)
    assert np.abs(result.astype(int) - RED).max() <= 2


def test_multi_picture_jpeg_gives_first_picture() -> None:
    first, second = Image.new("RGB", (16, 8), RED), Image.new("RGB", (16, 8), BLUE)
    data = _encode(first, "MPO", save_all=True, append_images=[second], quality=95)
    with Image.open(io.BytesIO(data)) as source:
        assert source.format == "MPO" and source.n_frames == 2
    assert np.abs(load_image(data).astype(int) - RED).max() <= 3


def test_cmyk_jpeg_becomes_red() -> None:
    data = _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as source:
        assert source.mode == "CMYK"
    result = load_image(data)
    _assert_rgb_array(result, 16, 16)
    red, green, blue = result.reshape(-1, 3).mean(axis=0)
    assert red > 220 and green < 35 and blue < 35


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped() -> None:
    # 65280 and 200 tell proper scaling (divide by 257, round) from taking the high byte.
    values = np.array([[65535, 32896, 25700, 65280, 200, 0]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    with Image.open(io.BytesIO(data)) as source:
        assert source.mode == "I;16"
    result = load_image(data)
    _assert_rgb_array(result, 1, 6)
    assert result[0, :, 0].tolist() == [255, 128, 100, 254, 1, 0]
    assert (result == result[:, :, :1]).all()  # gray stays gray


def test_thirty_two_bit_integer_tiff_uses_the_sixteen_bit_scale() -> None:
    values = np.array([[65535, 32896, 0]], dtype=np.int32)
    data = _encode(Image.fromarray(values), "TIFF")
    with Image.open(io.BytesIO(data)) as source:
        assert source.mode == "I"
    assert load_image(data)[0, :, 1].tolist() == [255, 128, 0]


def test_sixteen_bit_rgb_png() -> None:
    rgb16 = np.zeros((3, 5, 3), dtype=np.uint16)
    rgb16[:] = (65535, 32896, 25700)
    ok, encoded = cv2.imencode(".png", rgb16[:, :, ::-1])  # OpenCV writes BGR
    assert ok
    data = encoded.tobytes()
    assert data[24] == 16  # IHDR bit depth: a genuine 16-bit file
    result = load_image(data)
    _assert_rgb_array(result, 3, 5)
    assert result[1, 2].tolist() == [255, 128, 100]


def test_grayscale_l() -> None:
    result = load_image(_encode(Image.new("L", (7, 5), 77), "PNG"))
    _assert_rgb_array(result, 5, 7)
    assert (result == 77).all()


def test_one_bit_image() -> None:
    image = Image.new("1", (8, 2), 0)
    image.putpixel((3, 1), 1)
    result = load_image(_encode(image, "PNG"))
    _assert_rgb_array(result, 2, 8)
    assert result[1, 3].tolist() == [255, 255, 255]
    assert result.sum() == 3 * 255


def test_rgba_transparency_is_flattened_onto_white() -> None:
    pixels = np.zeros((4, 6, 4), dtype=np.uint8)
    pixels[:, :2] = (*GREEN, 0)  # hidden content under full transparency
    pixels[:, 2:4] = (0, 0, 0, 128)  # half-transparent black
    pixels[:, 4:] = (*RED, 255)
    result = load_image(_encode(Image.fromarray(pixels), "PNG"))
    _assert_rgb_array(result, 4, 6)
    assert (result[:, :2] == WHITE).all()
    assert (np.abs(result[:, 2:4].astype(int) - 127) <= 1).all()
    assert (result[:, 4:] == RED).all()


def test_la_transparency_is_flattened_onto_white() -> None:
    pixels = np.zeros((2, 4, 2), dtype=np.uint8)
    pixels[:, :2] = (40, 0)
    pixels[:, 2:] = (40, 255)
    result = load_image(_encode(Image.fromarray(pixels, mode="LA"), "PNG"))
    assert (result[:, :2] == 255).all()
    assert (result[:, 2:] == 40).all()


def test_palette_with_transparency() -> None:
    image = Image.new("P", (6, 2), 0)
    image.putpalette([0, 0, 0, *BLUE])
    image.paste(1, (3, 0, 6, 2))
    data = _encode(image, "PNG", transparency=0)
    with Image.open(io.BytesIO(data)) as source:
        assert source.mode == "P" and source.info["transparency"] == 0
    result = load_image(data)
    assert (result[:, :3] == WHITE).all()
    assert (result[:, 3:] == BLUE).all()


def _scene() -> np.ndarray:
    """A non-square image with four different quadrants: every rotation and flip shows."""
    scene = np.empty((32, 48, 3), dtype=np.uint8)
    scene[:16, :24] = RED
    scene[:16, 24:] = GREEN
    scene[16:, :24] = BLUE
    scene[16:, 24:] = WHITE
    return scene


# How a camera stores an upright scene under each EXIF orientation (EXIF 2.3, tag 274):
# the tag says where the stored rows and columns belong, e.g. 6 = "row 0 is the visual
# right side, column 0 is the visual top", i.e. the scene was stored turned a quarter
# counter-clockwise.
_STORE_AS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, 1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", sorted(_STORE_AS))
def test_exif_orientation(orientation: int, fmt: str) -> None:
    scene = _scene()
    stored = np.ascontiguousarray(_STORE_AS[orientation](scene))
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[ExifTags.Base.Orientation] = orientation
    options: dict[str, object] = {"exif": exif}
    if fmt == "JPEG":
        options |= {"quality": 95, "subsampling": 0}
    result = load_image(_encode(image, fmt, **options))
    _assert_rgb_array(result, *scene.shape[:2])
    error = np.abs(result.astype(int) - scene.astype(int))
    if fmt == "PNG":
        assert error.max() == 0
    else:
        assert error.mean() < 3


def test_bytes_and_path_give_the_same_result(tmp_path: Path) -> None:
    scene = _scene()
    image = Image.fromarray(np.ascontiguousarray(_STORE_AS[6](scene)))
    exif = image.getexif()
    exif[ExifTags.Base.Orientation] = 6
    data = _encode(image, "JPEG", exif=exif, quality=90)
    path = _write(tmp_path / "photo.jpg", data)
    from_path = load_image(path)
    assert from_path.shape == scene.shape
    np.testing.assert_array_equal(load_image(str(path)), from_path)
    np.testing.assert_array_equal(load_image(data), from_path)
    np.testing.assert_array_equal(load_image(bytearray(data)), from_path)


def _open_fds_pointing_at(path: Path) -> list[str]:
    fd_dir = Path("/proc/self/fd")
    found = []
    for entry in fd_dir.iterdir():
        try:
            if Path(os.readlink(entry)) == path.resolve():
                found.append(entry.name)
        except OSError:
            continue  # the fd listing itself closes while we iterate
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
def test_file_is_closed_after_load(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.png", _encode(Image.new("RGB", (8, 8), RED), "PNG"))
    data = _encode(Image.fromarray(_noise(64, 64)), "PNG")
    bad = _write(tmp_path / "bad.png", data[: len(data) // 2])
    with good.open("rb") as witness:  # control: an open handle is detected
        assert _open_fds_pointing_at(good) == [str(witness.fileno())]
    load_image(good)
    assert _open_fds_pointing_at(good) == []
    with pytest.raises(ImageError):
        load_image(bad)
    assert _open_fds_pointing_at(bad) == []


def test_wrong_source_type() -> None:
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]


# --- outputs ------------------------------------------------------------------------------

_CAMERA_MAKE = "SnoopCam Industries"
_COMMENT = b"shot at home, 12 Elm Street"
_XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/">'
    b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:creator="Jane Doe"/>'
    b"</rdf:RDF></x:xmpmeta>"
)
_MAP_DATUM = "WGS-84"
# Byte strings the metadata leaves in a file. EXIF names its tags by number, so the GPS IFD
# is traced by a value stored in it; b"GPS" itself is only checked for in outputs.
_TRACES = (
    b"Exif",
    _CAMERA_MAKE.encode(),
    _MAP_DATUM.encode(),
    b"ICC_PROFILE",
    b"http://ns.adobe.com",
    b"xmpmeta",
    _COMMENT,
)


@pytest.fixture
def photo_with_metadata() -> bytes:
    """A JPEG carrying camera make, GPS position, an ICC profile, XMP and a comment."""
    image = Image.fromarray(_noise(48, 64, seed=3))
    exif = image.getexif()
    exif[ExifTags.Base.Make] = _CAMERA_MAKE
    exif[ExifTags.Base.Model] = "Model X"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 22.0, 7.5)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (4.0, 53.0, 41.2)
    gps[ExifTags.GPS.GPSMapDatum] = _MAP_DATUM
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = _encode(
        image, "JPEG", exif=exif, icc_profile=icc, xmp=_XMP, comment=_COMMENT, quality=95
    )

    # The source really carries everything the output must not.
    with Image.open(io.BytesIO(data)) as source:
        assert source.getexif()[ExifTags.Base.Make] == _CAMERA_MAKE
        assert source.getexif().get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] == "N"
        assert source.info["icc_profile"] == icc
        assert source.info["comment"] == _COMMENT
        assert b"Jane Doe" in source.info["xmp"]
    for trace in _TRACES:
        assert trace in data
    return data


def _jpeg_markers(data: bytes) -> list[int]:
    """The marker codes of the segments before the entropy-coded scan."""
    assert data[:2] == b"\xff\xd8"
    markers, pos = [], 2
    while True:
        marker = data[pos + 1]
        markers.append(marker)
        if marker == 0xDA:  # start of scan: the rest is pixel data
            return markers
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        pos += 2 + length


def _png_chunks(data: bytes) -> list[bytes]:
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return chunks


def _webp_chunks(data: bytes) -> list[bytes]:
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    chunks, pos = [], 12
    while pos < len(data):
        kind = data[pos : pos + 4]
        (length,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        chunks.append(kind)
        pos += 8 + length + (length & 1)
    return chunks


def _assert_no_metadata(data: bytes) -> None:
    for trace in (*_TRACES, b"GPS"):
        assert trace not in data
    with Image.open(io.BytesIO(data)) as output:
        assert len(output.getexif()) == 0
        metadata_keys = {"exif", "icc_profile", "xmp", "XML:com.adobe.xmp", "comment", "dpi"}
        assert not metadata_keys & set(output.info)


def test_jpeg_output_has_no_metadata(photo_with_metadata: bytes) -> None:
    data = encode_image(load_image(photo_with_metadata))
    _assert_no_metadata(data)
    # Only JFIF (APP0), quantisation and Huffman tables and the frame header: no APP1
    # (EXIF, XMP), APP2 (ICC), APP13 (Photoshop) or COM segment.
    assert set(_jpeg_markers(data)) <= {0xE0, 0xDB, 0xC4, 0xC0, 0xDA}


def test_png_output_has_no_metadata(photo_with_metadata: bytes) -> None:
    data = encode_image(load_image(photo_with_metadata), "PNG")
    _assert_no_metadata(data)
    assert set(_png_chunks(data)) == {b"IHDR", b"IDAT", b"IEND"}


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".png", ".webp"])
def test_saved_file_has_no_metadata(
    photo_with_metadata: bytes, tmp_path: Path, suffix: str
) -> None:
    target = tmp_path / f"out{suffix}"
    save_image(load_image(photo_with_metadata), target)
    data = target.read_bytes()
    _assert_no_metadata(data)
    expected_format = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[suffix]
    with Image.open(target) as output:
        assert output.format == expected_format
    if suffix == ".webp":
        assert set(_webp_chunks(data)) <= {b"VP8 ", b"VP8L"}


def test_png_round_trip_is_pixel_exact() -> None:
    pixels = _noise(37, 53, seed=4)
    np.testing.assert_array_equal(load_image(encode_image(pixels, "PNG")), pixels)


def test_encode_accepts_non_contiguous_views() -> None:
    pixels = _noise(20, 30, seed=5)
    mirrored = pixels[:, ::-1]
    np.testing.assert_array_equal(load_image(encode_image(mirrored, "png")), mirrored)


def test_jpeg_quality_is_applied() -> None:
    pixels = _noise(64, 64, seed=6)
    low, high = encode_image(pixels, quality=30), encode_image(pixels, quality=95)
    assert len(low) < 0.7 * len(high)
    def error(data: bytes) -> float:
        return float(np.abs(load_image(data).astype(int) - pixels).mean())

    assert error(high) < error(low)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4), np.uint8),
        np.zeros((4, 4, 4), np.uint8),
        np.zeros((4, 4, 3), np.float32),
    ],
    ids=["2d", "rgba", "float"],
)
def test_encode_rejects_non_rgb_arrays(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        encode_image(bad, "PNG")


def test_encode_rejects_unknown_format_and_quality() -> None:
    pixels = _noise(4, 4)
    with pytest.raises(ValueError, match="unsupported output format"):
        encode_image(pixels, "GIF")
    with pytest.raises(ValueError, match="quality"):
        encode_image(pixels, quality=0)


def _listing(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir())


def test_save_image_replaces_atomically_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "result.png"
    target.write_bytes(b"old contents")
    pixels = _noise(16, 16, seed=7)
    save_image(pixels, target)
    assert _listing(tmp_path) == ["result.png"]
    np.testing.assert_array_equal(load_image(target), pixels)


def test_save_image_respects_the_umask(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        save_image(_noise(4, 4), tmp_path / "shared.png")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "shared.png").stat().st_mode) == 0o644


@pytest.fixture
def failing_replace(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    attempts: list[tuple[str, str]] = []

    def refuse(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        attempts.append((os.fspath(src), os.fspath(dst)))
        raise OSError("disk full")

    monkeypatch.setattr(image_io.os, "replace", refuse)
    return attempts


def test_failed_save_keeps_the_old_file_and_cleans_up(
    tmp_path: Path, failing_replace: list[tuple[str, str]]
) -> None:
    target = tmp_path / "result.jpg"
    target.write_bytes(b"old contents")
    with pytest.raises(OSError, match="disk full"):
        save_image(_noise(16, 16), target)
    [(temp, destination)] = failing_replace
    assert Path(temp).parent == tmp_path and Path(temp) != target  # a sibling was used
    assert destination == str(target)
    assert target.read_bytes() == b"old contents"
    assert _listing(tmp_path) == ["result.jpg"]


def test_save_image_refuses_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=".jpg, .png or .webp"):
        save_image(_noise(4, 4), tmp_path / "out.bmp")
    assert _listing(tmp_path) == []
