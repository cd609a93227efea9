"""Decode + resize stage: every input built here from real bundled photos."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import skimage.data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from tokshard.errors import SKIP_REASONS, SkipSample
from tokshard.pipeline.convert import decode
from tokshard.pipeline.convert.decode import RESIZE_MODES, DecodeConfig, Decoded, area_grid, decode_image, resize_array

SK = Path(skimage.data.__file__).parent
CFG = DecodeConfig()


# ---------------------------------------------------------------- helpers

def enc(img, fmt: str, **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@cache
def photo(name: str) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8, read-only."""
    a = getattr(skimage.data, name)()
    a.setflags(write=False)
    return a


def file_bytes(name: str) -> bytes:
    return (SK / name).read_bytes()


def reference(arr: np.ndarray, cfg: DecodeConfig) -> np.ndarray:
    """The module's resize applied to a full-resolution decode (no DCT scaling)."""
    im = Image.fromarray(arr).convert("RGB")
    return decode._resize(im, im.width, im.height, 1, cfg)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def mode_cfg(mode: str, res: int = 256, **kw) -> DecodeConfig:
    """A config of `mode` whose output is about res x res pixels ("area": res**2 pixels at most)."""
    if mode == "area":
        return DecodeConfig(resize_mode="area", max_area=res * res, patch=16 if res >= 64 else 8, **kw)
    return DecodeConfig(resolution=res, resize_mode=mode, **kw)


def out_shape(cfg: DecodeConfig, width: int, height: int) -> tuple[int, int, int]:
    if cfg.resize_mode == "area":
        gh, gw = area_grid(width, height, cfg.max_area, cfg.patch)
        return gh * cfg.patch, gw * cfg.patch, 3
    return cfg.resolution, cfg.resolution, 3


def check_output(d: Decoded, cfg: DecodeConfig) -> None:
    assert isinstance(d, Decoded)
    assert d.image.shape == out_shape(cfg, d.width, d.height)
    assert d.image.dtype == np.uint8
    assert d.image.flags["C_CONTIGUOUS"]


def skip_reason(data: bytes, cfg: DecodeConfig = CFG) -> str:
    with pytest.raises(SkipSample) as ei:
        decode_image(data, cfg)
    return ei.value.reason


