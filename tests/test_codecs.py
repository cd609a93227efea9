"""Token codecs: bit-exact round trips, determinism, and CodecError-only failure."""

from __future__ import annotations

import functools
import hashlib
import math
import pickle
import threading
import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tokshard.errors import CodecError
from tokshard.pipeline.format.codecs import (
    CODECS,
    TokenCodec,
    codec_from_description,
    get_codec,
    token_dtype,
)

VOCABS = [1, 2, 3, 255, 256, 257, 1024, 16384, 65536, 65537, 2**20]
NAMES = sorted(CODECS)
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def _samples(vocab: int, n: int = 40, length: int = 128, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Skewed values with runs, so the dictionary trainer has something to find.
    out = []
    for _ in range(n):
        x = np.minimum(rng.zipf(1.3, length) - 1, vocab - 1)
        out.append(np.repeat(x, 2)[:length].astype(np.int64))
    return out


@functools.cache
def codec(name: str, vocab: int) -> TokenCodec:
    c = get_codec(name, vocab)
    if c.needs_fit:
        c.fit(_samples(vocab))
    return c


def _int_dtypes(vocab: int) -> list[np.dtype]:
    hi = vocab - 1
    return [np.dtype(t) for t in ("u1", "u2", "i4", "u4", "i8", "u8", ">u4", "<i8")
            if np.iinfo(t).max >= hi]


@st.composite
def token_arrays(draw, vocab: int) -> np.ndarray:
    dtype = draw(st.sampled_from(_int_dtypes(vocab)))
    shape = draw(st.one_of(hnp.array_shapes(min_dims=1, max_dims=1, min_side=0, max_side=300),
                           hnp.array_shapes(min_dims=2, max_dims=3, min_side=0, max_side=9)))
    return draw(hnp.arrays(dtype, shape, elements=st.integers(0, vocab - 1)))


@st.composite
def codec_and_tokens(draw):
    name, vocab = draw(st.sampled_from(NAMES)), draw(st.sampled_from(VOCABS))
    return codec(name, vocab), draw(token_arrays(vocab))


# -- round trips ------------------------------------------------------------------

def test_token_dtype():
    assert token_dtype(1) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(2**32) == np.uint32
    for bad in (0, -1, 2**32 + 1):
        with pytest.raises(ValueError):
            token_dtype(bad)


def run_in_threads(work, threads: int = 4) -> None:
    """`work()` in `threads` threads at once; any error one of them raises fails the test."""
    errors: list[BaseException] = []

    def guarded():
        try:
            work()
        except BaseException as e:   # pragma: no cover - reported below
            errors.append(e)

    running = [threading.Thread(target=guarded) for _ in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    assert not errors, errors


def assert_round_trip(c, x) -> None:
    flat = x.reshape(-1)
    payload = c.encode(x)
    assert isinstance(payload, bytes)
    y = c.decode(payload, flat.size)
    assert y.dtype == token_dtype(c.vocab_size) and y.shape == (flat.size,)
    assert np.array_equal(y, flat.astype(np.int64))
    assert c.encode(y) == payload          # deterministic, and decode is canonical


@FAST
@given(codec_and_tokens())
def test_round_trip(ct):
    assert_round_trip(*ct)


@FAST
@given(st.sampled_from(NAMES), st.sampled_from(VOCABS), st.data())
def test_batch_equals_single(name, vocab, data):
    c = codec(name, vocab)
    length = data.draw(st.integers(0, 64))
    same = data.draw(st.booleans())
    batch = data.draw(st.lists(
        hnp.arrays(data.draw(st.sampled_from(_int_dtypes(vocab))),
                   length if same else st.integers(0, 64),
                   elements=st.integers(0, vocab - 1)),
        min_size=0, max_size=8))
    payloads = c.encode_batch(batch)
    assert payloads == [c.encode(x) for x in batch]
    counts = [x.size for x in batch]
    decoded = c.decode_batch(payloads, counts)
    singles = [c.decode(p, n) for p, n in zip(payloads, counts)]
    assert len(decoded) == len(batch)
    for d, s, x in zip(decoded, singles, batch):
        assert d.dtype == s.dtype == token_dtype(vocab)
        assert np.array_equal(d, s) and np.array_equal(d, x.astype(np.int64))
    if same:
        assert all(np.array_equal(a, b) for a, b in zip(c.decode_batch(payloads, length), singles))
        matrix = c.decode_matrix(payloads, length)      # what the loader decodes a batch with
        assert matrix.shape == (len(batch), length) and matrix.dtype == token_dtype(vocab)
        assert np.array_equal(matrix, np.array(singles).reshape(len(batch), length))


def test_decode_batch_count_mismatch():
    c = codec("bitpack", 1024)
    p = c.encode(np.arange(4))
    with pytest.raises(CodecError):
        c.decode_batch([p, p], [4])


# -- sizes ------------------------------------------------------------------------

@pytest.mark.parametrize("vocab,bits", [(1, 1), (2, 1), (3, 2), (256, 8), (257, 9),
                                        (1024, 10), (65537, 17), (2**20, 20), (2**32, 32)])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 256])
