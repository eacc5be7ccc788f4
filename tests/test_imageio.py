"""Image input boundary: every fixture is generated on the fly in tmp_path."""

from __future__ import annotations

import base64
import dataclasses
import io
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile, JpegImagePlugin

from agent.imageio import DEFAULT_MAX_PIXELS, ImageInputError, LoadedImage, image_to_png_bytes, load_image, thumbnail_data_uri

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BOMB = 20000


# ------------------------------------------------------------------ helpers


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(w: int, h: int, depth: int, colour: int, raw: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
    )


def _bomb_png() -> bytes:
    # Header claims 20000x20000 RGB (1.2 GB decoded); the body is a few bytes.
    return _png(BOMB, BOMB, 8, 2, b"\x00" * 64)


def _bomb_jpeg() -> bytes:
    sof = b"\x08" + struct.pack(">HH", BOMB, BOMB) + b"\x03" + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    app0 = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return (
        b"\xff\xd8"
        + b"\xff\xe0" + struct.pack(">H", len(app0) + 2) + app0
        + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof
        + b"\xff\xd9"
    )


def _save(tmp_path: Path, im: Image.Image, name: str, **kw) -> Path:
    p = tmp_path / name
    im.save(p, **kw)
    return p


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _px(r: LoadedImage, xy) -> tuple[int, ...]:
    return r.image.getpixel(xy)


def _close(a, b, tol=8) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def _assert_clean(r: LoadedImage) -> None:
    assert r.image.mode == "RGB"
    assert r.image.info == {}
    assert len(r.image.getexif()) == 0
    assert isinstance(r.warnings, tuple)


@pytest.fixture(autouse=True)
def _pil_globals_untouched():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    yield
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


# ------------------------------------------------------------------ accepted inputs


def test_plain_rgb_png(tmp_path):
    im = _noise(64, 48)
    r = load_image(_save(tmp_path, im, "a.png"))
    _assert_clean(r)
    assert r.format == "PNG" and r.original_mode == "RGB"
    assert r.original_size == (64, 48) and r.size == (64, 48)
    assert np.array_equal(np.asarray(r.image), np.asarray(im))
    assert r.warnings == ()
    assert r.source.endswith("a.png")


def test_16bit_grey_png_scales_full_range_not_clipping(tmp_path):
    grad = np.linspace(0, 65535, 256).round().astype(np.uint16)[None, :].repeat(8, axis=0)
    p = _save(tmp_path, Image.fromarray(grad), "g16.png")
    r = load_image(p)
    _assert_clean(r)
    a = np.asarray(r.image)
    assert r.original_mode.startswith("I;16")
    assert a[0, 0].tolist() == [0, 0, 0]
    assert a[0, -1].tolist() == [255, 255, 255]
    # Monotone and spread over the whole range: clipping would make almost everything 255.
    row = a[0, :, 0].astype(int)
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 200
    assert abs(int(a[0, 128, 0]) - round(int(grad[0, 128]) / 257)) <= 1
    assert "16-bit image scaled to 8-bit" in r.warnings


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_16bit_pil_modes_in_memory(dtype):
    a = np.array([[0, 257 * 128, 65535]], dtype=dtype)
    im = Image.fromarray(a)
    assert im.mode.startswith("I;16")
    r = load_image(im)
    assert np.asarray(r.image)[0, :, 0].tolist() == [0, 128, 255]


def test_mode_I_holding_16bit_values():
    im = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32))
    assert im.mode == "I"
    r = load_image(im)
    assert np.asarray(r.image)[0, :, 0].tolist() == [0, 128, 255]


def test_16bit_rgb_png(tmp_path):
    row = np.full((5, 3), [65535, 0, 32896], dtype=">u2").tobytes()
    p = tmp_path / "rgb16.png"
    p.write_bytes(_png(5, 4, 16, 2, b"".join(b"\x00" + row for _ in range(4))))
    r = load_image(p)
    assert _close(_px(r, (0, 0)), (255, 0, 128), tol=1)
    assert "16-bit image scaled to 8-bit" in r.warnings


def test_cmyk_jpeg_red_becomes_rgb_red(tmp_path):
    p = _save(tmp_path, Image.new("CMYK", (48, 40), (0, 255, 255, 0)), "cmyk.jpg", quality=95)
    r = load_image(p)
    _assert_clean(r)
    assert r.original_mode == "CMYK"
    assert _close(_px(r, (24, 20)), (255, 0, 0), tol=12)


