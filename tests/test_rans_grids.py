"""rans-ctx with per-sample grids: each sample coded in rows of its own width.

- round trips of batches of mixed grids (h, w in 1..24) through encode_batch(widths=) /
  decode_batch(widths=), on real tokens (the bundled photos through the test tokenizer,
  cropped to the grids) and random tokens with repeats; the compiled coder writes the
  numpy reference coder's bytes and each decodes the other's;
- coding each grid in its own rows beats one wrong width on real tokens (measured);
- uniform grids: shaped and flattened fit samples give the same state, and the model's
  width codes as before (fixed-grid datasets stay byte-identical; test_golden.py pins it);
- the public API (`tokshard.codec`) passes each 2-D shape's width at both ends;
- hostile widths (0, negative, not dividing, larger than the row, not ints) are a
  CodecError from every codec and coder, never a read out of bounds.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokshard
from tokshard.errors import CodecError
from tokshard.pipeline.convert.decode import DecodeConfig, resize_array
from tokshard.pipeline.format.codecs import get_codec, rans
from tokshard.tokenizers.kmeans_vq import KMeansVQ

pytest.importorskip("numba")

SETTINGS = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
GRID = 24   # photos tokenized to 24x24 grids, cropped to the test grids


def on(backend: str, fn, *args, **kw):
    old = rans.BACKEND
    rans.BACKEND = backend
    try:
        return fn(*args, **kw)
    finally:
        rans.BACKEND = old


def both_encode(codec, xs, widths) -> list[bytes]:
    ref = on("numpy", codec.encode_batch, xs, widths=widths)
    got = on("compiled", codec.encode_batch, xs, widths=widths)
    assert got == ref, "compiled payloads differ from the numpy coder's"
    return got


def both_decode(codec, payloads, counts, widths) -> list[np.ndarray]:
    ref = on("numpy", codec.decode_batch, payloads, counts, widths=widths)
    got = on("compiled", codec.decode_batch, payloads, counts, widths=widths)
    assert len(ref) == len(got) and all(np.array_equal(a, b) for a, b in zip(ref, got))
    return got


def both_fail(codec, payloads, counts, widths, match: str) -> None:
    for backend in ("numpy", "compiled"):
        with pytest.raises(CodecError, match=match):
            on(backend, codec.decode_batch, payloads, counts, widths=widths)


@pytest.fixture(scope="module")
def grids(photos, tokenizer_dir):
    """(vocab, (N, 24, 24) codes): the bundled photos and crops of them through the test
    tokenizer at 192 px."""
    tok = KMeansVQ.load(tokenizer_dir)
    rng = np.random.default_rng(0)
    images = []
    for _, img, _ in photos:
        h, w = img.shape[:2]
        images.append(resize_array(img, DecodeConfig(resolution=8 * GRID)))
        for _ in range(2):
            y, x = rng.integers(0, h // 4), rng.integers(0, w // 4)
            images.append(resize_array(img[y:y + 3 * h // 4, x:x + 3 * w // 4], DecodeConfig(resolution=8 * GRID)))
    return tok.vocab_size, np.asarray(tok.encode(np.stack(images)))


def crops(codes: np.ndarray, shapes, rng) -> list[np.ndarray]:
    """A crop of a random image per (h, w)."""
    out = []
    for h, w in shapes:
        g = codes[rng.integers(len(codes))]
        y, x = rng.integers(0, GRID - h + 1), rng.integers(0, GRID - w + 1)
        out.append(np.ascontiguousarray(g[y:y + h, x:x + w]))
    return out


@pytest.fixture(scope="module")
def fitted(grids):
    """rans-ctx fitted on crops of mixed grids of the even images (the odd ones stay unseen)."""
    vocab, codes = grids
    rng = np.random.default_rng(1)
    shapes = [(int(rng.integers(4, GRID + 1)), int(rng.integers(4, GRID + 1))) for _ in range(200)]
    c = get_codec("rans-ctx", vocab)
    c.fit(crops(codes[::2], shapes, rng))
    return c


@functools.cache
def random_fitted(vocab: int):
    """rans-ctx fitted on random grids with repeats (escapes above 600 codes)."""
    rng = np.random.default_rng(2)
    c = get_codec("rans-ctx", vocab, max_symbols=255)
    c.fit([np.repeat(rng.integers(0, min(vocab, 600), 40), 3)[:h * w].reshape(h, w)
           for h, w in [(10, 12), (12, 10), (8, 15), (6, 20)] * 5])
    return c


shapes_st = st.lists(st.tuples(st.integers(1, GRID), st.integers(1, GRID)), min_size=1, max_size=12)


@SETTINGS
@given(shapes=shapes_st, seed=st.integers(0, 2**32 - 1))
def test_mixed_grids_of_real_tokens_round_trip_byte_identically(fitted, grids, shapes, seed):
    xs = crops(grids[1][1::2], shapes, np.random.default_rng(seed))
    widths = [w for _, w in shapes]
    payloads = both_encode(fitted, xs, widths)
    counts = [x.size for x in xs]
    decoded = both_decode(fitted, payloads, counts, widths)
    assert all(np.array_equal(d, x.reshape(-1)) for d, x in zip(decoded, xs))
    # Each sample codes as it would alone: grouping by width keeps the batch's order.
    assert payloads == [fitted.encode_batch([x], widths=[w])[0] for x, w in zip(xs, widths)]


@SETTINGS
@given(shapes=shapes_st, vocab=st.sampled_from([64, 1024, 2**20]), seed=st.integers(0, 2**32 - 1),
       repeat=st.integers(1, 5))
def test_mixed_grids_of_random_tokens_round_trip_byte_identically(shapes, vocab, seed, repeat):
    c = random_fitted(vocab)
    rng = np.random.default_rng(seed)
    xs = [np.repeat(rng.integers(0, vocab, h * w), repeat)[:h * w].reshape(h, w).astype(c.dtype)
          for h, w in shapes]
    widths = [w for _, w in shapes]
    payloads = both_encode(c, xs, widths)
    decoded = both_decode(c, payloads, [x.size for x in xs], widths)
    assert all(np.array_equal(d, x.reshape(-1)) for d, x in zip(decoded, xs))
    if len({x.size for x in xs}) == 1 and len(set(widths)) == 1:   # one grid: decode_matrix too
        m = c.decode_matrix(payloads, xs[0].size, widths=widths[0])
        assert np.array_equal(m, np.stack([x.reshape(-1) for x in xs]))


def test_own_widths_compress_real_tokens_better_than_one_wrong_width(fitted, grids):
    """A batch of real tokens in grids of different widths: each coded in its own rows
    takes fewer bytes than all coded in the model's single width."""
    rng = np.random.default_rng(3)
    shapes = [(h, w) for h, w in [(12, 21), (16, 16), (20, 12), (9, 24), (24, 10), (14, 18)] * 12]
    xs = crops(grids[1][1::2], shapes, rng)
    own = sum(map(len, fitted.encode_batch(xs, widths=[w for _, w in shapes])))
    one = sum(map(len, fitted.encode_batch([x.reshape(-1) for x in xs])))   # the model's width
    assert fitted.params["width"] not in {w for _, w in shapes} - {16}
    assert own < one, (own, one)
    print(f"own widths: {own} bytes, one width ({fitted.params['width']}): {one} bytes "
          f"({one / own:.2f}x)")