def test_bitpack_size(vocab, bits, n):
    c = get_codec("bitpack", vocab)
    assert c.bits == bits
    x = np.full(n, vocab - 1, dtype=np.uint64)
    p = c.encode(x)
    assert len(p) == math.ceil(n * bits / 8)
    assert np.array_equal(c.decode(p, n), x)


def test_bitpack_256_tokens_of_vocab_1024_is_320_bytes():
    assert len(get_codec("bitpack", 1024).encode(np.arange(256) * 4)) == 320


def test_raw_is_little_endian():
    assert get_codec("raw", 2**20).encode(np.array([1, 0x10203])) == \
        b"\x01\x00\x00\x00\x03\x02\x01\x00"


def test_zstd_frame_has_content_size_no_checksum_no_dict_id():
    for name in ("zstd", "zstd-dict"):
        p = codec(name, 1024).encode(np.arange(256))
        fp = zstandard.get_frame_parameters(p)
        assert fp.content_size == 512 and not fp.has_checksum and fp.dict_id == 0


# -- determinism and descriptions ---------------------------------------------------

def test_encode_deterministic_across_instances():
    x = _samples(1024, n=1, length=256, seed=3)[0]
    for name in NAMES:
        a, b = get_codec(name, 1024), get_codec(name, 1024)
        if a.needs_fit:
            a.fit(_samples(1024))
            b.fit(_samples(1024))
        assert a.encode(x) == a.encode(x) == b.encode(x)


@pytest.mark.parametrize("n_samples,length,kind", [(300, 256, "trained"), (20, 256, "trained"),
                                                   (3, 256, "rawcontent"), (0, 0, "rawcontent")])
