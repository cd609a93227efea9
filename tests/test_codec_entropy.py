"""rANS entropy codecs (rans-unigram, rans-ctx): exact round trips on any grid and
vocabulary, deterministic fitting, state descriptions, compression below the order-0
entropy on spatially correlated data, and CodecError-only failure on bad payloads."""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# At module level: importing test_codecs runs its @given decorators, which hypothesis
# refuses inside a running @given test (when this file runs alone).
from test_codecs import assert_round_trip

from tokshard.errors import CodecError
from tokshard.pipeline.format.codecs import CODECS, codec_from_description, get_codec, token_dtype
from tokshard.pipeline.format.codecs.rans import RansCtxCodec, RansUnigramCodec

NAMES = ["rans-unigram", "rans-ctx"]
VOCABS = [1, 2, 3, 256, 1024, 4095, 4096, 16384, 65536, 65537, 2**20]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def smooth_grids(n: int, vocab: int, shape=(16, 16), seed: int = 0, frames: int = 1) -> np.ndarray:
    """Quantized smooth random fields: spatially correlated codes like a VQ grid's.

    Each grid is a low-frequency random field (a coarse random grid upsampled) plus a
    little noise, quantized into `vocab` levels, so neighbours often share a code.
    With frames > 1, each frame is the previous one with a few cells changed.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    out = []
    for _ in range(n):
        coarse = rng.normal(size=(h // 4 + 2, w // 4 + 2))
        field = np.kron(coarse, np.ones((4, 4)))[:h, :w]
        field = field + 0.15 * rng.normal(size=(h, w))
        codes = np.clip(((field + 3) / 6 * vocab).astype(np.int64), 0, vocab - 1)
        if frames > 1:
            clip = [codes]
            for _ in range(frames - 1):
                nxt = clip[-1].copy()
                m = rng.random((h, w)) < 0.1
                nxt[m] = rng.integers(0, vocab, m.sum())
                clip.append(nxt)
            codes = np.stack(clip)
        out.append(codes)
    return np.stack(out) if out else np.zeros((0, *shape), np.int64)


@functools.cache
def fitted(name: str, vocab: int, width: int | None = None, plane: int | None = None):
    params = {} if name == "rans-unigram" else {"width": width, "plane": plane}
    c = get_codec(name, vocab, **params)
    if width is None or width == 16:
        samples = list(smooth_grids(40, min(vocab, 600), seed=1))
    else:
        samples = [g.reshape(-1) for g in smooth_grids(40, min(vocab, 600), seed=1)]
    c.fit(samples)
    return c


def test_registered_and_selectable():
    assert CODECS["rans-ctx"] is RansCtxCodec and CODECS["rans-unigram"] is RansUnigramCodec
    assert get_codec("rans-ctx", 1024).needs_fit


# -- round trips ------------------------------------------------------------------------

@st.composite
def codec_and_tokens(draw):
    name = draw(st.sampled_from(NAMES))
    vocab = draw(st.sampled_from(VOCABS))
    width, plane = draw(st.sampled_from([(16, None), (16, 256), (5, None), (1, None), (7, 14)]))
    c = fitted(name, vocab, width if name == "rans-ctx" else None,
               plane if name == "rans-ctx" else None)
    kind = draw(st.sampled_from(["random", "constant", "fitted-like", "unseen", "runs"]))
    shape = draw(st.one_of(st.tuples(st.integers(0, 300)),
                           st.tuples(st.integers(0, 8), st.integers(0, 20)),
                           st.tuples(st.integers(1, 3), st.integers(1, 16), st.integers(1, 16))))
    size = int(np.prod(shape))
    if kind == "random":
        x = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, vocab - 1)))
    elif kind == "constant":
        x = np.full(shape, draw(st.integers(0, vocab - 1)), np.int64)
    elif kind == "fitted-like":
        g = smooth_grids(1, min(vocab, 600), seed=draw(st.integers(0, 1000)))[0].reshape(-1)
        x = np.resize(g, size).reshape(shape)
    elif kind == "unseen":   # codes the fit never saw (the fit data stays below 600)
        lo = min(vocab - 1, 600)
        x = draw(hnp.arrays(np.int64, shape, elements=st.integers(lo, vocab - 1)))
    else:
        vals = draw(hnp.arrays(np.int64, max(1, size // 8 + 1), elements=st.integers(0, vocab - 1)))
        x = np.repeat(vals, 8)[:size].reshape(shape)
    dtype = draw(st.sampled_from([np.uint16, np.int64, np.uint32] if vocab <= 65536
                                 else [np.int64, np.uint32]))
    return c, x.astype(dtype)


@FAST
@given(codec_and_tokens())
def test_round_trip(ct):
    assert_round_trip(*ct)


@FAST
@given(st.sampled_from(NAMES), st.sampled_from([2, 1024, 16384, 65536]), st.data())
def test_batch_equals_single(name, vocab, data):
    c = fitted(name, vocab)
    same = data.draw(st.booleans())
    n = data.draw(st.integers(0, 300))
    lengths = [n if same else data.draw(st.integers(0, 300)) for _ in range(data.draw(st.integers(0, 9)))]
    seeds = [data.draw(st.integers(0, 10**6)) for _ in lengths]
    batch = [np.resize(smooth_grids(1, min(vocab, 600), seed=s)[0].reshape(-1), k)
             for s, k in zip(seeds, lengths)]
    if batch and data.draw(st.booleans()):   # one sample with escapes / unseen codes
        batch[0] = np.full(lengths[0], vocab - 1)
    payloads = c.encode_batch(batch)
    assert payloads == [c.encode(x) for x in batch]
    decoded = c.decode_batch(payloads, lengths)
    for d, x, p, k in zip(decoded, batch, payloads, lengths):
        assert np.array_equal(d, x) and np.array_equal(c.decode(p, k), x)
    if same and batch:
        assert all(np.array_equal(d, x) for d, x in zip(c.decode_batch(payloads, n), batch))


def test_video_previous_frame_and_shaped_fit():
    clips = smooth_grids(30, 512, seed=4, frames=4)            # (30, 4, 16, 16)
    c = get_codec("rans-ctx", 512)
    c.fit(list(clips))                                          # shapes give width and plane
    assert c.params["width"] == 16 and c.params["plane"] == 256
    flat = get_codec("rans-ctx", 512, plane=0)
    flat.fit([x.reshape(-1) for x in clips])                    # 1024 tokens: looks square
    test = smooth_grids(10, 512, seed=5, frames=4)
    for cod in (c, flat):
        ps = cod.encode_batch(list(test))
        assert all(np.array_equal(d, x.reshape(-1)) for d, x in zip(cod.decode_batch(ps, 1024), test))
    size = lambda cod: sum(map(len, cod.encode_batch(list(test))))   # noqa: E731
    assert size(c) < 0.8 * size(flat)      # the previous frame is worth a lot here


# -- fitting, determinism, descriptions ------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_fit_deterministic(name):
    samples = list(smooth_grids(50, 1024, seed=2))
    a, b = get_codec(name, 1024), get_codec(name, 1024)
    a.fit(samples)
    b.fit([s.astype(np.uint16) for s in samples])
    assert a.state() == b.state() and a.describe() == b.describe()
    x = smooth_grids(3, 1024, seed=9)
    assert a.encode_batch(list(x)) == b.encode_batch(list(x))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_samples", [0, 1, 3, 200])
def test_fit_tiny_and_description_round_trip(name, n_samples):
    c = get_codec(name, 1024)
    c.fit([g.reshape(-1) for g in smooth_grids(n_samples, 1024, seed=3)])
    desc = pickle.loads(pickle.dumps(c.describe()))
    if name == "rans-ctx":
        assert desc["params"]["width"] == (16 if n_samples else 1)
    rebuilt = codec_from_description(desc, 1024, c.state())
    assert rebuilt.describe() == c.describe()
    xs = list(smooth_grids(5, 1024, seed=6))
    assert rebuilt.encode_batch(xs) == c.encode_batch(xs)
    for p, x in zip(c.encode_batch(xs), xs):
        assert np.array_equal(rebuilt.decode(p, x.size), x.reshape(-1))
    c2 = pickle.loads(pickle.dumps(c))
    assert c2.encode_batch(xs) == c.encode_batch(xs)


def test_description_and_state_errors():
    c = fitted("rans-ctx", 1024)
    desc, state = c.describe(), c.state()
    with pytest.raises(CodecError, match="needs a trained state"):
        codec_from_description({**desc, "state_sha256": None}, 1024, None)
    with pytest.raises(CodecError, match="sha256"):
        codec_from_description(desc, 1024, state[:-1] + bytes([state[-1] ^ 1]))
    with pytest.raises(CodecError, match="width"):
        codec_from_description({**desc, "params": {**desc["params"], "width": 8}}, 1024, state)
    fresh = lambda **p: get_codec("rans-ctx", 1024, **p)   # noqa: E731
    for bad in (b"", b"TSRA", state[:20], state[:-3], b"XXXX" + state[4:],
                fitted("rans-unigram", 1024).state()):
        with pytest.raises(CodecError):
            fresh().load_state(bad)
    with pytest.raises(CodecError, match="vocab_size"):
        get_codec("rans-ctx", 1000).load_state(state)
    for params in ({"width": 0}, {"classes": 0}, {"classes": 64}, {"max_symbols": 0},
                   {"width": 16, "plane": 20}, {"level": 3}):
        with pytest.raises(CodecError):
            fresh(**params)
    with pytest.raises(CodecError):
        get_codec("rans-ctx", 2**24 + 1)


# -- compression ---------------------------------------------------------------------

def _h0(tokens: np.ndarray) -> float:
    counts = np.bincount(tokens.reshape(-1))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.mark.parametrize("vocab", [256, 1024])
def test_compresses_below_order0_entropy_on_correlated_grids(vocab):
    train, test = smooth_grids(300, vocab, seed=10), smooth_grids(100, vocab, seed=11)
    bits = {}
    for name in NAMES:
        c = get_codec(name, vocab)
        c.fit(list(train))
        bits[name] = 8 * sum(map(len, c.encode_batch(list(test)))) / test.size
    h0 = _h0(test)
    # The unigram codec sits at H0 (plus 64 bits of coder state per 256 tokens); the
    # context model, fitted on other grids, is far below both.
    assert bits["rans-unigram"] < h0 + 0.4
    assert bits["rans-ctx"] < 0.9 * h0 and bits["rans-ctx"] < 0.9 * bits["rans-unigram"], (bits, h0)


# -- bad input ------------------------------------------------------------------------

@st.composite
def encoded(draw):
    name, vocab = draw(st.sampled_from(NAMES)), draw(st.sampled_from([2, 1024, 65536, 2**20]))
    c = fitted(name, vocab)
    n = draw(st.integers(0, 300))
    x = np.resize(smooth_grids(1, min(vocab, 600), seed=draw(st.integers(0, 99)))[0].reshape(-1), n)
    return c, c.encode(x), x


def _decode_checked(c, payload, n, expect=None) -> bool:
    """Decode; only CodecError may escape, and a successful decode is the original."""
    try:
        y = c.decode(payload, n)
    except CodecError:
        return False
    assert y.dtype == token_dtype(c.vocab_size) and y.shape == (n,)
    if expect is not None:
        assert np.array_equal(y, expect)
    return True


@FAST
@given(encoded(), st.data())
def test_corruption_truncate_append(enc, data):
    c, p, x = enc
    for bad in (p[:data.draw(st.integers(0, len(p) - 1))], p[data.draw(st.integers(1, len(p))):],
                p + data.draw(st.binary(min_size=1, max_size=12)),
                data.draw(st.binary(min_size=1, max_size=12)) + p):
        assert not _decode_checked(c, bad, x.size)


@FAST
@given(encoded(), st.data())
def test_corruption_bit_flips_give_checksum_errors(enc, data):
    c, p, x = enc
    buf = bytearray(p)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) * 8 - 1))
        buf[i // 8] ^= 1 << (i % 8)
    if bytes(buf) != p:
        assert not _decode_checked(c, bytes(buf), x.size)
    assert not _decode_checked(c, p, x.size + data.draw(st.integers(1, 5)))
    if x.size:
        assert not _decode_checked(c, p, x.size - 1)


@FAST
@given(st.sampled_from(NAMES), st.sampled_from([2, 1024, 2**20]), st.binary(max_size=400),
       st.integers(0, 300))
def test_random_bytes_only_codec_errors(name, vocab, payload, n):
    c = fitted(name, vocab)
    _decode_checked(c, payload, n)
    try:
        c.decode_batch([payload, payload], n)
    except CodecError:
        pass


def test_corrupt_sample_in_batch_names_the_row():
    c = fitted("rans-ctx", 1024)
    xs = list(smooth_grids(8, 1024, seed=12))
    ps = c.encode_batch(xs)
    ps[5] = ps[5][:12] + bytes([ps[5][12] ^ 0x10]) + ps[5][13:]
    with pytest.raises(CodecError, match=r"checksum mismatch \(batch row 5\)"):
        c.decode_batch(ps, 256)
    with pytest.raises(CodecError, match="checksum mismatch"):
        c.decode(ps[5], 256)


def test_many_bit_flips_never_give_wrong_tokens():
    c = fitted("rans-ctx", 1024)
    xs = smooth_grids(64, 1024, seed=13)
    ps = c.encode_batch(list(xs))
    rng = np.random.default_rng(0)
    flipped = []
    for p in ps * 8:    # 512 single-bit flips anywhere in the payload, each must fail
        b = bytearray(p)
        i = int(rng.integers(0, len(b) * 8))
        b[i // 8] ^= 1 << (i % 8)
        flipped.append(bytes(b))
    for p in flipped:
        with pytest.raises(CodecError, match="checksum mismatch"):
            c.decode(p, 256)


def test_encode_rejects_bad_tokens():
    c = fitted("rans-ctx", 1024)
    for bad in (np.array([0, 1024]), np.array([-1, 3]), np.array([0.5]), np.array(["1"])):
        with pytest.raises(CodecError):
            c.encode(bad)
    with pytest.raises(CodecError):
        c.decode_batch([c.encode(np.arange(4))] * 2, [4])
