"""The compiled rANS kernels (rans_kernels.py) against the numpy coder they replace.

- byte identity: the compiled encoder writes exactly the numpy coder's payloads, and
  each decodes the other's, on real tokens (the bundled photos through the test
  tokenizer, and the golden rans-ctx dataset written before the kernels existed) and
  on hypothesis tokens (escapes, video planes, odd widths, both token dtypes);
- hostile payloads (random bytes, truncations, extensions, bit flips of valid
  payloads, a state word out of range) fail with CodecError naming the row, in both
  coders alike, and never crash the kernel;
- the numpy coder stays reachable (BACKEND) and takes over, with one warning, when
  numba is missing or a kernel fails to compile.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tokshard.errors import CodecError
from tokshard.pipeline.convert.decode import DecodeConfig, resize_array
from tokshard.pipeline.format.codecs import codec_from_description, get_codec, rans
from tokshard.tokenizers.kmeans_vq import KMeansVQ

pytest.importorskip("numba")

NAMES = ("rans-unigram", "rans-ctx")
GOLDEN = Path(__file__).resolve().parent / "golden" / "datasets" / "parquet-rans"
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    """Every test starts on the compiled coder, whatever the environment says."""
    monkeypatch.setattr(rans, "BACKEND", "compiled")
    assert rans._kernels() is not None, "the compiled kernels did not load"


def on(backend: str, fn, *args):
    old = rans.BACKEND
    rans.BACKEND = backend
    try:
        return fn(*args)
    finally:
        rans.BACKEND = old


def both_encode(codec, xs) -> list[bytes]:
    """Encode with both coders; they must agree byte for byte."""
    ref = on("numpy", codec.encode_batch, xs)
    got = on("compiled", codec.encode_batch, xs)
    assert got == ref, f"{codec.name}: compiled payloads differ from the numpy coder's"
    return got


def both_decode(codec, payloads, n):
    """Decode with both coders: the same tokens, or a CodecError from both."""
    results = []
    for backend in ("numpy", "compiled"):
        try:
            results.append(on(backend, codec.decode_batch, payloads, n))
        except CodecError as e:
            results.append(e)
    ref, got = results
    if isinstance(ref, CodecError) or isinstance(got, CodecError):
        assert isinstance(ref, CodecError) and isinstance(got, CodecError), (ref, got)
        assert "checksum mismatch" in str(got)
        return got
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    return got


@functools.cache
def fitted(name: str, vocab: int, width: int | None = None, plane: int | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    # A small alphabet (max_symbols) above 64 codes keeps fitting fast and makes
    # codes outside it escapes; 64 codes or fewer all have their own symbol.
    params = {} if name == "rans-unigram" else {"width": width, "plane": plane}
    c = get_codec(name, vocab, max_symbols=255, **params)
    fit_vocab = min(vocab, 600)
    c.fit([np.repeat(rng.integers(0, fit_vocab, 64), 4) for _ in range(20)])
    return c


# -- byte identity on real tokens -------------------------------------------------------

@pytest.fixture(scope="module")
def photo_tokens(photos, tokenizer_dir):
    """The bundled photos and crops of them through the test tokenizer: (N, 8, 8) codes."""
    tok = KMeansVQ.load(tokenizer_dir)
    rng = np.random.default_rng(0)
    images = []
    for _, img, _ in photos:
        h, w = img.shape[:2]
        for _ in range(4):
            y, x = rng.integers(0, h // 4), rng.integers(0, w // 4)
            images.append(resize_array(img[y:y + 3 * h // 4, x:x + 3 * w // 4], DecodeConfig(resolution=64)))
    return tok.vocab_size, list(np.asarray(tok.encode(np.stack(images))))


@pytest.mark.parametrize("name", NAMES)
def test_real_tokens_byte_identical(name, photo_tokens):
    vocab, tokens = photo_tokens
    c = get_codec(name, vocab)
    c.fit(tokens[::2])                               # code the other half too: unseen images
    payloads = both_encode(c, tokens)
    n = tokens[0].size
    decoded = both_decode(c, payloads, n)
    assert all(np.array_equal(d, t.reshape(-1)) for d, t in zip(decoded, tokens))
    assert np.array_equal(on("compiled", c.decode_matrix, payloads, n), np.stack(decoded))


def test_golden_payloads_decode_and_reencode_byte_identically():
    """Payloads the numpy coder wrote before the kernels existed."""
    meta = json.loads(pq.read_table(GOLDEN / "manifest.parquet").schema.metadata[b"tokshard"])
    codec = codec_from_description(meta["codec"], meta["tokenizer"]["vocab_size"],
                                   (GOLDEN / "codec" / "state.bin").read_bytes())
    n = int(np.prod(meta["sample_shape"]))
    seen = 0
    for shard in sorted((GOLDEN / "shards").glob("*.parquet")):
        payloads = pq.read_table(shard, columns=["tokens"]).column("tokens").to_pylist()
        decoded = both_decode(codec, payloads, n)
        assert both_encode(codec, decoded) == payloads
        seen += len(payloads)
    assert seen == meta["totals"]["samples"]


# -- byte identity on hypothesis tokens -------------------------------------------------

@st.composite
def codec_and_batch(draw):
    name = draw(st.sampled_from(NAMES))
    vocab = draw(st.sampled_from([1, 2, 64, 1024, 65537, 2**20]))
    width, plane = draw(st.sampled_from([(16, None), (16, 256), (1, None), (7, 14)]))
    c = fitted(name, vocab, width if name == "rans-ctx" else None, plane if name == "rans-ctx" else None)
    n = draw(st.integers(0, 300))
    rows = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["random", "runs", "high"]))
    hi = vocab - 1
    lo = min(hi, 600) if kind == "high" else 0        # "high": codes the fit never saw (escapes)
    x = draw(hnp.arrays(np.int64, (rows, max(1, n // 4 if kind == "runs" else n)), elements=st.integers(lo, hi)))
    if kind == "runs":
        x = np.repeat(x, 4, axis=1)[:, :n]
    return c, [r.astype(c.dtype) for r in x[:, :n]]


@settings(FUZZ, max_examples=40)
@given(codec_and_batch())
def test_hypothesis_tokens_byte_identical(cb):
    c, xs = cb
    payloads = both_encode(c, xs)
    n = xs[0].size
    decoded = both_decode(c, payloads, n)
    assert all(np.array_equal(d, x) for d, x in zip(decoded, xs))


# -- hostile payloads -------------------------------------------------------------------

@st.composite
def hostile(draw):
    """A batch of valid payloads with one made hostile, and that row's index."""
    name = draw(st.sampled_from(NAMES))
    vocab = draw(st.sampled_from([64, 1024, 2**20]))
    c = fitted(name, vocab, 16 if name == "rans-ctx" else None)
    n = draw(st.sampled_from([1, 17, 256]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    xs = [np.repeat(rng.integers(0, vocab, n), 2)[:n] for _ in range(3)]
    payloads = c.encode_batch(xs)
    row = draw(st.integers(0, 2))
    p = payloads[row]
    how = draw(st.sampled_from(["random", "truncate", "extend", "flip", "state"]))
    if how == "random":
        bad = draw(st.binary(min_size=0, max_size=4 * n + 16))
    elif how == "truncate":
        bad = p[:draw(st.integers(0, len(p) - 1))]
    elif how == "extend":
        bad = p + draw(st.binary(min_size=1, max_size=16))
    elif how == "flip":
        buf = bytearray(p)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, 8 * len(buf) - 1))
            buf[i // 8] ^= 1 << (i % 8)
        bad = bytes(buf)
    else:                                             # a state word out of [2**31, 2**63)
        bad = draw(st.sampled_from([(0).to_bytes(8, "little"), (2**31 - 1).to_bytes(8, "little"),
                                    (2**64 - 1).to_bytes(8, "little"), (2**63).to_bytes(8, "little")])) + p[8:]
    payloads[row] = bad
    return c, payloads, n, row, bad != p


@FUZZ
@given(hostile())
def test_hostile_payloads_fail_with_codec_error_naming_the_row(case):
    c, payloads, n, row, changed = case
    result = both_decode(c, payloads, n)
    if changed:
        assert isinstance(result, CodecError), "a corrupted payload decoded"
        assert f"(batch row {row})" in str(result)


@pytest.mark.parametrize("name", NAMES)
def test_bit_flips_in_every_position_fail(name):
    """Every single-bit flip of a real-sized payload is refused by the compiled decoder."""
    c = fitted(name, 1024, 16 if name == "rans-ctx" else None)
    x = np.repeat(np.random.default_rng(1).integers(0, 600, 128), 2)
    p = c.encode(x)
    for i in range(8 * len(p)):
        b = bytearray(p)
        b[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CodecError, match="checksum mismatch"):
            c.decode(bytes(b), x.size)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_kernel_crc_equals_zlib_for_every_tail_length(dtype):
    """The payload check is zlib's crc32 of the tokens' little-endian bytes: the kernels'
    8-bytes-a-step CRC, one row and two interleaved, at every length modulo 8 bytes."""
    import zlib

    from tokshard.pipeline.format.codecs.rans_kernels import _crc32, _crc32_pair
    rng = np.random.default_rng(7)
    for n in [*range(0, 19), 255, 256, 257, 1024]:
        a, b = (rng.integers(0, np.iinfo(dtype).max, n, endpoint=True).astype(dtype) for _ in range(2))
        want = tuple(zlib.crc32(r.astype(np.dtype(dtype).newbyteorder("<")).tobytes()) for r in (a, b))
        assert (_crc32(a), _crc32(b)) == want, n
        assert _crc32_pair(a, b) == want, n


def test_kernel_rejects_inconsistent_tables_and_offsets():
    """The kernels check their tables' sizes and the payload lengths before reading."""
    from tokshard.pipeline.format.codecs import rans_kernels as k
    c = fitted("rans-ctx", 1024, 16)
    t = c._model().kernel_tables()
    p = np.frombuffer(c.encode(np.arange(256) % 7), np.uint32)
    out = np.empty((1, 256), np.uint16)

    def run(max_words=256, **over):
        a = {**t, "lens": np.array([4 * len(p)], np.int64), **over}
        return k.decode_ctx(p, a["lens"], max_words, out, a["evpack"], a["first"], a["cum"], a["alph"],
                            a["cls_sym"], a["code_sym"], a["width"], a["plane"], a["classes"], a["esc_sym"],
                            a["chunks"], 1024)

    assert run()[0] == -1
    for over in ({"lens": np.array([4 * len(p) + 4], np.int64)}, {"lens": np.array([4 * len(p) - 4], np.int64)},
                 {"lens": np.array([4 * len(p)] * 2, np.int64)},
                 {"first": t["first"][:-1]}, {"cum": t["cum"][:-1]}, {"evpack": t["evpack"][:-1]},
                 {"classes": t["classes"] + 1}, {"alph": np.concatenate([[1024], t["alph"][1:]])}):
        assert run(**over)[:2] == (0, k.TABLE), over
    # A length that is not a state plus whole words, or more words than the tokens take.
    for over in ({"lens": np.array([4], np.int64)}, {"lens": np.array([4 * len(p) - 1], np.int64)}):
        assert run(**over) == (0, k.LENGTH, over["lens"][0]), over
    assert run(max_words=len(p) - 3) == (0, k.LENGTH, 4 * len(p))


# -- the numpy coder as reference and fallback ------------------------------------------

def test_backend_flag_selects_the_numpy_coder(monkeypatch):
    c = fitted("rans-ctx", 1024, 16)
    x = np.arange(256) % 9
    calls = []
    monkeypatch.setattr(rans, "BACKEND", "numpy")
    assert rans._kernels() is None
    orig = rans._RansCodec._decode_lockstep
    monkeypatch.setattr(rans._RansCodec, "_decode_lockstep", lambda self, *a: calls.append(1) or orig(self, *a))
    assert np.array_equal(c.decode(c.encode(x), 256), x) and calls


def test_falls_back_with_one_warning_when_numba_is_missing(monkeypatch):
    import tokshard.pipeline.format.codecs as package
    monkeypatch.setattr(rans, "_kernel_module", [])
    monkeypatch.delattr(package, "rans_kernels", raising=False)
    monkeypatch.setitem(sys.modules, "tokshard.pipeline.format.codecs.rans_kernels", None)   # import fails
    c = fitted("rans-unigram", 1024)
    x = np.arange(100) % 50
    with pytest.warns(RuntimeWarning, match="compiled rANS kernels unavailable"):
        p = c.encode(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # warned once: not again
        assert np.array_equal(c.decode(p, 100), x)
    assert p == on("numpy", c.encode, x)


def test_falls_back_when_a_kernel_fails_to_compile(monkeypatch):
    from tokshard.pipeline.format.codecs import rans_kernels as k

    def broken(*a):
        raise k.CompileError("simulated compile failure")

    monkeypatch.setattr(rans, "_kernel_module", [k])
    monkeypatch.setattr(k, "decode_ctx", broken)
    c = fitted("rans-ctx", 1024, 16)
    x = np.arange(256) % 9
    p = c.encode(x)
    with pytest.warns(RuntimeWarning, match="simulated compile failure"):
        assert np.array_equal(c.decode(p, 256), x)
    assert rans._kernels() is None
