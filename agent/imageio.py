"""Image input boundary: turn whatever the user hands us into a clean, bounded RGB picture.

Everything that reaches the models goes through :func:`load_image`. It accepts paths, raw bytes,
PIL images and numpy arrays, normalises colour mode / bit depth / orientation / alpha, strips all
metadata (EXIF GPS, ICC, XMP never travel further) and rejects anything unreadable or hostile with
an :class:`ImageInputError` whose message is fit to show to a user.

Global PIL state (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``) is never touched;
the pixel limit is enforced from the file header before any pixels are decoded.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from models.pixels import pixel_sha256  # noqa: F401  (also imported from here)

DEFAULT_MAX_SIDE = 2048
DEFAULT_MAX_PIXELS = 50_000_000
"""Largest accepted picture (pixels; ~50 MP, below Pillow's own 89 MP warning): a 13000x13000 PNG of a few
hundred KB would otherwise decode to ~0.5 GB. Configurable per agent (``limits.max_image_pixels``)."""
SMALL_SIDE = 32
"""Below this many pixels on either side the models see too little; the image is accepted with a warning."""

# Deliberately narrow: formats such as EPS shell out to Ghostscript on decode, and exotic
# plugins are a larger attack surface than a skin-photo upload needs.
SUPPORTED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "AVIF")

# Magic numbers of the supported containers: a file that starts like one of these but that PIL
# cannot identify is damaged, not "some other kind of file".
_MAGIC = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation -> the transpose that displays the image upright (same table as ImageOps.exif_transpose)."""

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)


class ImageInputError(ValueError):
    """An input that cannot be used as an image; ``str(e)`` is a complete, user-facing message."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot read image {source!r}: {reason}")

    def __reduce__(self):  # keep it picklable across process pools
        return (type(self), (self.source, self.reason))


@dataclass(frozen=True)
class LoadedImage:
    """A validated image ready for the models.

    ``image`` is a fresh RGB image with no metadata (``info`` empty, no EXIF/ICC/XMP), upright and
    downscaled so its longest side is at most ``max_side``. ``sha256`` is the hex SHA-256 of the
    returned size and RGB pixel bytes, so the same picture hashes the same whether it came as PNG,
    BMP, bytes or an array (it does depend on ``max_side`` when the image was downscaled).
    ``original_size`` is the upright (w, h) before downscaling; ``original_mode``/``format`` describe
    the input as received (``format`` is None for in-memory inputs).
    """

    image: Image.Image = field(compare=False)
    source: str
    sha256: str
    original_size: tuple[int, int]
    original_mode: str
    format: str | None
    warnings: tuple[str, ...] = ()

    @property
    def size(self) -> tuple[int, int]:
        """(w, h) of the processed image."""
        return self.image.size


# --------------------------------------------------------------------------------------------
# Public API


def load_image(src: Any, *, max_side: int = DEFAULT_MAX_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Load, validate and normalise an image from a path, bytes, a PIL image or a numpy array.

    Raises :class:`ImageInputError` for anything that is not a usable image (missing/empty file,
    unrecognised format, truncated data, header claiming more than ``max_pixels`` pixels, bad
    array shape/dtype/values). Pillow's own decompression-bomb limit still applies on top of
    ``max_pixels``; whichever is lower wins.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")

    if isinstance(src, (str, os.PathLike)):
        return _load_path(Path(src).expanduser(), os.fspath(src), max_side, max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src) if not isinstance(src, bytes) else src
        if not data:
            raise ImageInputError("<bytes>", "empty input (0 bytes)")
        return _load_stream(io.BytesIO(data), "<bytes>", max_side, max_pixels)
    if isinstance(src, Image.Image):
        return _load_pil(src, "<PIL.Image>", max_side, max_pixels)
    if isinstance(src, np.ndarray):
        return _load_array(src, "<ndarray>", max_side, max_pixels)
    raise ImageInputError(f"<{type(src).__name__}>", f"unsupported input type {type(src).__name__}")


def image_to_png_bytes(img: Image.Image | LoadedImage) -> bytes:
    """Encode an image as PNG bytes without any metadata."""
    im = _as_pil(img)
    if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
    if im.info:
        # The PNG writer picks the ICC profile (and more) up from info; a copy keeps the palette.
        im = im.copy()
        im.info = {}
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def thumbnail_data_uri(img: Image.Image | LoadedImage, size: int = 192) -> str:
    """A ``data:image/png;base64,...`` URI of the image shrunk to fit ``size`` x ``size`` (for HTML reports)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    im = _as_pil(img).copy()
    if im.mode not in ("RGB", "RGBA", "L", "LA"):
        im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    return "data:image/png;base64," + base64.b64encode(image_to_png_bytes(im)).decode("ascii")


