"""Decode encoded image bytes into the tokenizer's uint8 RGB input: a square
(center_crop, pad, stretch), or for resize mode "area" an image of its own
aspect ratio on a grid of patch-sized cells (variable token grids, `area_grid`).

Two paths. Ordinary JPEGs (most of a web corpus) go through simplejpeg, whose
libjpeg-turbo does most of the downscale in the DCT domain, so a 4000x3000
photo is never decoded at full size. Everything else, and every JPEG the fast
path cannot decode *correctly* (CMYK/YCCK, EXIF-rotated, anything libjpeg-turbo
complains about), goes through Pillow. Both paths end in the same resize.

A bad input raises ``SkipSample`` and nothing else. The function keeps no state
between calls and changes no global at call time, so worker threads can share it.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import simplejpeg
from PIL import Image

from tokshard.errors import SkipSample

RESIZE_MODES = ("center_crop", "pad", "stretch", "area")

# Bicubic instead of Lanczos: it is what tokenizer training code feeds its
# models (ADM/MaskGIT/LlamaGen `center_crop_arr`: box reductions, then
# BICUBIC), and Lanczos rings more visibly, especially when it upscales small
# images. The resampler is torch's antialiased uint8 bicubic: a port of
# Pillow's (same a=-0.5 kernel, widened with the scale factor; outputs within
# 1-2 levels of Pillow's) with an AVX2 path that is ~4x faster, and the resize
# was half of the CPU time of a conversion. It takes no fractional source box,
# so the geometry is built from whole pixels (see _source_box).

# Load every plugin once at import, not lazily inside a worker thread.
Image.init()
# Pillow formats we agree to parse, instead of Image.open's "any plugin":
# EPS shells out to Ghostscript, and the scientific/font/game formats are
# attack surface that a web image corpus does not need.
_FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF",
                             "ICO", "PPM", "JPEG2000") if f in Image.OPEN)

# Image.open warns for images above Pillow's MAX_IMAGE_PIXELS before we get to
# see their size. Our bound (DecodeConfig.max_pixels, checked right after open)
# is the policy, so the warning is only noise from worker threads. The local
# fix, warnings.catch_warnings() per call, swaps process-wide state and is not
# thread-safe, so this one narrow filter is installed once instead. Above
# 2 * MAX_IMAGE_PIXELS Pillow raises DecompressionBombError; we map it to the
# same skip.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning,
                        module=r"PIL\.Image\Z")

# Same table as ImageOps.exif_transpose; we read the tag ourselves because the
# original width/height we report depend on it too.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG = 0x0112

# libjpeg-turbo converts these to RGB itself; CMYK and YCCK need Pillow's
# handling of the Adobe (inverted) convention.
_FAST_COLORSPACES = ("YCbCr", "Gray", "RGB")


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class DecodeConfig:
    resolution: int = 256              # side of the square output (every mode but "area")
    resize_mode: str = "center_crop"
    max_pixels: int = 89_478_485       # decompression-bomb bound on the *input* (--max-image-pixels)
    min_image_size: int = 0
    background: tuple[int, int, int] = (255, 255, 255)
    # resize_mode "area" only: the output's pixel area at most (> 0 exactly in that mode) and the
    # side of the cells its sides are multiples of (the tokenizer's patch); see area_grid.
    max_area: int = 0
    patch: int = 16

    def __post_init__(self):
        if not _is_int(self.resolution) or self.resolution < 1:
            raise ValueError(f"resolution must be an int >= 1, got {self.resolution!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if not _is_int(self.max_pixels) or self.max_pixels < 1:
            raise ValueError(f"max_pixels must be an int >= 1, got {self.max_pixels!r}")
        if not _is_int(self.min_image_size) or self.min_image_size < 0:
            raise ValueError(f"min_image_size must be an int >= 0, got {self.min_image_size!r}")
        if not _is_int(self.patch) or self.patch < 1:
            raise ValueError(f"patch must be an int >= 1, got {self.patch!r}")
        if not _is_int(self.max_area):
            raise ValueError(f"max_area must be an int, got {self.max_area!r}")
        if self.resize_mode == "area" and self.max_area < self.patch * self.patch:
            raise ValueError(f"max_area must be an int >= patch * patch = {self.patch * self.patch} "
                             f"with resize_mode 'area', got {self.max_area!r}")
        if self.resize_mode != "area" and self.max_area != 0:
            raise ValueError(f"max_area is for resize_mode 'area' only (0 otherwise), got {self.max_area!r} "
                             f"with resize_mode {self.resize_mode!r}")
        bg = tuple(self.background) if isinstance(self.background, (tuple, list)) else ()
        if len(bg) != 3 or not all(_is_int(c) and 0 <= c <= 255 for c in bg):
            raise ValueError(f"background must be three ints in 0..255, got {self.background!r}")
        # A list would make the frozen config unhashable; ints from numpy would
        # leak into Pillow calls.
        object.__setattr__(self, "background", tuple(int(c) for c in bg))
        for name in ("resolution", "max_pixels", "min_image_size", "max_area", "patch"):
            object.__setattr__(self, name, int(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict for a record, without max_area and patch unless resize_mode is
        "area": what a dataset written before area mode existed recorded, byte for byte.
        `DecodeConfig(**cfg.to_dict()) == cfg`."""
        d = asdict(self)
        if self.resize_mode != "area":
            del d["max_area"], d["patch"]
        return d