def test_uniform_grids_code_as_before(grids):
    """Fixed grids: shaped and flattened fit samples give the same state, and their own
    width (= the model's) codes the bytes the model's width codes."""
    vocab, codes = grids
    xs = list(codes[:, :16, :16])
    shaped, flat = get_codec("rans-ctx", vocab), get_codec("rans-ctx", vocab)
    shaped.fit(xs)
    flat.fit([x.reshape(-1) for x in xs])
    assert shaped.state() == flat.state() and shaped.params["width"] == 16
    plain = shaped.encode_batch(xs)
    assert plain == shaped.encode_batch(xs, widths=[16] * len(xs)) == shaped.encode_batch(xs, widths=16)
    assert plain == shaped.encode_batch([x.reshape(-1) for x in xs])
    n = 256
    for widths in (None, 16, [16] * len(xs), [None] * len(xs)):
        assert np.array_equal(shaped.decode_matrix(plain, n, widths=widths), np.stack(xs).reshape(-1, n))


def test_fit_on_mixed_grids_takes_the_most_common_width(grids):
    vocab, codes = grids
    xs = [codes[0, :h, :w] for h, w in [(12, 21), (16, 16), (16, 16), (20, 12)]]
    c = get_codec("rans-ctx", vocab)
    c.fit(xs)
    assert c.params["width"] == 16 and c.params["plane"] == 0


def test_a_wrong_width_does_not_decode(fitted, grids):
    x = grids[1][1, :12, :20]
    p = fitted.encode_batch([x], widths=[20])
    for w in (4, 10, 12, 240):
        both_fail(fitted, p, 240, [w], "checksum mismatch")