def png_raw(width: int, height: int, bit_depth: int, color_type: int, rows) -> bytes:
    """A PNG written by hand, for what Pillow will not write (16-bit RGB) or
    should not allocate (a 20000x20000 image)."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\x00" + bytes(r)) for r in rows) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@cache
def bilevel_png(side: int) -> bytes:
    """A real, valid side x side 1-bit PNG: a few KB on disk, side**2 pixels."""
    return png_raw(side, side, 1, 0, [bytes((side + 7) // 8)] * side)


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame header (SOF0) dimensions of a baseline JPEG."""
    i = 2
    while data[i + 1] != 0xC0:
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    out = bytearray(data)
    out[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def three_bands(w: int, h: int, vertical: bool = True) -> np.ndarray:
    """Red | green | blue thirds (left to right, or top to bottom)."""
    a = np.zeros((h, w, 3), np.uint8)
    n = w if vertical else h
    for k, sl in enumerate((slice(0, n // 3), slice(n // 3, 2 * n // 3), slice(2 * n // 3, n))):
        if vertical:
            a[:, sl, k] = 255
        else:
            a[sl, :, k] = 255
    return a


# ---------------------------------------------------------------- config

def test_config_validation():
    for bad in (dict(resolution=0), dict(resolution=1.5), dict(resize_mode="crop"),
                dict(max_pixels=0), dict(min_image_size=-1), dict(background=(0, 0)),
                dict(background=(0, 0, 256)), dict(background="white"), dict(resolution=True)):
        with pytest.raises(ValueError):
            DecodeConfig(**bad)
    cfg = DecodeConfig(background=[1, 2, 3], resolution=np.int64(64))
    assert cfg.background == (1, 2, 3) and type(cfg.resolution) is int
    hash(cfg)
    assert set(RESIZE_MODES) == {"center_crop", "pad", "stretch", "area"}


def test_load_truncated_images_stays_off():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------- ordinary inputs

def test_jpeg_uses_fast_path(monkeypatch):
    def no_pillow(*a, **k):
        raise AssertionError("ordinary JPEG fell back to Pillow")
    monkeypatch.setattr(decode, "_decode_pillow", no_pillow)
    d = decode_image(file_bytes("rocket.jpg"), CFG)
    check_output(d, CFG)
    assert (d.width, d.height) == (640, 427)
    full = np.asarray(Image.open(SK / "rocket.jpg").convert("RGB"))
    assert mad(d.image, reference(full, CFG)) < 1.5


def test_png_matches_full_resolution_reference():
    d = decode_image(file_bytes("astronaut.png"), CFG)
    check_output(d, CFG)
    assert (d.width, d.height) == (512, 512)
    assert np.array_equal(d.image, reference(photo("astronaut"), CFG))


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_fast_and_pillow_paths_agree(mode):
    """The same JPEGs through simplejpeg and through Pillow (both with DCT
    scaling), and against a full-size decode: the fast path is not silently
    wrong, and DCT scaling costs little fidelity."""
    big = np.asarray(Image.fromarray(photo("astronaut")).resize((2400, 1500), Image.BICUBIC))
    cases = [file_bytes("rocket.jpg"), file_bytes("retina.jpg"), enc(big, "JPEG", quality=92),
             enc(photo("chelsea"), "JPEG", quality=92, subsampling=0)]
    for res in (64, 256):
        cfg = mode_cfg(mode, res)
        for data in cases:
            fast = decode_image(data, cfg)
            slow = decode._decode_pillow(data, cfg)
            check_output(fast, cfg)
            check_output(slow, cfg)
            assert (fast.width, fast.height) == (slow.width, slow.height)
            full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            ref = reference(full, cfg)
            assert mad(fast.image, slow.image) < 0.5  # same DCT reduction: ~identical
            assert mad(fast.image, ref) < 2.0
            assert mad(slow.image, ref) < 2.0


def test_progressive_jpeg():
    base = decode_image(enc(photo("coffee"), "JPEG", quality=90), CFG)
    prog_data = enc(photo("coffee"), "JPEG", quality=90, progressive=True)
    assert Image.open(io.BytesIO(prog_data)).info.get("progressive")
    prog = decode_image(prog_data, CFG)
    check_output(prog, CFG)
    assert mad(prog.image, base.image) < 1.0


def test_cmyk_jpeg(monkeypatch):
    data = enc(Image.fromarray(photo("coffee")).convert("CMYK"), "JPEG", quality=95)
    assert simplejpeg.decode_jpeg_header(data)[2] == "CMYK"
    calls = []
    real = decode._decode_pillow
    monkeypatch.setattr(decode, "_decode_pillow", lambda *a: calls.append(1) or real(*a))
    d = decode_image(data, CFG)
    assert calls, "CMYK must take the Pillow path"
    check_output(d, CFG)
    assert (d.width, d.height) == (600, 400)
    assert mad(d.image, reference(photo("coffee"), CFG)) < 3.0


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_grayscale(fmt):
    data = enc(photo("camera"), fmt)
    assert Image.open(io.BytesIO(data)).mode == "L"
    d = decode_image(data, CFG)
    check_output(d, CFG)
    assert np.array_equal(d.image[..., 0], d.image[..., 1])
    assert np.array_equal(d.image[..., 0], d.image[..., 2])
    ref = reference(photo("camera"), CFG)
    if fmt == "PNG":
        assert np.array_equal(d.image, ref)
    else:
        assert mad(d.image, ref) < 2.0


def test_webp_bmp_tiff():
    for fmt in ("WEBP", "BMP", "TIFF"):
        d = decode_image(enc(photo("chelsea"), fmt, **({"lossless": True} if fmt == "WEBP" else {})), CFG)
        check_output(d, CFG)
        assert np.array_equal(d.image, reference(photo("chelsea"), CFG)), fmt


# ---------------------------------------------------------------- geometry

def test_pad_wide_image_has_bands_top_and_bottom():
    bg = (0, 0, 255)
    a = np.empty((200, 400, 3), np.uint8)
    a[:] = (200, 30, 40)
    cfg = DecodeConfig(resolution=256, resize_mode="pad", background=bg)
    for data in (enc(a, "PNG"), enc(a, "JPEG", quality=95)):
        img = decode_image(data, cfg).image
        assert (img[:64] == bg).all() and (img[192:] == bg).all()
        content = img[66:190].astype(int)
        assert np.abs(content - (200, 30, 40)).max() <= 4


def test_pad_tall_image_has_bands_left_and_right():
    bg = (10, 20, 30)
    cfg = DecodeConfig(resolution=128, resize_mode="pad", background=bg)
    d = decode_image(enc(np.ascontiguousarray(photo("coffee").transpose(1, 0, 2)), "PNG"), cfg)
    assert (d.width, d.height) == (400, 600)
    cw = round(400 * 128 / 600)  # 85
    left = (128 - cw) // 2
    assert (d.image[:, :left] == bg).all() and (d.image[:, left + cw:] == bg).all()
    assert not (d.image[:, left + 1:left + cw - 1] == bg).all(axis=-1).all(axis=0).any()


def test_center_crop_keeps_centre():
    a = three_bands(600, 200)
    for data in (enc(a, "PNG"), enc(a, "JPEG", quality=95)):
        img = decode_image(data, DecodeConfig(resolution=64)).image.astype(int)
        inner = img[:, 3:-3]
        assert np.abs(inner - (0, 255, 0)).max() <= 12
    tall = three_bands(200, 600, vertical=False)
    img = decode_image(enc(tall, "PNG"), DecodeConfig(resolution=64)).image.astype(int)
    assert np.abs(img[3:-3] - (0, 255, 0)).max() <= 12
    # A real photo against "shorter side -> 256, then centre crop" done by hand.
    cat = np.ascontiguousarray(photo("chelsea")[:, :450])  # 450 x 300: integer crop offsets
    scaled = np.asarray(Image.fromarray(cat).resize((384, 256), Image.BICUBIC))
    manual = scaled[:, 64:320]
    assert mad(decode_image(enc(cat, "PNG"), CFG).image, manual) < 1.5


def test_stretch_ignores_aspect_ratio():
    img = decode_image(enc(three_bands(600, 200), "PNG"), DecodeConfig(resolution=90, resize_mode="stretch")).image
    assert (img[:, 10] == (255, 0, 0)).all()
    assert (img[:, 45] == (0, 255, 0)).all()
    assert (img[:, 80] == (0, 0, 255)).all()


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_one_pixel_image_is_upscaled(mode):
    cfg = mode_cfg(mode)
    px = np.array([[[12, 34, 56]]], np.uint8)
    d = decode_image(enc(px, "PNG"), cfg)
    check_output(d, cfg)
    assert (d.width, d.height) == (1, 1)
    assert (d.image == (12, 34, 56)).all()
    j = decode_image(enc(px, "JPEG", quality=100), cfg).image
    assert (j == j[0, 0]).all()
    assert np.abs(j[0, 0].astype(int) - (12, 34, 56)).max() <= 4


# ---------------------------------------------------------------- resize mode "area" (variable grids)

_grid_args = dict(width=st.integers(1, 20_000), height=st.integers(1, 20_000), patch=st.integers(1, 32),
                  cells=st.integers(1, 8192), extra=st.integers(0, 1023))
_grids = settings(max_examples=400, deadline=None, derandomize=True, database=None)


@_grids
@given(**_grid_args)
def test_area_grid_bound_aspect_and_symmetry(width, height, patch, cells, extra):
    max_area = cells * patch * patch + extra % (patch * patch)
    gh, gw = area_grid(width, height, max_area, patch)
    assert type(gh) is int and type(gw) is int
    assert gh >= 1 and gw >= 1
    assert gh * gw * patch * patch <= max_area
    if gh > 1 and gw > 1:
        # The image's aspect ratio to within one cell: one more cell on either side overshoots it.
        assert width * gh < (gw + 1) * height and height * gw < (gh + 1) * width
        # ... and the grid is the floor of the ideal real sides (Emu3/Qwen2-VL smart_resize).
        ideal_w = (max_area * width / height) ** 0.5 / patch
        ideal_h = (max_area * height / width) ** 0.5 / patch
        assert gw <= ideal_w * (1 + 1e-12) and gw + 1 > ideal_w * (1 - 1e-12)
        assert gh <= ideal_h * (1 + 1e-12) and gh + 1 > ideal_h * (1 - 1e-12)
    assert area_grid(height, width, max_area, patch) == (gw, gh)   # transposing transposes the grid


@_grids
@given(**_grid_args, more=st.integers(0, 10**7))
def test_area_grid_is_monotone_in_max_area(width, height, patch, cells, extra, more):
    max_area = cells * patch * patch + extra % (patch * patch)
    gh, gw = area_grid(width, height, max_area, patch)
    gh2, gw2 = area_grid(width, height, max_area + more, patch)
    assert gh2 >= gh and gw2 >= gw


def test_area_grid_values_and_bad_arguments():
    assert area_grid(512, 512, 512 * 512, 16) == (32, 32)
    assert area_grid(640, 427, 256 * 256, 16) == (13, 19)        # rocket.jpg
    assert area_grid(427, 640, 256 * 256, 16) == (19, 13)
    assert area_grid(100, 100, 256, 16) == (1, 1)                 # one cell: a square of it
    # Thinner than one cell: the short side is one cell, the long one takes the rest of the budget.
    assert area_grid(10_000, 1, 256 * 256, 16) == (1, 256)
    assert area_grid(1, 10_000, 256 * 256, 16) == (256, 1)
    for bad in ((0, 10, 256, 16), (10, 10, 255, 16), (10, 10, 256, 0), (10.0, 10, 256, 16), (10, 10, True, 1)):
        with pytest.raises(ValueError):
            area_grid(*bad)


def test_area_config_validation():
    ok = DecodeConfig(resize_mode="area", max_area=np.int64(4096), patch=np.int64(8))
    assert (ok.max_area, ok.patch) == (4096, 8) and type(ok.max_area) is int and type(ok.patch) is int
    hash(ok)
    bad = {"max_area": [dict(resize_mode="area"), dict(resize_mode="area", max_area=255),
                        dict(resize_mode="area", max_area=-1), dict(resize_mode="area", max_area=4096.0),
                        dict(resize_mode="area", max_area="4096"), dict(max_area=4096),
                        dict(resize_mode="pad", max_area=4096), dict(resize_mode="area", max_area=True)],
           "patch": [dict(resize_mode="area", max_area=4096, patch=0), dict(patch=1.5), dict(patch=True)]}
    for field, cases in bad.items():
        for kw in cases:
            with pytest.raises(ValueError, match=field):
                DecodeConfig(**kw)
    # What a record keeps: the fields of before area mode unless it is area mode.
    plain = DecodeConfig()
    assert set(plain.to_dict()) == {"resolution", "resize_mode", "max_pixels", "min_image_size", "background"}
    assert DecodeConfig(**plain.to_dict()) == plain
    assert ok.to_dict()["max_area"] == 4096 and DecodeConfig(**ok.to_dict()) == ok


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_area_decodes_real_photos_on_their_grid(fmt, monkeypatch):
    """JPEG through the DCT-scaled fast path, PNG through Pillow: the image's own grid, and
    the pixels of the centred aspect crop (a full-size decode + the same resize)."""
    cfg = DecodeConfig(resize_mode="area", max_area=256 * 256, patch=16)
    if fmt == "JPEG":
        data = file_bytes("rocket.jpg")                 # 640 x 427
        def no_pillow(*a, **k):
            raise AssertionError("ordinary JPEG fell back to Pillow")
        monkeypatch.setattr(decode, "_decode_pillow", no_pillow)
        full = np.asarray(Image.open(SK / "rocket.jpg").convert("RGB"))
    else:
        full = photo("chelsea")                         # 451 x 300
        data = enc(full, "PNG")
    d = decode_image(data, cfg)
    h, w = full.shape[:2]
    gh, gw = area_grid(w, h, cfg.max_area, cfg.patch)
    assert (d.width, d.height) == (w, h)
    assert d.image.shape == (gh * 16, gw * 16, 3) == ((13 * 16, 19 * 16, 3))
    assert d.image.dtype == np.uint8 and d.image.flags["C_CONTIGUOUS"]
    ref = reference(full, cfg)
    if fmt == "PNG":
        assert np.array_equal(d.image, ref)
    else:
        assert mad(d.image, ref) < 1.5
    # The crop is the centred one, made by hand: the width cut to h * gw / gh, then resized.
    cw = round(h * gw / gh)
    x0 = (w - cw) // 2
    manual = np.asarray(Image.fromarray(np.ascontiguousarray(full[:, x0:x0 + cw])).resize(
        (gw * 16, gh * 16), Image.BICUBIC))
    assert mad(d.image, manual) < 2.0
    np.testing.assert_array_equal(resize_array(full, cfg), reference(full, cfg))


def test_area_portrait_and_exif_rotation():
    cfg = DecodeConfig(resize_mode="area", max_area=128 * 128, patch=8)
    portrait = np.ascontiguousarray(photo("coffee").transpose(1, 0, 2))     # 400 wide, 600 tall
    for data in (enc(portrait, "PNG"), enc(portrait, "JPEG", quality=95)):
        d = decode_image(data, cfg)
        check_output(d, cfg)
        gh, gw = d.image.shape[0] // 8, d.image.shape[1] // 8
        assert gh > gw and (gh, gw) == area_grid(400, 600, 128 * 128, 8)
        assert mad(d.image, reference(portrait, cfg)) < 2.0
    # EXIF-rotated: Pillow drafts on the stored (landscape) size, then rotates; same grid and pixels.
    stored = Image.fromarray(portrait).transpose(decode._TRANSPOSE[8])      # inverse of orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    d = decode_image(enc(stored, "JPEG", quality=95, exif=exif), cfg)
    assert (d.width, d.height) == (400, 600)
    check_output(d, cfg)
    assert mad(d.image, reference(portrait, cfg)) < 2.0


@_grids
@given(width=st.integers(1, 9000), height=st.integers(1, 9000), patch=st.sampled_from([1, 8, 14, 16]),
       side=st.integers(1, 1024))
def test_area_dct_reduction_keeps_enough_pixels(width, height, patch, side):
    """The box the output is made of, once decoded at 1/a, is never smaller than the output
    (the resize only upscales images that were that small), and it lies on multiples of a."""
    cfg = DecodeConfig(resize_mode="area", max_area=max(side * side, patch * patch), patch=patch)
    gh, gw = area_grid(width, height, cfg.max_area, patch)
    a = decode._dct_reduction(width, height, cfg)
    x0, y0, x1, y1 = decode._source_box(width, height, cfg)
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert all(v % a == 0 for v in (x0, y0, x1, y1))
    if a > 1:
        assert (x1 - x0) // a >= gw * patch and (y1 - y0) // a >= gh * patch
    # Pillow's draft picks its scale by the same rule from the same minimum size.
    min_w, min_h = decode._min_decode_size(width, height, cfg)
    assert a == next((s for s in (8, 4, 2) if min(width // min_w, height // min_h) >= s), 1)
    # The crop keeps the grid's aspect ratio to within a pixel of the original (plus the snap to a).
    cw, ch = x1 - x0, y1 - y0
    assert abs(cw * gh - ch * gw) <= (a + 1) * max(gh, gw)


# ---------------------------------------------------------------- EXIF orientation

_INVERSE = {2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg(orientation):
    cat = photo("chelsea")  # 451 wide, 300 tall as displayed
    stored = Image.fromarray(cat).transpose(decode._TRANSPOSE[_INVERSE[orientation]])
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = enc(stored, "JPEG", quality=95, exif=exif)
    assert decode._jpeg_orientation(data) == orientation
    cfg = DecodeConfig(resolution=128, resize_mode="pad")
    d = decode_image(data, cfg)
    assert (d.width, d.height) == (451, 300)
    want = reference(cat, cfg)
    assert mad(d.image, want) < 2.0
    unrotated = decode_image(enc(stored, "JPEG", quality=95), cfg)
    assert mad(unrotated.image, want) > 20


def test_exif_parser_agrees_with_pillow():
    big_endian = (b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x01"
                  b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00")
    other_tags = Image.Exif()
    other_tags[0x010F] = "Maker"
    other_tags[0x0112] = 1
    cases = [enc(photo("chelsea"), "JPEG"), enc(photo("chelsea"), "JPEG", exif=big_endian),
             enc(photo("chelsea"), "JPEG", exif=other_tags, icc_profile=b"\x00" * 5000),
             file_bytes("rocket.jpg"), file_bytes("hubble_deep_field.jpg")]
    for data in cases:
        assert decode._jpeg_orientation(data) == Image.open(io.BytesIO(data)).getexif().get(0x0112, 1)
    assert decode._jpeg_orientation(cases[1]) == 6
    # Markers that do not parse: the fast path steps aside, it does not guess.
    assert decode._jpeg_orientation(b"\xff\xd8\x00\x00\x00\x00") is None


# ---------------------------------------------------------------- transparency and bit depth

def test_rgba_composited_over_background():
    bg = (10, 200, 30)
    rgba = np.dstack([photo("astronaut"), np.full((512, 512), 255, np.uint8)])
    rgba[:, :256, 3] = 0          # left half fully transparent
    rgba[:, :256, :3] = 0         # ...with black "hidden" colour that must not show
    rgba[:64, 384:, 3] = 128      # a half-transparent corner
    cfg = DecodeConfig(resolution=128, resize_mode="stretch", background=bg)
    for fmt in ("PNG", "WEBP"):
        img = decode_image(enc(rgba, fmt, **({"lossless": True} if fmt == "WEBP" else {})), cfg).image
        assert (img[:, :60] == bg).all(), fmt
        opaque = reference(photo("astronaut"), cfg)
        assert mad(img[20:, 68:], opaque[20:, 68:]) < 1.0
        half = img[2:14, 100:124].astype(int)
        expect = (opaque[2:14, 100:124].astype(int) + np.array(bg)) / 2
        assert np.abs(half - expect).max() <= 3
    # An opaque RGBA file (the scikit-image logo) is just its RGB.
    logo = decode_image(file_bytes("logo.png"), CFG).image
    assert np.array_equal(logo, reference(np.asarray(Image.open(SK / "logo.png"))[..., :3], CFG))


def test_la_image():
    la = Image.merge("LA", [Image.fromarray(photo("camera")), Image.new("L", (512, 512), 0)])
    img = decode_image(enc(la, "PNG"), DecodeConfig(resolution=32, background=(1, 2, 3))).image
    assert (img == (1, 2, 3)).all()


def test_palette_png_with_transparency():
    bg = (10, 200, 30)
    idx = np.zeros((128, 128), np.uint8)
    idx[64:] = 1       # bottom half red
    idx[64:, 96:] = 2  # bottom-right: half-transparent blue
    p = Image.fromarray(idx, "P")
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    cfg = DecodeConfig(resolution=64, resize_mode="stretch", background=bg)
    for transparency in (0, bytes([0, 255, 128])):
        data = enc(p, "PNG", transparency=transparency)
        im = Image.open(io.BytesIO(data))
        assert im.mode == "P" and "transparency" in im.info
        img = decode_image(data, cfg).image.astype(int)
        assert (img[:30] == bg).all()
        assert (img[34:, :44] == (255, 0, 0)).all()
        if isinstance(transparency, bytes):
            assert np.abs(img[34:, 52:] - (5, 100, 143)).max() <= 2


def test_16bit_grayscale_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 1024).round().astype(np.uint16)
    data = enc(np.tile(ramp, (64, 1)), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    img = decode_image(data, DecodeConfig(resolution=256, resize_mode="stretch")).image
    row = img[128, :, 0].astype(int)
    assert (np.diff(row) >= 0).all()
    assert row.min() <= 1 and row.max() >= 254
    assert len(np.unique(row)) > 200
    # 16-bit PGM opens as mode "I" (int32 holding 16-bit values).
    pgm = b"P5\n1024 64\n65535\n" + np.tile(ramp, (64, 1)).astype(">u2").tobytes()
    assert Image.open(io.BytesIO(pgm)).mode == "I"
    img_pgm = decode_image(pgm, DecodeConfig(resolution=256, resize_mode="stretch")).image
    assert np.array_equal(img_pgm, img)
    # Real photo: 8-bit value v stored as v*257 must come back as exactly v.
    cam16 = photo("camera").astype(np.uint16) * 257
    assert np.array_equal(decode_image(enc(cam16, "PNG"), CFG).image,
                          decode_image(enc(photo("camera"), "PNG"), CFG).image)


def test_16bit_rgb_png():
    a = photo("astronaut").astype(np.uint16) * 256 + 255  # high byte is the 8-bit photo
    rows = [r.astype(">u2").tobytes() for r in a]
    data = png_raw(512, 512, 16, 2, rows)
    assert np.array_equal(decode_image(data, CFG).image, reference(photo("astronaut"), CFG))


def test_float_image_is_unsupported():
    f = Image.fromarray(photo("camera").astype(np.float32) / 255)
    assert f.mode == "F"
    assert skip_reason(enc(f, "TIFF")) == "unsupported_image"


# ---------------------------------------------------------------- animations

@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_first_frame(fmt):
    first = photo("chelsea")
    second = 255 - first
    frames = [Image.fromarray(first), Image.fromarray(second)]
    data = enc(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    cfg = DecodeConfig(resolution=64)
    img = decode_image(data, cfg).image
    assert mad(img, reference(first, cfg)) < 8
    assert mad(img, reference(second, cfg)) > 50


# ---------------------------------------------------------------- bad inputs

def test_empty_file():
    assert skip_reason(b"") == "empty_file"


def test_not_an_image():
    rng = np.random.default_rng(0)
    assert skip_reason(rng.bytes(5000)) == "decode_error"
    assert skip_reason(b"this is a text file saved as photo.jpg\n" * 20) == "decode_error"
    assert skip_reason(b"\xff\xd8" + rng.bytes(3000)) == "decode_error"
    assert skip_reason(b"\x89PNG\r\n\x1a\n" + rng.bytes(3000)) == "decode_error"
    # A format Pillow could open but that shells out to Ghostscript.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert skip_reason(eps) == "decode_error"


@pytest.mark.parametrize("kind", ["baseline", "progressive", "png"])
def test_truncated_files_are_rejected(kind):
    if kind == "png":
        data = enc(photo("chelsea"), "PNG")
    else:
        data = enc(photo("chelsea"), "JPEG", quality=90, progressive=kind == "progressive")
        decode_image(data, CFG)  # the whole file is fine
    for frac in (0.2, 0.5, 0.8, 0.97):
        assert skip_reason(data[:int(len(data) * frac)]) == "decode_error", frac


def test_min_image_size():
    data = enc(photo("chelsea"), "JPEG")  # 451 x 300
    assert skip_reason(data, DecodeConfig(min_image_size=301)) == "too_small"
    assert decode_image(data, DecodeConfig(min_image_size=300)).height == 300
    assert skip_reason(enc(photo("chelsea"), "PNG"), DecodeConfig(min_image_size=301)) == "too_small"


def _no_pixel_decoding(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    monkeypatch.setattr(simplejpeg, "decode_jpeg", boom)


def test_decompression_bomb_png(monkeypatch):
    bomb = bilevel_png(20000)
    assert len(bomb) < 100_000
    # Built before pixel decoding is forbidden: loading the photo decodes pixels.
    astronaut = enc(photo("astronaut"), "PNG")
    _no_pixel_decoding(monkeypatch)  # a decode attempt would surface as decode_error
    assert skip_reason(bomb) == "decompression_bomb"
    # Between Pillow's warning and error thresholds our own check rejects it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytest isolates filters; see the subprocess test
        assert skip_reason(bilevel_png(10000)) == "decompression_bomb"
    assert skip_reason(astronaut, DecodeConfig(max_pixels=512 * 511)) == "decompression_bomb"


def test_bomb_warning_is_not_printed(tmp_path):
    """Pillow warns while opening images above its own limit; in a real
    process (not under pytest, which resets warning filters per test) that
    warning must not reach stderr from the worker threads."""
    path = tmp_path / "bomb.png"
    path.write_bytes(bilevel_png(10000))  # 1e8 pixels: warned about, not refused, by Pillow
    code = (
        "import sys, pathlib\n"
        "from tokshard.pipeline.convert.decode import DecodeConfig, decode_image\n"
        "from tokshard.errors import SkipSample\n"
        "try:\n"
        "    decode_image(pathlib.Path(sys.argv[1]).read_bytes(), DecodeConfig())\n"
        "except SkipSample as e:\n"
        "    print(e.reason)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "decompression_bomb"
    assert proc.stderr == ""


def test_decompression_bomb_jpeg(monkeypatch):
    small = enc(photo("chelsea"), "JPEG")
    bomb = jpeg_with_size(small, 20000, 20000)
    assert simplejpeg.decode_jpeg_header(bomb)[:2] == (20000, 20000)
    _no_pixel_decoding(monkeypatch)
    assert skip_reason(bomb) == "decompression_bomb"
    assert skip_reason(small, DecodeConfig(max_pixels=451 * 300 - 1)) == "decompression_bomb"


def test_bomb_bound_is_inclusive():
    assert decode_image(enc(photo("chelsea"), "PNG"), DecodeConfig(max_pixels=451 * 300)).width == 451


# ---------------------------------------------------------------- threads

def test_thread_safety():
    exif = Image.Exif()
    exif[0x0112] = 6
    rgba = np.dstack([photo("coffee"), np.tile((np.arange(600) * 255 // 599).astype(np.uint8), (400, 1))])
    inputs = [
        file_bytes("rocket.jpg"), file_bytes("retina.jpg"), file_bytes("astronaut.png"),
        enc(photo("chelsea"), "JPEG", exif=exif), enc(Image.fromarray(photo("coffee")).convert("CMYK"), "JPEG"),
        enc(rgba, "PNG"), enc(photo("camera").astype(np.uint16) * 257, "PNG"), enc(photo("chelsea"), "WEBP"),
        enc(photo("chelsea"), "GIF"), b"", b"\xff\xd8 junk",
    ]
    cfgs = [mode_cfg(m, 96) for m in RESIZE_MODES]
    jobs = [(data, cfg) for cfg in cfgs for data in inputs] * 3

    def run(job):
        try:
            d = decode_image(*job)
            return d.image, d.width, d.height
        except SkipSample as e:
            return e.reason

    sequential = [run(j) for j in jobs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(run, jobs))
    for s, t in zip(sequential, threaded):
        if isinstance(s, str):
            assert s == t
        else:
            assert np.array_equal(s[0], t[0]) and s[1:] == t[1:]


# ---------------------------------------------------------------- fuzz

FUZZ_CFG = DecodeConfig(resolution=24, resize_mode="pad")


@cache
def fuzz_seeds() -> tuple[bytes, ...]:
    small = photo("chelsea")[100:148, 200:264]
    return (enc(small, "JPEG", quality=80), enc(small, "JPEG", progressive=True),
            enc(small, "PNG"), enc(Image.fromarray(small).quantize(16), "GIF"))


def assert_contract(data: bytes) -> None:
    try:
        d = decode_image(data, FUZZ_CFG)
    except SkipSample as e:
        assert e.reason in SKIP_REASONS
        return
    check_output(d, FUZZ_CFG)


_fuzz = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


@_fuzz
@given(prefix=st.sampled_from([b"", b"\xff\xd8", b"\xff\xd8\xff\xe1", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF"]),
       body=st.binary(max_size=600))
def test_fuzz_random_bytes(prefix, body):
    assert_contract(prefix + body)


@_fuzz
@given(seed=st.integers(0, 3), cut=st.floats(0, 1))
def test_fuzz_truncation(seed, cut):
    data = fuzz_seeds()[seed]
    assert_contract(data[:int(len(data) * cut)])


@_fuzz
@given(seed=st.integers(0, 3), flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                                               min_size=1, max_size=8))
def test_fuzz_bit_flips(seed, flips):
    data = bytearray(fuzz_seeds()[seed])
    for pos, bit in flips:
        data[int(pos * len(data))] ^= 1 << bit
    assert_contract(bytes(data))


def test_resampler_is_torch_antialiased_bicubic_and_close_to_pillow():
    """The HWC out= call is F.interpolate(bicubic, antialias) exactly, and
    within 2 levels of Pillow's BICUBIC on the same whole-pixel box."""
    import torch
    import torch.nn.functional as F
    for name, size in (("astronaut", (64, 64)), ("chelsea", (256, 200)), ("coffee", (700, 500))):
        a = np.ascontiguousarray(photo(name)[:300, :400])
        got = decode._resample(a, *size)
        x = torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)
        want = F.interpolate(x, size=size[::-1], mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy()
        assert got.shape == (size[1], size[0], 3) and got.flags["C_CONTIGUOUS"] and got.flags["WRITEABLE"]
        assert np.array_equal(got, want)
        pil = np.asarray(Image.fromarray(a).resize(size, Image.BICUBIC))
        assert np.abs(got.astype(int) - pil).max() <= 2