def area_grid(width: int, height: int, max_area: int, patch: int) -> tuple[int, int]:
    """(grid_h, grid_w): the cells of `patch` x `patch` pixels a `width` x `height` image
    is resized to in resize mode "area".

    The largest grid whose pixel area is at most `max_area` and whose aspect ratio is the
    image's to within one cell, as Emu3 / Qwen2-VL's `smart_resize` size an image for a
    pixel budget (rounding down, never above the area): the ideal real sides are
    sqrt(max_area * width / height) and sqrt(max_area * height / width) pixels, and each is
    floored to whole cells. In integers only, so every machine gets the same grid:

        T  = max_area // patch**2                          (cells at most)
        gw = max(1, isqrt(max_area * width // (height * patch**2)))
        gh = max(1, isqrt(max_area * height // (width * patch**2)))

    The two floors never exceed T cells together (their product is an integer at most
    sqrt(max_area * w / (h * patch**2)) * sqrt(max_area * h / (w * patch**2)) = max_area / patch**2).
    Only an image thinner than one cell, whose short side was raised to 1, can exceed
    it; then its long side is cut to T cells. Transposing the image
    transposes the grid. Always gh, gw >= 1 and gh * gw * patch**2 <= max_area; adding
    one cell to either side would overshoot the image's aspect ratio
    (w * gh < (gw + 1) * h and h * gw < (gh + 1) * w).
    """
    for name, v in (("width", width), ("height", height), ("patch", patch)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not _is_int(max_area) or max_area < patch * patch:
        raise ValueError(f"max_area must be an int >= patch * patch = {patch * patch}, got {max_area!r}")
    width, height, max_area, patch = int(width), int(height), int(max_area), int(patch)
    cell = patch * patch
    cells = max_area // cell
    gw = max(1, math.isqrt(max_area * width // (height * cell)))
    gh = max(1, math.isqrt(max_area * height // (width * cell)))
    # Cap the longer side first: the shorter one is then 1, and the cap keeps it.
    if gw >= gh:
        gw = min(gw, cells // gh)
        gh = min(gh, cells // gw)
    else:
        gh = min(gh, cells // gw)
        gw = min(gw, cells // gh)
    return gh, gw


@dataclass(frozen=True)
class Decoded:
    image: np.ndarray  # (resolution, resolution, 3) uint8, C-contiguous; "area": (gh*patch, gw*patch, 3)
    width: int         # original width, after EXIF orientation
    height: int        # original height, after EXIF orientation


def decode_image(data: bytes, cfg: DecodeConfig) -> Decoded:
    """Decode and resize one image; raises ``SkipSample`` for any bad input."""
    if len(data) == 0:
        raise SkipSample("empty_file")
    try:
        if data[:2] == b"\xff\xd8":
            out = _decode_jpeg_fast(data, cfg)
            if out is not None:
                return out
        return _decode_pillow(data, cfg)
    except SkipSample:
        raise
    except Exception as e:  # noqa: BLE001 - a decoder surprise must not kill a worker
        raise SkipSample("decode_error", _detail(e)) from None


def _detail(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:200]


def _check_size(w: int, h: int, cfg: DecodeConfig) -> None:
    if w * h > cfg.max_pixels:
        raise SkipSample("decompression_bomb", f"{w}x{h} > {cfg.max_pixels} pixels")
    if w < 1 or h < 1:
        raise SkipSample("unsupported_image", f"zero-size image {w}x{h}")
    if min(w, h) < cfg.min_image_size:
        raise SkipSample("too_small", f"{w}x{h} < {cfg.min_image_size}")


def _fit(w: int, h: int, r: int) -> tuple[int, int]:
    """Size of a w x h image scaled so its longer side is r."""
    s = r / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _area_crop(w: int, h: int, cfg: DecodeConfig) -> tuple[int, int, int, int]:
    """Resize mode "area": (gh, gw, crop_w, crop_h), the grid and the size of the centred
    crop of the w x h image to the grid's aspect ratio gw:gh. Only the longer dimension
    (relative to gw:gh) is cut, to the nearest pixel, so the crop is as large as possible."""
    gh, gw = area_grid(w, h, cfg.max_area, cfg.patch)
    if w * gh > h * gw:   # wider than the grid: the whole height, the width cut
        return gh, gw, max(1, min(w, (2 * h * gw + gh) // (2 * gh))), h
    return gh, gw, w, max(1, min(h, (2 * w * gh + gw) // (2 * gw)))


def _min_decode_size(w: int, h: int, cfg: DecodeConfig) -> tuple[int, int]:
    """(min_width, min_height) the decoder may reduce to without the resize
    having to upscale what was a larger image."""
    if cfg.resize_mode == "pad":
        # Only the letterboxed content needs pixels: longer side -> resolution.
        return _fit(w, h, cfg.resolution)
    if cfg.resize_mode == "area":
        # The crop, reduced by a, must keep >= the output's pixels on each axis:
        # w // a >= ceil(out_w * w / crop_w) gives crop_w >= a * out_w, so crop_w // a >= out_w.
        gh, gw, cw, ch = _area_crop(w, h, cfg)
        return -(-gw * cfg.patch * w // cw), -(-gh * cfg.patch * h // ch)
    # center_crop: the shorter side must stay >= resolution, i.e. both sides.
    # stretch: each axis independently maps to resolution.
    return cfg.resolution, cfg.resolution


def _dct_reduction(w: int, h: int, cfg: DecodeConfig) -> int:
    """The largest of 8, 4, 2, 1 that keeps the decoded size >= the minimum.

    libjpeg-turbo can also reduce by M/8 (3/8, 5/8, ...), but those scaled
    IDCTs land further from a full decode + resize: over the bundled photos at
    256 px the mean abs diff was 0.97 (max 3.0) against 0.63 with powers of
    two, for the same decode time. Powers of two are also what Pillow's
    draft() uses, so both paths see the same intermediate image.
    """
    min_w, min_h = _min_decode_size(w, h, cfg)
    for a in (8, 4, 2):
        if w // a >= min_w and h // a >= min_h:
            return a
    return 1


def _decode_jpeg_fast(data: bytes, cfg: DecodeConfig) -> Decoded | None:
    """The simplejpeg path; None hands the input to Pillow."""
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except Exception:  # noqa: BLE001 - Pillow decides what a bad header is
        return None
    _check_size(w, h, cfg)
    if colorspace not in _FAST_COLORSPACES or _jpeg_orientation(data) != 1:
        return None
    a = _dct_reduction(w, h, cfg)
    want = (-(-h // a), -(-w // a))  # libjpeg rounds the reduced size up
    try:
        # strict=True: libjpeg-turbo warnings (truncation, corrupt data) raise
        # instead of returning an image padded with grey.
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=want[0],
                                     min_width=want[1], strict=True)
    except Exception:  # noqa: BLE001 - Pillow decides; it may accept benign oddities
        return None
    if arr.shape[:2] != want:  # not the reduction we asked for: do not guess the geometry
        return None
    return Decoded(_resize(arr, w, h, a, cfg), w, h)


def _decode_pillow(data: bytes, cfg: DecodeConfig) -> Decoded:
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as im:
            w, h = im.size
            _check_size(w, h, cfg)  # before load(): nothing is decoded yet
            # JPEG DCT scaling (same rule as _dct_reduction); None for other formats.
            drafted = im.draft("RGB", _min_decode_size(w, h, cfg))
            # draft's box is the original size over the reduction it chose.
            reduction = round(w / drafted[1][2]) if drafted else 1
            im.load()  # first frame of an animation
            orientation = _orientation(im)
            rgb = _to_rgb(im, cfg.background)
    except SkipSample:
        raise
    except Image.DecompressionBombError as e:
        raise SkipSample("decompression_bomb", _detail(e)) from None
    except Exception as e:  # noqa: BLE001
        raise SkipSample("decode_error", _detail(e)) from None
    if orientation in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
        if orientation >= 5:
            w, h = h, w
    return Decoded(_resize(rgb, w, h, reduction, cfg), w, h)


def _orientation(im: Image.Image) -> int:
    # Unreadable EXIF is treated like no EXIF, as browsers do; it says nothing
    # about whether the pixels are good.
    try:
        o = im.getexif().get(_ORIENTATION_TAG, 1)
        return o if o in _TRANSPOSE else 1
    except Exception:  # noqa: BLE001
        return 1


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # convert("L") clips these at 255 instead of scaling. "I" is read as
        # 16-bit data too: that is what Pillow's 16-bit decoders produce.
        a = np.asarray(im)
        if mode == "I":
            a = np.clip(a, 0, 65535)
        return Image.fromarray((a >> 8).astype(np.uint8)).convert("RGB")
    if mode == "F":
        raise SkipSample("unsupported_image", "floating-point pixels have no defined 8-bit range")
    if "A" in mode or "a" in mode or "transparency" in im.info:
        # Composite rather than drop alpha: transparent pixels often hold
        # arbitrary colour (black, or leftovers of an edit).
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba)
        return out
    try:
        return im.convert("RGB")
    except ValueError as e:  # a mode Pillow cannot convert (e.g. LAB)
        raise SkipSample("unsupported_image", _detail(e)) from None


def _source_box(w: int, h: int, cfg: DecodeConfig) -> tuple[int, int, int, int]:
    """The pixels of the original w x h image the output is made of: the
    centred square (center_crop), the centred crop to the grid's aspect ratio
    (area, `_area_crop`) or the whole image (stretch, pad), shrunk to
    corners on multiples of the DCT reduction. Every decode of it (full size,
    Pillow's draft, libjpeg-turbo's scaled IDCT, whose pixel j averages the
    original pixels [j*a, (j+1)*a)) then cuts the same box at whole pixels, so
    the paths agree without a fractional box. The cost: up to a-1 (<= 7)
    original pixels at an edge of an image >= 8x the resolution, and a centre
    off by at most a/2 original pixels, which torchvision's CenterCrop rounding
    also allows itself."""
    a = _dct_reduction(w, h, cfg)
    if cfg.resize_mode == "center_crop":
        side = min(w, h) // a * a
        x0, y0 = (w - side) // (2 * a) * a, (h - side) // (2 * a) * a
        return x0, y0, x0 + side, y0 + side
    if cfg.resize_mode == "area":
        _, _, cw, ch = _area_crop(w, h, cfg)
        cw, ch = cw // a * a, ch // a * a
        x0, y0 = (w - cw) // (2 * a) * a, (h - ch) // (2 * a) * a
        return x0, y0, x0 + cw, y0 + ch
    return 0, 0, w // a * a, h // a * a


def _resize(im: Image.Image | np.ndarray, w: int, h: int, reduction: int, cfg: DecodeConfig) -> np.ndarray:
    """im is the whole w x h image, decoded at 1/reduction of its size."""
    a = _dct_reduction(w, h, cfg)
    if a % reduction:  # a decoder that reduced by another rule: the box would not be whole pixels
        raise ValueError(f"decoded at 1/{reduction}, geometry needs a divisor of {a}")
    x0, y0, x1, y1 = _source_box(w, h, cfg)
    box = (x0 // reduction, y0 // reduction, x1 // reduction, y1 // reduction)
    if a > reduction:
        # Decoded at full size (PNG, WebP, ...): the box averages the DCT
        # scaling would have taken, in the pixel domain, before resampling.
        pil = im if isinstance(im, Image.Image) else Image.fromarray(im)
        arr = np.asarray(pil.reduce(a // reduction, box=box))
    else:
        arr = np.asarray(im)[box[1]:box[3], box[0]:box[2]]
    if cfg.resize_mode == "area":
        gh, gw = area_grid(w, h, cfg.max_area, cfg.patch)
        return _resample(arr, gw * cfg.patch, gh * cfg.patch)
    r = cfg.resolution
    if cfg.resize_mode != "pad":
        return _resample(arr, r, r)
    cw, ch = _fit(arr.shape[1], arr.shape[0], r)
    out = np.empty((r, r, 3), dtype=np.uint8)
    out[...] = cfg.background
    top, left = (r - ch) // 2, (r - cw) // 2
    out[top:top + ch, left:left + cw] = _resample(arr, cw, ch)
    return out


def _resample(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3), a new C-contiguous array."""
    if arr.shape[:2] == (height, width):
        return np.array(arr, dtype=np.uint8, order="C")
    if not (arr.flags.c_contiguous and arr.flags.writeable):
        arr = np.array(arr, dtype=np.uint8, order="C")
    # NCHW views of HWC memory = channels_last, the layout of the AVX2 kernel.
    # F.interpolate would return NCHW and the transposing copy back to HWC
    # costs half as much as the resize; the out= form writes HWC directly.
    import torch  # here, not at module level: the CLI reads decode's constants without loading torch
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
    out = torch.empty((1, height, width, 3), dtype=torch.uint8)
    torch.ops.aten._upsample_bicubic2d_aa.out(x, [height, width], False, None, None,
                                              out=out.permute(0, 3, 1, 2))
    return out[0].numpy()


def _jpeg_orientation(data: bytes) -> int | None:
    """EXIF orientation of a JPEG from its first APP1/Exif segment, read
    without Pillow. 1 when absent; None when the markers or the Exif block do
    not parse, so that Pillow (which knows more edge cases) decides."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more metadata
            return 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2:
            return None
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
            return _tiff_orientation(bytes(data[i + 10:i + 2 + length]))
        i += 2 + length
    return None


def _tiff_orientation(t: bytes) -> int | None:
    """Orientation tag of IFD0 of a TIFF-structured Exif block."""
    orders: dict[bytes, Literal["little", "big"]] = {b"II": "little", b"MM": "big"}
    order = orders.get(t[:2])
    if order is None or len(t) < 8:
        return None
    ifd = int.from_bytes(t[4:8], order)
    if ifd + 2 > len(t):
        return None
    for k in range(int.from_bytes(t[ifd:ifd + 2], order)):
        p = ifd + 2 + 12 * k
        if p + 12 > len(t):
            return None
        if int.from_bytes(t[p:p + 2], order) == _ORIENTATION_TAG:
            if int.from_bytes(t[p + 2:p + 4], order) != 3:  # not SHORT: odd, let Pillow read it
                return None
            o = int.from_bytes(t[p + 8:p + 10], order)
            return o if o in _TRANSPOSE else 1  # Pillow ignores unknown values too
    return 1


def resize_array(image: np.ndarray, cfg: DecodeConfig) -> np.ndarray:
    """An (H, W, 3) or (H, W) uint8 array already in memory -> (R, R, 3) (area mode: the
    image's own grid, (gh*patch, gw*patch, 3)), as decode_image resizes."""
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    h, w = image.shape[:2]
    return _resize(image, w, h, 1, cfg)