def test_rgba_transparent_becomes_white_and_partial_blends(tmp_path):
    im = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    im.paste((255, 0, 0, 255), (0, 0, 20, 40))
    im.paste((0, 0, 255, 128), (20, 0, 30, 40))
    r = load_image(_save(tmp_path, im, "a.png"))
    _assert_clean(r)
    assert _px(r, (35, 5)) == (255, 255, 255)
    assert _px(r, (5, 5)) == (255, 0, 0)
    assert _close(_px(r, (25, 5)), (127, 127, 255), tol=2)
    assert "alpha channel composited on white" in r.warnings


def test_opaque_alpha_gives_no_warning():
    r = load_image(Image.new("RGBA", (40, 40), (10, 20, 30, 255)))
    assert "alpha channel composited on white" not in r.warnings
    assert _px(r, (0, 0)) == (10, 20, 30)


def test_la_grey_with_alpha(tmp_path):
    im = Image.new("LA", (40, 40), (0, 0))
    im.paste((100, 255), (0, 0, 20, 40))
    r = load_image(_save(tmp_path, im, "la.png"))
    assert _px(r, (5, 5)) == (100, 100, 100)
    assert _px(r, (30, 5)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_with_transparency(tmp_path, fmt):
    im = Image.new("P", (40, 40), 0)
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0, 0, 0] * 253)
    im.paste(1, (10, 0, 20, 40))
    im.paste(2, (20, 0, 30, 40))
    p = _save(tmp_path, im, f"p.{fmt}", transparency=2)
    r = load_image(p)
    _assert_clean(r)
    assert r.original_mode == "P"
    assert _px(r, (5, 5)) == (255, 0, 0)
    assert _px(r, (15, 5)) == (0, 255, 0)
    assert _px(r, (25, 5)) == (255, 255, 255)  # the transparent index
    assert "alpha channel composited on white" in r.warnings


def test_palette_without_transparency(tmp_path):
    im = Image.new("P", (40, 40), 0)
    im.putpalette([12, 34, 56] + [0, 0, 0] * 255)
    r = load_image(_save(tmp_path, im, "p.png"))
    assert _px(r, (1, 1)) == (12, 34, 56)
    assert r.warnings == ()


@pytest.mark.parametrize("mode,value,expected", [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255))])
def test_grey_and_bilevel(tmp_path, mode, value, expected):
    r = load_image(_save(tmp_path, Image.new(mode, (40, 40), value), "g.png"))
    _assert_clean(r)
    assert r.original_mode == mode
    assert _px(r, (3, 3)) == expected