def test_zstd_dict_fit_deterministic_and_small(n_samples, length, kind):
    samples = _samples(1024, n=n_samples, length=length)
    a, b = get_codec("zstd-dict", 1024), get_codec("zstd-dict", 1024)
    a.fit(samples)
    b.fit([s.astype(np.uint16) for s in samples])   # same values, other dtype
    assert a.state() == b.state() and a.describe() == b.describe()
    assert a.describe()["params"]["dict_kind"] == kind
    total = sum(s.size * 2 for s in samples)
    assert len(a.state()) - 1 <= max(256, total // 10)   # shrunk to what the data supports
    x = _samples(1024, n=1, length=256, seed=9)[0]
    assert np.array_equal(a.decode(a.encode(x), x.size), x)


@pytest.mark.parametrize("name", NAMES)
def test_description_round_trip(name):
    c = codec(name, 1024)
    desc = c.describe()
    json_desc = pickle.loads(pickle.dumps(desc))
    assert desc == c.describe()                    # deterministic
    rebuilt = codec_from_description(json_desc, 1024, c.state())
    assert rebuilt.describe() == desc
    xs = _samples(1024, n=5, length=256, seed=5)
    assert rebuilt.encode_batch(xs) == c.encode_batch(xs)
    for p, x in zip(c.encode_batch(xs), xs):
        assert np.array_equal(rebuilt.decode(p, x.size), x)


def test_description_errors():
    c = codec("zstd-dict", 1024)
    desc, state = c.describe(), c.state()
    with pytest.raises(CodecError, match="newer than supported"):
        codec_from_description({**desc, "version": desc["version"] + 1}, 1024, state)
    with pytest.raises(CodecError, match="sha256"):
        codec_from_description(desc, 1024, state[:-1] + bytes([state[-1] ^ 1]))
    with pytest.raises(CodecError, match="missing"):
        codec_from_description(desc, 1024, None)
    with pytest.raises(CodecError, match="needs a trained state"):
        codec_from_description({**desc, "state_sha256": None}, 1024, None)
    with pytest.raises(CodecError, match="bitpack"):   # the message lists the known names
        codec_from_description({**desc, "name": "lzma"}, 1024, state)
    with pytest.raises(CodecError):
        codec_from_description({**desc, "params": {**desc["params"], "bogus": 1}}, 1024, state)
    with pytest.raises(CodecError):   # the state says raw content, the description says trained
        fake = b"R" + state[1:]
        codec_from_description({**desc, "state_sha256": hashlib.sha256(fake).hexdigest()},
                               1024, fake)
    with pytest.raises(CodecError):   # a corrupt trained dictionary
        fake = b"T" + b"\x00" * 300
        codec_from_description({**desc, "state_sha256": hashlib.sha256(fake).hexdigest()},
                               1024, fake)
    with pytest.raises(CodecError):
        codec_from_description(codec("raw", 1024).describe(), 1024, b"unexpected")


def test_get_codec_errors():
    with pytest.raises(CodecError, match="raw"):
        get_codec("nope", 1024)
    for kwargs in ({"level": 99}, {"level": "19"}, {"colour": 1}):
        with pytest.raises(CodecError):
            get_codec("zstd", 1024, **kwargs)
    with pytest.raises(CodecError):
        get_codec("zstd-dict", 1024, dict_size=10)
    with pytest.raises(CodecError):
        get_codec("raw", 0)
    with pytest.raises(CodecError, match="fit"):
        get_codec("zstd-dict", 1024).encode(np.arange(3))
    with pytest.raises(CodecError, match="fit"):
        get_codec("zstd-dict", 1024).decode(b"\x00" * 10, 3)


# -- bad input ----------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [np.array([0, 1000]), np.array([-1, 3]),
                                 np.array([0.0, 1.0]), np.array([True, False]),
                                 np.array([1, 2], dtype=object), np.array(["1"])])
def test_encode_rejects(name, bad):
    with pytest.raises(CodecError):
        codec(name, 1000).encode(bad)
    with pytest.raises(CodecError):
        codec(name, 1000).encode_batch([np.arange(2), bad])


@pytest.mark.parametrize("name", NAMES)
def test_decode_rejects_out_of_vocab_and_wrong_count(name):
    c = codec(name, 1000)
    wide = get_codec(name, 1024) if name != "zstd-dict" else codec(name, 1024)
    # Same token dtype and bit width, so the payload is well-formed except for the value.
    p = wide.encode(np.array([5, 1023, 7]))
    if name == "zstd-dict":   # a different dictionary could decode differently; use c's own
        p = c._contexts()[0].compress(np.array([5, 1023, 7], "<u2").tobytes())
    with pytest.raises(CodecError, match="vocab_size"):
        c.decode(p, 3)
    with pytest.raises(CodecError, match="vocab_size"):
        c.decode_batch([c.encode(np.arange(3)), p], 3)
    good = c.encode(np.arange(40))
    for n in (39, 41, 0, 1000):
        if name == "bitpack" and c.payload_size(n) == len(good):
            continue   # bitpack cannot see n within the byte padding; the index owns n
        with pytest.raises(CodecError):
            c.decode(good, n)
    for n in (-1, 2.0, "3"):
        with pytest.raises(CodecError):
            c.decode(good, n)
    with pytest.raises(CodecError):
        c.decode("not bytes", 3)