# --------------------------------------------------------------------------------------------
# Sources


def _load_path(path: Path, source: str, max_side: int, max_pixels: int) -> LoadedImage:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageInputError(source, "file not found") from None
    except PermissionError:
        raise ImageInputError(source, "permission denied") from None
    except OSError as e:
        raise ImageInputError(source, f"cannot access file ({e.strerror or e})") from None
    if path.is_dir():
        raise ImageInputError(source, "is a directory")
    if not path.is_file():
        # FIFOs and devices could block forever or stream without end.
        raise ImageInputError(source, "not a regular file")
    if st.st_size == 0:
        raise ImageInputError(source, "empty file")
    try:
        fp = open(path, "rb")
    except PermissionError:
        raise ImageInputError(source, "permission denied") from None
    except OSError as e:
        raise ImageInputError(source, f"cannot open file ({e.strerror or e})") from None
    with fp:
        return _load_stream(fp, source, max_side, max_pixels)


def _load_stream(fp: IO[bytes], source: str, max_side: int, max_pixels: int) -> LoadedImage:
    head = fp.read(16)
    fp.seek(0)
    sniffed = _sniff_size(fp)
    fp.seek(0)
    if sniffed is not None:
        _check_dims(source, *sniffed, max_pixels)

    with warnings.catch_warnings():
        # Our pixel limit is the policy; PIL's warning band below its hard limit is just noise here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp, formats=_formats())
        except Image.DecompressionBombError as e:
            raise ImageInputError(source, f"image too large — {e}") from None
        except UnidentifiedImageError:
            if head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
                raise ImageInputError(source, "truncated or corrupt image data") from None
            raise ImageInputError(source, "not an image (unrecognised format)") from None
        except _DECODE_ERRORS as e:
            raise ImageInputError(source, f"truncated or corrupt image data ({_short(e)})") from None

        with im:
            fmt = im.format
            _check_dims(source, im.width, im.height, max_pixels)
            notes: list[str] = []
            if _is_16bit_tile(im):
                notes.append("16-bit image scaled to 8-bit")
            if getattr(im, "is_animated", False) and fmt != "MPO":
                # MPO's extra frames are phone depth/gain maps, not a second picture.
                notes.append("multi-frame image: only the first frame is used")
            header_size = im.size
            if fmt in ("JPEG", "MPO"):
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale so big photos never exist at full size.
                im.draft(im.mode, _draft_request(im.size, max_side))
            return _finish(im, source, fmt, max_side, notes, header_size=header_size)


def _load_pil(im: Image.Image, source: str, max_side: int, max_pixels: int) -> LoadedImage:
    _check_dims(source, im.width, im.height, max_pixels)
    notes = ["16-bit image scaled to 8-bit"] if _is_16bit_tile(im) else []
    # No draft() here: it would change the caller's image object in place.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _finish(im, source, None, max_side, notes, header_size=im.size)