def _exif_with_gps(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "TestCam"
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (52.0, 22.0, 1.5)
    gps[3] = "E"
    gps[4] = (4.0, 53.0, 2.25)
    return exif


@pytest.mark.parametrize(
    "orientation,size,corner",
    [
        (1, (40, 20), "top-left"),
        (3, (40, 20), "bottom-right"),
        (6, (20, 40), "top-right"),
        (8, (20, 40), "bottom-left"),
    ],
)
def test_exif_orientation_applied_and_exif_gps_stripped(tmp_path, orientation, size, corner):
    im = Image.new("RGB", (40, 20), (255, 255, 255))
    im.paste((255, 0, 0), (0, 0, 6, 6))  # marker in the stored top-left corner
    p = _save(tmp_path, im, "o.jpg", exif=_exif_with_gps(orientation), quality=95)
    src = Image.open(p)
    assert src.getexif().get_ifd(0x8825)  # the fixture really carries GPS
    src.close()

    r = load_image(p)
    _assert_clean(r)
    assert r.size == size and r.original_size == size
    w, h = size
    at = {"top-left": (2, 2), "top-right": (w - 3, 2), "bottom-left": (2, h - 3), "bottom-right": (w - 3, h - 3)}
    assert _close(_px(r, at[corner]), (255, 0, 0), tol=40)
    for name, xy in at.items():
        if name != corner:
            assert _close(_px(r, xy), (255, 255, 255), tol=40)
    assert ("EXIF orientation applied" in r.warnings) == (orientation != 1)
    assert b"GPS" not in image_to_png_bytes(r) and b"Exif" not in image_to_png_bytes(r)


def test_metadata_never_carried(tmp_path):
    im = _noise(40, 40)
    im.info["xmp"] = b"<x:xmpmeta>secret</x:xmpmeta>"
    p = _save(
        tmp_path, im, "m.png", exif=_exif_with_gps(1), icc_profile=ImageCms.ImageCmsProfile(
            ImageCms.createProfile("sRGB")).tobytes()
    )
    r = load_image(p)
    _assert_clean(r)
    assert "icc_profile" not in r.image.info
    assert r.warnings == ()  # an sRGB profile is a no-op


def test_srgb_icc_profile_does_not_change_pixels(tmp_path):
    im = _noise(40, 40)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    a = load_image(_save(tmp_path, im, "icc.png", icc_profile=icc))
    b = load_image(_save(tmp_path, im, "plain.png"))
    assert a.sha256 == b.sha256


def test_broken_icc_profile_is_ignored_with_warning(tmp_path):
    r = load_image(_save(tmp_path, _noise(40, 40), "bad.png", icc_profile=b"not a profile"))
    assert any("ICC" in w for w in r.warnings)
    _assert_clean(r)


def test_very_small_image_accepted_with_warning(tmp_path):
    r = load_image(_save(tmp_path, Image.new("RGB", (12, 9), (1, 2, 3)), "tiny.png"))
    assert r.size == (12, 9)
    assert "very small image (12x9 px): results are unreliable" in r.warnings
    assert load_image(Image.new("RGB", (1, 1))).size == (1, 1)
    assert not any("very small" in w for w in load_image(Image.new("RGB", (32, 32))).warnings)


def test_large_jpeg_downscaled_via_draft(tmp_path, monkeypatch):
    p = _save(tmp_path, _noise(3000, 1500), "big.jpg", quality=80)
    drafts = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real(self, mode, size)
        drafts.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    r = load_image(p, max_side=700)
    assert r.size == (700, 350)
    assert r.original_size == (3000, 1500)
    # libjpeg decoded at reduced scale (1/4 -> 750x375), never at full size.
    assert drafts and drafts[0][1] == (750, 375)


def test_large_png_downscaled_keeping_aspect(tmp_path):
    r = load_image(_save(tmp_path, _noise(2500, 1000), "big.png"), max_side=500)
    assert r.size == (500, 200) and r.original_size == (2500, 1000)


def test_default_max_side_is_2048():
    r = load_image(Image.new("RGB", (4096, 100)))
    assert r.size == (2048, 50)


def test_same_pixels_same_hash_across_containers_and_inputs(tmp_path):
    im = _noise(50, 30, seed=3)
    hashes = {
        load_image(_save(tmp_path, im, "x.png")).sha256,
        load_image(_save(tmp_path, im, "x.bmp")).sha256,
        load_image(_save(tmp_path, im, "x.tiff")).sha256,
        load_image((tmp_path / "x.png").read_bytes()).sha256,
        load_image(im).sha256,
        load_image(np.asarray(im)).sha256,
    }
    assert len(hashes) == 1
    assert load_image(_noise(50, 30, seed=4)).sha256 not in hashes
    # Same bytes, different shape must not collide.
    flat = np.asarray(im).reshape(60, 25, 3)
    assert load_image(flat).sha256 not in hashes


def test_loaded_image_is_frozen():
    r = load_image(Image.new("RGB", (40, 40)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.sha256 = "x"  # type: ignore[misc]


# ------------------------------------------------------------------ in-memory inputs


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_bytes_inputs(tmp_path, wrap):
    im = _noise(40, 40)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    r = load_image(wrap(buf.getvalue()))
    assert r.source == "<bytes>" and r.format == "PNG"
    assert np.array_equal(np.asarray(r.image), np.asarray(im))


def test_pil_input_is_not_mutated(tmp_path):
    p = _save(tmp_path, Image.new("RGB", (4000, 40), (9, 9, 9)), "o.jpg", exif=_exif_with_gps(6))
    src = Image.open(p)
    r = load_image(src)
    assert r.source == "<PIL.Image>" and r.format is None
    assert src.size == (4000, 40) and src.mode == "RGB" and "exif" in src.info
    assert r.size == (20, 2048) and r.original_size == (40, 4000)
    _assert_clean(r)
    src.close()


@pytest.mark.parametrize(
    "arr,expected",
    [
        (np.full((40, 30), 200, np.uint8), (200, 200, 200)),
        (np.full((40, 30, 1), 50, np.uint8), (50, 50, 50)),
        (np.dstack([np.full((40, 30), v, np.uint8) for v in (1, 2, 3)]), (1, 2, 3)),
        (np.zeros((40, 30, 4), np.uint8), (255, 255, 255)),
        (np.full((40, 30, 3), 65535, np.uint16), (255, 255, 255)),
        (np.full((40, 30, 3), 0.5, np.float32), (128, 128, 128)),
        (np.full((40, 30), 1.0, np.float64), (255, 255, 255)),
    ],
)
def test_array_inputs(arr, expected):
    r = load_image(arr)
    _assert_clean(r)
    assert r.source == "<ndarray>"
    assert r.size == (30, 40)
    assert _px(r, (3, 3)) == expected


def test_non_contiguous_array():
    a = np.arange(40 * 30 * 3, dtype=np.uint32).astype(np.uint8).reshape(40, 30, 3)
    view = a[:, ::-1]
    assert np.array_equal(np.asarray(load_image(view).image), view)


# ------------------------------------------------------------------ rejected inputs


def _reject(src, *needles, **kw) -> ImageInputError:
    with pytest.raises(ImageInputError) as ei:
        load_image(src, **kw)
    e = ei.value
    assert isinstance(e, ValueError)
    msg = str(e)
    assert msg.startswith("cannot read image ")
    for n in needles:
        assert n in msg, (n, msg)
    return e


def test_missing_file(tmp_path):
    e = _reject(tmp_path / "nope.jpg", "nope.jpg", "file not found")
    assert e.reason == "file not found" and e.source.endswith("nope.jpg")


def test_directory(tmp_path):
    _reject(tmp_path, str(tmp_path), "is a directory")


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.touch()
    _reject(p, "empty.png", "empty file")
    _reject(b"", "<bytes>", "empty")


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a picture\n" * 20)
    _reject(p, "notes.jpg", "not an image (unrecognised format)")


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png")])
@pytest.mark.parametrize("keep", [0.5, 0.08])
def test_truncated_images(tmp_path, fmt, ext, keep):
    buf = io.BytesIO()
    _noise(64, 64).save(buf, fmt)
    data = buf.getvalue()
    p = tmp_path / f"cut.{ext}"
    p.write_bytes(data[: max(12, int(len(data) * keep))])
    _reject(p, f"cut.{ext}", "truncated or corrupt image data")


def test_unsupported_but_real_format_is_not_opened(tmp_path):
    # EPS would shell out to Ghostscript; it is outside the accepted set.
    p = tmp_path / "x.eps"
    p.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    _reject(p, "x.eps", "not an image (unrecognised format)")


def _no_big_alloc(monkeypatch):
    """Fail the test if PIL is asked to allocate pixel memory for more than 10 Mpx."""
    real = Image.core.new

    def guarded(mode, size, *a):
        assert size[0] * size[1] <= 10_000_000, f"pixel buffer allocated: {size}"
        return real(mode, size, *a)

    monkeypatch.setattr(Image.core, "new", guarded)


@pytest.mark.parametrize("make,ext", [(_bomb_png, "png"), (_bomb_jpeg, "jpg")])
def test_decompression_bomb_rejected_from_header(tmp_path, monkeypatch, make, ext):
    _no_big_alloc(monkeypatch)
    p = tmp_path / f"bomb.{ext}"
    p.write_bytes(make())
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        e = _reject(p, f"bomb.{ext}", "image too large: 20000x20000 px", "decompression bomb")
        _reject(p.read_bytes(), "<bytes>", "20000x20000")
    finally:
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 5_000_000
    assert str(DEFAULT_MAX_PIXELS) in e.reason


def test_bomb_just_below_pil_limit_is_still_checked_by_our_limit(monkeypatch):
    _no_big_alloc(monkeypatch)
    # A header Pillow itself would merely warn about; our max_pixels is stricter here.
    data = _png(9000, 9000, 8, 0, b"\x00")
    _reject(data, "9000x9000", max_pixels=50_000_000)


def test_bmp_and_gif_bomb_headers(monkeypatch):
    _no_big_alloc(monkeypatch)
    bmp = b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, BOMB, BOMB, 1, 24, 0, 0, 0, 0, 0, 0)
    _reject(bmp, "20000x20000")
    gif = b"GIF89a" + struct.pack("<HH", BOMB, BOMB) + b"\x00\x00\x00;"
    _reject(gif, "20000x20000")


def _tiff_header(w: int, h: int) -> bytes:
    tags = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1),
            (278, 4, h), (279, 4, w * h)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, typ, 1, v) for t, typ, v in tags)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00"