def test_bitpack_rejects_nonzero_padding():
    c = get_codec("bitpack", 1024)
    p = bytearray(c.encode(np.arange(3)))   # 30 bits -> 4 bytes, 2 padding bits
    p[-1] |= 0x80
    with pytest.raises(CodecError, match="padding"):
        c.decode(bytes(p), 3)
    with pytest.raises(CodecError, match="padding"):
        c.decode_batch([c.encode(np.arange(3)), bytes(p)], 3)


@pytest.mark.parametrize("name", ["zstd", "zstd-dict"])
def test_zstd_hostile_content_size_is_refused_before_allocating(name):
    c = codec(name, 1024)
    # Frame header: magic, descriptor (8-byte content size, single segment), size 2**40.
    header = zstandard.MAGIC_NUMBER.to_bytes(4, "little") + bytes([0xE0]) + (2**40).to_bytes(8, "little")
    for payload in (header, header + b"\x01\x00\x00", b"\x28\xb5\x2f\xfd"):
        with pytest.raises(CodecError):
            c.decode(payload, 256)
    # A frame without a content size is refused too (ours always carry one).
    plain = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x00" * 512)
    with pytest.raises(CodecError):
        c.decode(plain, 256)
    # A valid frame for the empty sample followed by another frame.
    empty = c.encode(np.zeros(0, np.int64))
    for payload in (empty + empty, empty + b"\x00", b"", empty[:-1]):
        with pytest.raises(CodecError):
            c.decode(payload, 0)


def _decode_checked(c: TokenCodec, payload: bytes, n: int) -> bool:
    """Decode; a CodecError is fine, any other exception fails. True if it decoded."""
    try:
        y = c.decode(payload, n)
    except CodecError:
        return False
    # Undetectable corruption may decode, but never to a malformed array.
    assert y.dtype == token_dtype(c.vocab_size) and y.shape == (n,)
    assert y.size == 0 or int(y.max()) < c.vocab_size
    return True


@st.composite
def encoded(draw):
    name, vocab = draw(st.sampled_from(NAMES)), draw(st.sampled_from(VOCABS))
    c = codec(name, vocab)
    x = draw(hnp.arrays(np.int64, st.integers(0, 200), elements=st.integers(0, vocab - 1)))
    return c, c.encode(x), x.size


@FAST
@given(encoded(), st.data())
def test_corruption_truncate(enc, data):
    c, p, n = enc
    cut = data.draw(st.integers(0, max(0, len(p) - 1)))
    if len(p):
        assert not _decode_checked(c, p[:cut], n)
        assert not _decode_checked(c, p[cut + 1:], n)


@FAST
@given(encoded(), st.binary(min_size=1, max_size=16))
def test_corruption_append(enc, extra):
    c, p, n = enc
    assert not _decode_checked(c, p + extra, n)
    assert not _decode_checked(c, extra + p, n)