def test_public_api_codes_each_shape_in_its_own_rows(grids):
    vocab, codes = grids
    rng = np.random.default_rng(4)
    shapes = [(12, 21), (16, 16), (20, 12), (7, 24), (16, 16)]
    c = tokshard.codec("rans-ctx", vocab_size=vocab).fit(crops(codes[::2], shapes * 10, rng))
    xs = crops(codes[1::2], shapes, rng)
    payloads = c.encode_batch(xs)
    assert payloads == c._codec.encode_batch(xs, widths=[w for _, w in shapes])
    back = c.decode_batch(payloads, shapes)
    assert all(np.array_equal(b, x) and b.shape == x.shape for b, x in zip(back, xs))
    # One shape for the batch: a (B, h, w) array in, the same out.
    batch = np.stack(crops(codes[1::2], [(12, 21)] * 6, rng))
    assert np.array_equal(c.decode_batch(c.encode_batch(batch), (12, 21)), batch)
    with pytest.raises(CodecError, match="checksum mismatch"):
        c.decode_batch(payloads[:1], (21, 12))                 # the transposed grid
    # A flattened sample is coded in the model's width, as before.
    flat = [x.reshape(-1) for x in xs]
    back = c.decode_batch(c.encode_batch(flat), [(x.size,) for x in xs])
    assert all(np.array_equal(b, f) for b, f in zip(back, flat))


@pytest.mark.parametrize("name", ["rans-ctx", "rans-unigram", "zstd", "bitpack"])
def test_hostile_widths_are_codec_errors(name, grids):
    vocab, codes = grids
    c = get_codec(name, vocab)
    if c.needs_fit:
        c.fit(list(codes[:8, :16, :16]))
    xs = [codes[0, :12, :20], codes[1, :6, :8]]
    good = [20, 8]
    payloads = c.encode_batch(xs, widths=good)
    counts = [240, 48]
    assert all(np.array_equal(d, x.reshape(-1)) for d, x in zip(c.decode_batch(payloads, counts, widths=good), xs))
    for bad, match in (([0, 8], "batch row 0"), ([20, -8], "batch row 1"), ([241, 8], "batch row 0"),
                       ([20, 49], "batch row 1"), ([7, 8], "batch row 0"), ([20, 2**40], "batch row 1"),
                       ([True, 8], "batch row 0"), ([20, 2.0], "batch row 1"), (["20", 8], "batch row 0"),
                       ([20], "row widths"), (5, "batch row 1"), (0, "batch row 0"), (object(), "widths")):
        if name.startswith("rans"):
            both_fail(c, payloads, counts, bad, match)
        with pytest.raises(CodecError, match=match):
            c.decode_batch(payloads, counts, widths=bad)
        with pytest.raises(CodecError, match=match):
            c.encode_batch(xs, widths=bad)
    with pytest.raises(CodecError, match="batch row 0"):
        c.decode_matrix(payloads[:1], 240, widths=7)


def test_kernels_take_any_width_in_bounds(fitted, grids):
    """The decode kernel sizes its grid from the width it is given: widths that do not fit
    the row (larger than it, not dividing it) decode to an error, never out of bounds."""
    from tokshard.pipeline.format.codecs import rans_kernels as k
    x = grids[1][1, :12, :20]
    p = np.frombuffer(fitted.encode_batch([x], widths=[20])[0], np.uint32)
    t = fitted._model().kernel_tables()
    out = np.empty((1, 240), fitted.dtype)

    def run(width):
        return k.decode_ctx(p, np.array([4 * len(p)], np.int64), 240, out, t["evpack"], t["first"], t["cum"], t["alph"],
                            t["cls_sym"], t["code_sym"], width, t["plane"], t["classes"], t["esc_sym"], t["chunks"],
                            fitted.vocab_size)

    assert run(20)[0] == -1 and np.array_equal(out[0], x.reshape(-1))
    for w in (1, 7, 239, 240, 241, 1000):
        row, err, _ = run(w)
        assert row == 0 and err != 0
    assert run(0)[:2] == (0, k.TABLE) and run(-3)[:2] == (0, k.TABLE)


def test_a_video_model_keeps_its_frame_geometry():
    """With a plane (frames), widths are checked and then ignored: the model's width codes."""
    rng = np.random.default_rng(5)
    clips = [np.repeat(rng.integers(0, 64, 64), 4).reshape(4, 8, 8) for _ in range(10)]
    c = get_codec("rans-ctx", 64)
    c.fit(clips)
    assert c.params["plane"] == 64
    xs = [cl.reshape(-1) for cl in clips[:3]]
    payloads = c.encode_batch(xs, widths=[16, 32, 4])
    assert payloads == c.encode_batch(xs)
    assert all(np.array_equal(d, x) for d, x in zip(c.decode_batch(payloads, 256, widths=[16, 32, 4]), xs))
    with pytest.raises(CodecError, match="batch row 0"):
        c.decode_batch(payloads, 256, widths=[3, 32, 4])