def test_header_without_sniffer_still_rejected_by_pillow_limit(monkeypatch):
    # TIFF sizes are not sniffed by hand; Pillow's own bomb check (caught locally) must still stop it.
    _no_big_alloc(monkeypatch)
    _reject(_tiff_header(BOMB, BOMB), "<bytes>", "image too large")
    # ...and a TIFF under Pillow's limit but over ours is caught after the lazy open, before decoding.
    _reject(_tiff_header(5000, 5000), "5000x5000", max_pixels=1_000_000)


def test_custom_max_pixels():
    _reject(Image.new("RGB", (100, 100)), "100x100", "limit 5000", max_pixels=5000)
    _reject(np.zeros((100, 100), np.uint8), "100x100", max_pixels=5000)


def test_zero_size_images():
    _reject(_png(0, 0, 8, 2, b""), "empty image (0x0 px)")
    _reject(Image.new("RGB", (0, 5)), "empty image")
    _reject(np.zeros((0, 5, 3), np.uint8), "empty image")


@pytest.mark.parametrize(
    "arr,needle",
    [
        (np.zeros(10, np.uint8), "unsupported array shape"),
        (np.zeros((4, 4, 2), np.uint8), "unsupported array shape"),
        (np.zeros((4, 4, 3, 1), np.uint8), "unsupported array shape"),
        (np.zeros((4, 4), np.int32), "unsupported array dtype int32"),
        (np.zeros((4, 4), bool), "unsupported array dtype bool"),
        (np.zeros((4, 4), np.complex64), "unsupported array dtype"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.full((4, 4), np.inf), "NaN or infinite"),
        (np.full((4, 4, 3), 2.0, np.float32), "must be in [0, 1]"),
        (np.full((4, 4, 3), -0.1), "must be in [0, 1]"),
    ],
)
def test_bad_arrays(arr, needle):
    _reject(arr, "<ndarray>", needle)