@FAST
@given(encoded(), st.data())
def test_corruption_bit_flips(enc, data):
    c, p, n = enc
    if not p:
        return
    buf = bytearray(p)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) * 8 - 1))
        buf[i // 8] ^= 1 << (i % 8)
    _decode_checked(c, bytes(buf), n)
    _decode_checked(c, bytes(buf), data.draw(st.integers(0, 300)))


@FAST
@given(st.sampled_from(NAMES), st.sampled_from(VOCABS), st.binary(max_size=600),
       st.integers(0, 300))
def test_corruption_random_bytes(name, vocab, payload, n):
    c = codec(name, vocab)
    _decode_checked(c, payload, n)
    for part in (payload, b"\x28\xb5\x2f\xfd" + payload):   # also behind a zstd magic
        try:
            c.decode_batch([part, part], n)
        except CodecError:
            pass


# -- operational ----------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_pickle_and_threads(name):
    c = codec(name, 1024)
    xs = _samples(1024, n=64, length=256, seed=11)
    expected = c.encode_batch(xs)
    c2 = pickle.loads(pickle.dumps(c))
    assert c2.encode_batch(xs) == expected and c2.describe() == c.describe()

    def work():
        for _ in range(5):
            assert c.encode_batch(xs) == expected
            for p, x in zip(expected, xs):
                assert np.array_equal(c.decode(p, x.size), x)

    run_in_threads(work)


# -- zstd decode_batch: the batch path equals decode, checks included -----------------------

ZSTD_NAMES = ("zstd", "zstd-dict")


def _walk_tokens(vocab: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """A smoothed random walk folded into the vocabulary: tokens with image-like structure."""
    w = np.cumsum(rng.normal(0, max(1.0, vocab / 50), n + 8))
    return (np.round(np.convolve(w, np.ones(8) / 8, mode="valid")[:n]) % vocab).astype(np.int64)


def _assert_rows_equal(got: list, want: list, dtype: np.dtype) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == dtype and g.shape == w.shape
        assert np.array_equal(g, w)


@pytest.mark.parametrize("name", ZSTD_NAMES)
@pytest.mark.parametrize("vocab", [2, 1024, 65536, 65537, 2**20])
def test_zstd_decode_batch_equals_decode(name, vocab):
    c = codec(name, vocab)
    rng = np.random.default_rng(vocab)
    dtype = token_dtype(vocab)
    for n in (0, 1, 7, 256, 1000):
        xs = [_walk_tokens(vocab, n, rng) for _ in range(33)]
        payloads = c.encode_batch(xs)
        singles = [c.decode(p, n) for p in payloads]
        counts = [n] * len(xs)
        assert c._decode_batch_checked(payloads, counts) is not None   # the fast path, not the fallback
        for count_arg in (n, np.int64(n), np.array(n), counts, np.array(counts)):
            got = c.decode_batch(payloads, count_arg)
            _assert_rows_equal(got, singles, dtype)
            assert all(np.array_equal(g, x) for g, x in zip(got, xs))
        got = c.decode_batch(payloads, n)
        if n:   # writable, like decode's arrays
            got[0][0] = 0
            assert np.array_equal(c.decode(payloads[0], n), singles[0])
    # mixed lengths, 0-token samples among them
    lengths = [256, 0, 3, 0, 1000, 1, 256, 0]
    xs = [_walk_tokens(vocab, n, rng) for n in lengths]
    payloads = c.encode_batch(xs)
    assert c._decode_batch_checked(payloads, lengths) is not None
    _assert_rows_equal(c.decode_batch(payloads, lengths), [c.decode(p, n) for p, n in zip(payloads, lengths)], dtype)
    assert c.decode_batch([], 256) == [] and c.decode_batch([], []) == []


@pytest.mark.parametrize("name", ZSTD_NAMES)
def test_zstd_decode_batch_payload_types(name):
    c = codec(name, 1024)
    xs = _samples(1024, n=6, length=256, seed=21)
    payloads = c.encode_batch(xs)
    strided = []
    for p in payloads:   # a non-contiguous view: copied, not refused with a BufferError
        big = bytearray(2 * len(p))
        big[::2] = p
        strided.append(memoryview(big)[::2])
    mixed = [payloads[0], bytearray(payloads[1]), memoryview(payloads[2]), np.frombuffer(payloads[3], np.uint8),
             strided[4], memoryview(np.frombuffer(payloads[5], np.uint8).copy()).cast("B")]
    for batch in (mixed, strided):
        for got, x in zip(c.decode_batch(batch, 256), xs):
            assert np.array_equal(got, x)
    assert np.array_equal(c.decode(strided[0], 256), xs[0])
    with pytest.raises(CodecError, match="bytes-like"):
        c.decode_batch([payloads[0], "not bytes"], 256)


@pytest.mark.parametrize("name", NAMES)
def test_strided_payload_views_decode(name):
    c = codec(name, 1024)
    x = _samples(1024, n=1, length=256, seed=4)[0]
    p = c.encode(x)
    big = bytearray(2 * len(p))
    big[::2] = p
    view = memoryview(big)[::2]
    assert np.array_equal(c.decode(view, 256), x)
    assert all(np.array_equal(y, x) for y in c.decode_batch([view, p], 256))


def _zstd_bad_frames(c: TokenCodec, n: int) -> dict[str, bytes]:
    """Payloads that `decode(p, n)` must refuse; n > 0, tokens of vocab_size 1000."""
    good = c.encode(np.arange(n) % c.vocab_size)
    size = n * c.dtype.itemsize
    magic = zstandard.MAGIC_NUMBER.to_bytes(4, "little")
    declares = magic + bytes([0xE0]) + (size + 2).to_bytes(8, "little")
    cctx = c._contexts()[0]
    over = np.full(n, 999, "<u2")
    over[n // 2] = 1023   # in the dtype, out of the vocabulary
    return {
        "declares 2 bytes more": declares + b"\x01\x00\x00",
        "declares 2**40": magic + bytes([0xE0]) + (2**40).to_bytes(8, "little") + b"\x01\x00\x00",
        "no content size": zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * size),
        "truncated": good[:-1],
        "header only": good[:zstandard.frame_header_size(good)],
        "trailing byte": good + b"\0",
        "trailing frame": good + c.encode(np.zeros(0, np.int64)),
        "two frames of half": cctx.compress(bytes(size // 2)) + cctx.compress(bytes(size - size // 2)),
        "leading byte": b"\0" + good,
        "garbage": bytes(range(40)),
        "garbage behind a magic": magic + bytes(range(40)),
        "empty": b"",
        "out-of-vocabulary token": cctx.compress(over.tobytes()),
        "bit flip in the header": bytes([good[0] ^ 1]) + good[1:],
    }


@pytest.mark.parametrize("name", ZSTD_NAMES)
def test_zstd_decode_batch_one_bad_frame_in_a_good_batch(name):
    c = codec(name, 1000)
    n = 256
    good = c.encode_batch(_samples(1000, n=9, length=n, seed=8))
    for what, bad in _zstd_bad_frames(c, n).items():
        with pytest.raises(CodecError):
            c.decode(bad, n)
        for at in (0, 4, 9):
            batch = [*good[:at], bad, *good[at:]]
            with pytest.raises(CodecError) as e:
                c.decode_batch(batch, n)
            with pytest.raises(CodecError) as single:   # the same error decode() raises for it
                c.decode(bad, n)
            assert str(e.value) == str(single.value), what
            with pytest.raises(CodecError):   # mixed counts take the same path
                c.decode_batch(batch, [n] * at + [n] + [n] * (len(good) - at))
    # 0-token samples: only the canonical empty frame
    empty = c.encode(np.zeros(0, np.int64))
    cctx = c._contexts()[0]
    for what, bad in {"trailing byte": empty + b"\0", "two empty frames": empty + empty, "truncated": empty[:-1],
                      "a frame of 1 byte": cctx.compress(b"\0"), "empty": b"",
                      "declares 0 with a body": zstandard.MAGIC_NUMBER.to_bytes(4, "little") + bytes([0x20, 0])
                      + (1 | (2 << 1) | (40 << 3)).to_bytes(3, "little") + b"\0",
                      "non-canonical empty frame": zstandard.ZstdCompressor(level=1, write_checksum=True).compress(b"")
                      }.items():
        assert bad != empty, what
        with pytest.raises(CodecError):
            c.decode(bad, 0)
        with pytest.raises(CodecError):
            c.decode_batch([empty, bad, empty], 0)
        with pytest.raises(CodecError):
            c.decode_batch([good[0], bad, empty, good[1]], [n, 0, 0, n])
    # a token count that does not match the frame, in the middle of a batch
    with pytest.raises(CodecError, match="declares 512 content bytes; expected 510"):
        c.decode_batch([good[0], good[1], good[2]], [n, n - 1, n])
    with pytest.raises(CodecError):
        c.decode_batch([good[0], empty, good[2]], [n, n, n])


@FAST
@given(st.sampled_from(ZSTD_NAMES), st.sampled_from([256, 1000, 65537]), st.data())
def test_zstd_decode_batch_matches_decode_on_corrupt_payloads(name, vocab, data):
    """Differential: a batch with corrupted payloads decodes exactly as decode() does sample by
    sample, or raises CodecError exactly when one of its samples does."""
    c = codec(name, vocab)
    n = data.draw(st.sampled_from([0, 1, 16, 256]))
    xs = [data.draw(hnp.arrays(np.int64, n, elements=st.integers(0, vocab - 1))) for _ in range(4)]
    payloads = [bytearray(p) for p in c.encode_batch(xs)]
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, len(payloads) - 1))
        p = payloads[i]
        how = data.draw(st.sampled_from(["flip", "cut", "append", "replace"]))
        if how == "flip" and p:
            bit = data.draw(st.integers(0, 8 * len(p) - 1))
            p[bit // 8] ^= 1 << (bit % 8)
        elif how == "cut":
            del p[data.draw(st.integers(0, len(p))):]
        elif how == "append":
            p += data.draw(st.binary(min_size=1, max_size=8))
        else:
            payloads[i] = bytearray(data.draw(st.binary(max_size=64)))
    batch = [bytes(p) for p in payloads]
    singles, failed = [], False
    for p in batch:
        try:
            singles.append(c.decode(p, n))
        except CodecError:
            failed = True
    if failed:
        with pytest.raises(CodecError):
            c.decode_batch(batch, n)
    else:
        _assert_rows_equal(c.decode_batch(batch, n), singles, token_dtype(vocab))


@pytest.mark.parametrize("name", ZSTD_NAMES)
def test_zstd_decode_batch_threads(name):
    c = codec(name, 1024)
    xs = _samples(1024, n=64, length=256, seed=12)
    payloads = c.encode_batch(xs)

    def work():
        for _ in range(10):
            assert all(np.array_equal(y, x) for y, x in zip(c.decode_batch(payloads, 256), xs))

    run_in_threads(work)


def test_zstd_decode_batch_checks_decompressed_lengths(monkeypatch):
    """Defence in depth: zstd output of the wrong length is refused, not reshaped."""
    c = get_codec("zstd", 1024)
    payloads = c.encode_batch(_samples(1024, n=3, length=256, seed=2))
    cctx, dctx, empty = c._contexts()

    class Short:
        def decompress(self, *args, **kwargs):
            return dctx.decompress(*args, **kwargs)[:-2]

    monkeypatch.setattr(c, "_contexts", lambda: (cctx, Short(), empty))
    with pytest.raises(CodecError, match="decompressed to 510 bytes"):
        c.decode_batch(payloads, 256)


@pytest.mark.parametrize("name", ZSTD_NAMES)
def test_zstd_decode_batch_refuses_before_allocating(name):
    """Sizes are checked for the whole batch before zstd allocates what a frame declares
    (tracemalloc sees python-zstandard's output buffers)."""
    c = codec(name, 1024)
    frame = c.encode(np.arange(256))
    m = 32 << 20   # 64 MiB of uint16, under MAX_SAMPLE_TOKENS
    magic = zstandard.MAGIC_NUMBER.to_bytes(4, "little")
    one_rle_block = (1 | (1 << 1) | (1000 << 3)).to_bytes(3, "little") + b"\0"
    tiny = magic + bytes([0xE0]) + (2 * m).to_bytes(8, "little") + one_rle_block   # 17 bytes "for" 64 MiB
    cases = [([frame, tiny, frame], [256, m, 256]),
             ([frame, magic + bytes([0xE0]) + (2**40).to_bytes(8, "little") + one_rle_block, frame], 256),
             ([frame] * 8 + [tiny], m)]
    tracemalloc.start()
    try:
        for payloads, counts in cases:
            tracemalloc.reset_peak()
            with pytest.raises(CodecError):
                c.decode_batch(payloads, counts)
            assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