def _load_array(a: np.ndarray, source: str, max_side: int, max_pixels: int) -> LoadedImage:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageInputError(source, f"unsupported array shape {a.shape} (expected (H,W), (H,W,1), (H,W,3) or (H,W,4))")
    h, w = int(a.shape[0]), int(a.shape[1])
    _check_dims(source, w, h, max_pixels)

    notes: list[str] = []
    if a.dtype == np.uint8:
        u8 = a
    elif a.dtype == np.uint16:
        u8 = _u16_to_u8(a)
        notes.append("16-bit image scaled to 8-bit")
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageInputError(source, "array contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageInputError(source, f"float array values must be in [0, 1] (got {lo:.4g}..{hi:.4g})")
        u8 = np.rint(a.astype(np.float32) * 255.0).astype(np.uint8)
    else:
        raise ImageInputError(source, f"unsupported array dtype {a.dtype} (expected uint8, uint16 or float in [0, 1])")

    # fromarray infers L / RGB / RGBA from a uint8 array's shape.
    im = Image.fromarray(np.ascontiguousarray(u8))
    loaded = _finish(im, source, None, max_side, notes, header_size=(w, h))
    return dataclasses.replace(loaded, original_mode=f"ndarray{tuple(a.shape)}:{a.dtype}")


# --------------------------------------------------------------------------------------------
# Normalisation


def _finish(
    im: Image.Image, source: str, fmt: str | None, max_side: int, notes: list[str], header_size: tuple[int, int]
) -> LoadedImage:
    original_mode = im.mode
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise ImageInputError(source, f"image too large — {e}") from None
    except _DECODE_ERRORS as e:
        raise ImageInputError(source, f"truncated or corrupt image data ({_short(e)})") from None

    orientation = _orientation(im)
    try:
        rgb = _to_rgb(im, notes)
        rgb = _downscale(rgb, max_side)
        if orientation in _TRANSPOSE:
            # Transposing after the downscale touches fewer pixels; the result is equivalent.
            rgb = rgb.transpose(_TRANSPOSE[orientation])
            notes.append("EXIF orientation applied")
    except ImageInputError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageInputError(source, f"cannot convert image ({_short(e)})") from None

    w, h = header_size
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if min(w, h) < SMALL_SIDE:
        notes.append(f"very small image ({w}x{h} px): results are unreliable")

    out = _fresh(rgb)
    return LoadedImage(
        image=out,
        source=source,
        sha256=pixel_sha256(out),
        original_size=(w, h),
        original_mode=original_mode,
        format=fmt,
        warnings=tuple(dict.fromkeys(notes)),
    )


def _to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_rgb(im, notes)

    icc = im.info.get("icc_profile")
    if icc and mode in ("RGB", "RGBA", "CMYK"):
        im = _apply_icc(im, icc, notes)
        mode = im.mode

    if mode == "P":
        # Palette transparency (tRNS, GIF transparent index) lives in info, not in the pixels.
        mode_to = "RGBA" if "transparency" in im.info else "RGB"
        im = im.convert(mode_to)
        mode = im.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = im.convert("RGBA") if mode != "RGBA" else im
        if rgba.getchannel("A").getextrema()[0] < 255:
            notes.append("alpha channel composited on white")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return im
    return im.convert("RGB")


def _high_depth_to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        u8 = _u16_to_u8(a)
        notes.append("16-bit image scaled to 8-bit")
    elif im.mode == "I" and a.size and int(a.min()) >= 0 and int(a.max()) <= 65535:
        # Older Pillow and some TIFF writers hand 16-bit data over as 32-bit "I".
        u8 = _u16_to_u8(a.astype(np.uint16))
        notes.append("16-bit image scaled to 8-bit")
    elif im.mode == "F" and a.size and np.isfinite(a).all() and float(a.min()) >= 0.0 and float(a.max()) <= 1.0:
        u8 = np.rint(a * 255.0).astype(np.uint8)
        notes.append("floating-point image scaled to 8-bit")
    else:
        a = np.nan_to_num(a.astype(np.float64))
        lo, hi = float(a.min()), float(a.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        u8 = np.rint((a - lo) * scale).astype(np.uint8)
        notes.append(f"{im.mode}-mode image stretched from its value range [{lo:g}, {hi:g}] to 8-bit")
    return Image.fromarray(np.ascontiguousarray(u8)).convert("RGB")


def _u16_to_u8(a: np.ndarray) -> np.ndarray:
    # Map the full 16-bit range onto 8 bits with rounding (65535 -> 255, 32896 -> 128): clipping at
    # 255, which is what Image.convert("L") does, would turn almost every 16-bit pixel white.
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _apply_icc(im: Image.Image, icc: bytes, notes: list[str]) -> Image.Image:
    try:
        from PIL import ImageCms
    except ImportError:  # Pillow built without littlecms
        notes.append("embedded ICC colour profile ignored (no colour management available)")
        return im
    try:
        src_profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        desc = (ImageCms.getProfileDescription(src_profile) or "").strip()
        if "srgb" in desc.lower() and im.mode != "CMYK":
            return im  # already what downstream assumes; converting would only add rounding noise
        out_mode = "RGBA" if im.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(
            im, src_profile, ImageCms.createProfile("sRGB"), outputMode=out_mode
        )
        if converted is None:  # pragma: no cover - only returned for inPlace=True
            return im
        notes.append(f"ICC colour profile {desc or 'embedded'!r} converted to sRGB")
        return converted
    except Exception:  # ImageCms raises PyCMSError/OSError/TypeError on broken profiles
        notes.append("embedded ICC colour profile could not be applied; colours may be inaccurate")
        return im


def _downscale(im: Image.Image, max_side: int) -> Image.Image:
    w, h = im.size
    if max(w, h) <= max_side:
        return im
    s = max_side / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    # reducing_gap lets PIL box-reduce by an integer factor first, then Lanczos the rest: fast and sharp.
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _draft_request(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    if max(w, h) <= max_side:
        return size
    s = max_side / max(w, h)
    # draft() only picks scales that keep the result at least this big, so rounding up is safe.
    return (max(1, math.ceil(w * s)), max(1, math.ceil(h * s)))


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
        return int(value)
    except Exception:  # malformed EXIF must not make a readable picture unreadable
        return 1


def _fresh(im: Image.Image) -> Image.Image:
    # A brand-new image carries no info dict, EXIF, ICC, XMP or file handle from the input.
    return Image.frombytes(im.mode, im.size, im.tobytes())


def _is_16bit_tile(im: Image.Image) -> bool:
    # 16-bit RGB(A) PNG/TIFF are decoded straight to 8-bit by PIL; the raw mode tells us it happened.
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        return False  # reported by the converter itself
    for tile in getattr(im, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        rawmode = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else None)
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def _check_dims(source: str, w: int, h: int, max_pixels: int) -> None:
    if w <= 0 or h <= 0:
        raise ImageInputError(source, f"empty image ({w}x{h} px)")
    if w * h > max_pixels:
        raise ImageInputError(
            source, f"image too large: {w}x{h} px (limit {max_pixels} px, limits.max_image_pixels) — possible decompression bomb"
        )


def _formats() -> tuple[str, ...]:
    # Image.open raises KeyError for a format name that has no plugin in this Pillow build.
    Image.init()
    return tuple(f for f in SUPPORTED_FORMATS if f in Image.OPEN)


def _as_pil(img: Image.Image | LoadedImage) -> Image.Image:
    if isinstance(img, LoadedImage):
        return img.image
    if isinstance(img, Image.Image):
        return img
    raise TypeError(f"expected a PIL image or LoadedImage, got {type(img).__name__}")


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


# --------------------------------------------------------------------------------------------
# Header sniffing: read the claimed size without PIL so the pixel limit applies before anything
# is allocated, and so the message can say "20000x20000" rather than PIL's bare pixel count.


def _sniff_size(fp: IO[bytes]) -> tuple[int, int] | None:
    """(w, h) claimed by a PNG/JPEG/GIF/BMP/WebP header, or None when unknown."""
    try:
        head = fp.read(32)
        if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24 and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if head.startswith((b"GIF87a", b"GIF89a")) and len(head) >= 10:
            return struct.unpack("<HH", head[6:10])
        if head.startswith(b"BM") and len(head) >= 26:
            header_size = struct.unpack("<I", head[14:18])[0]
            if header_size == 12:
                return struct.unpack("<HH", head[18:22])
            w, h = struct.unpack("<ii", head[18:26])
            return abs(w), abs(h)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
            return _sniff_webp(head)
        if head.startswith(b"\xff\xd8"):
            fp.seek(2)
            return _sniff_jpeg(fp)
    except (struct.error, OSError, ValueError):
        return None
    return None


def _sniff_webp(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return w, h
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and head[20:21] == b"\x2f":
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _sniff_jpeg(fp: IO[bytes]) -> tuple[int, int] | None:
    # Walk marker segments by their lengths (seeking, not reading) up to the first frame header;
    # EXIF/ICC/MPF segments before it can be large, and embedded thumbnails sit inside APP1.
    for _ in range(4096):
        b = fp.read(1)
        if not b:
            return None
        if b != b"\xff":
            continue
        marker = fp.read(1)
        while marker == b"\xff":
            marker = fp.read(1)
        if not marker:
            return None
        m = marker[0]
        if m in (0x01, 0xD8) or 0xD0 <= m <= 0xD7:
            continue
        if m in (0xD9, 0xDA):
            return None
        seg = fp.read(2)
        if len(seg) < 2:
            return None
        length = struct.unpack(">H", seg)[0]
        if m in _SOF:
            body = fp.read(5)
            if len(body) < 5:
                return None
            h, w = struct.unpack(">HH", body[1:5])
            return (w, h) if h else None  # height 0 means "see DNL"; let PIL decide
        fp.seek(length - 2, io.SEEK_CUR)
    return None