def test_unsupported_input_type():
    _reject(12345, "unsupported input type int")


def test_bad_arguments():
    with pytest.raises(ValueError):
        load_image(Image.new("RGB", (4, 4)), max_side=0)


def test_error_is_picklable():
    import pickle

    e = pickle.loads(pickle.dumps(ImageInputError("a.jpg", "empty file")))
    assert (e.source, e.reason, str(e)) == ("a.jpg", "empty file", "cannot read image 'a.jpg': empty file")


# ------------------------------------------------------------------ output helpers


def test_png_bytes_round_trip():
    r = load_image(_noise(40, 30))
    data = image_to_png_bytes(r)
    assert data.startswith(b"\x89PNG")
    back = Image.open(io.BytesIO(data))
    assert back.size == (40, 30) and np.array_equal(np.asarray(back.convert("RGB")), np.asarray(r.image))


def test_png_bytes_strip_metadata_of_plain_pil_image():
    im = _noise(10, 10)
    im.info["exif"] = _exif_with_gps(1).tobytes()
    im.info["icc_profile"] = b"junk"
    data = image_to_png_bytes(im)
    assert b"GPS" not in data and b"iCCP" not in data and b"eXIf" not in data


def test_png_bytes_keep_palette():
    im = Image.new("P", (4, 4), 0)
    im.putpalette([12, 34, 56] + [0, 0, 0] * 255)
    im.info["icc_profile"] = b"junk"
    back = Image.open(io.BytesIO(image_to_png_bytes(im)))
    assert back.convert("RGB").getpixel((0, 0)) == (12, 34, 56)


def test_thumbnail_data_uri():
    uri = thumbnail_data_uri(load_image(_noise(600, 300)), size=192)
    assert uri.startswith("data:image/png;base64,")
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumb.size == (192, 96)
    assert thumbnail_data_uri(Image.new("CMYK", (10, 10))).startswith("data:image/png;base64,")


# ------------------------------------------------------------------ bundled example


def test_bundled_example_image():
    p = EXAMPLES / "lesion.jpg"
    assert p.stat().st_size < 300_000
    raw = Image.open(p)
    assert raw.format == "JPEG" and max(raw.size) <= 1024
    assert len(raw.getexif()) == 0 and "icc_profile" not in raw.info
    raw.close()
    r = load_image(p)
    assert r.warnings == () and r.size == (1024, 911)
    assert (EXAMPLES / "README.md").is_file() and (EXAMPLES / "LICENSE-dermapred.txt").is_file()


def test_default_pixel_limit_rejects_a_13000_px_png_from_its_header():
    """Issue 15: a ~481 KB PNG of 13000x13000 px decoded to ~930 MB; the default limit (50 MP) refuses it unread."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 13000, 13000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    _reject(png, "13000x13000", "limits.max_image_pixels")
    from agent.imageio import DEFAULT_MAX_PIXELS

    assert DEFAULT_MAX_PIXELS <= 89_478_485  # not looser than Pillow's own warning threshold
