"""`tokshard.codec(...)`: the codecs for code outside tokshard (issue 17's small public API):
batch in, batch out, shapes kept, wide vocabularies through every codec, typed errors."""

from __future__ import annotations

import numpy as np
import pytest

import tokshard
from tokshard.errors import CodecError
from tokshard.pipeline.format.codecs import CODECS


def smooth(rng, n, vocab, shape=(16, 16)):
    """Token grids with local structure (as a tokenizer's are), below `vocab`."""
    walk = np.cumsum(rng.integers(-3, 4, (n, int(np.prod(shape)))), axis=1) + rng.integers(0, vocab, (n, 1))
    return (walk % vocab).reshape(n, *shape)


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("vocab", [1024, 2**18])
def test_every_codec_round_trips_batches_of_narrow_and_wide_vocabularies(name, vocab):
    rng = np.random.default_rng(vocab)
    train, tokens = smooth(rng, 64, vocab), smooth(rng, 9, vocab)
    c = tokshard.codec(name, vocab_size=vocab).fit(train)
    assert c.dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    payloads = c.encode_batch(tokens)
    assert len(payloads) == 9 and all(isinstance(p, bytes) for p in payloads)
    back = c.decode_batch(payloads, (16, 16))
    assert back.shape == (9, 16, 16) and back.dtype == c.dtype and np.array_equal(back, tokens)
    # Rebuilt from what a manifest keeps: the description and the state.
    again = tokshard.codec_from(c.describe(), vocab, c.state())
    assert np.array_equal(again.decode_batch(payloads, 256), tokens.reshape(9, 256))
    # Samples of different grids (a variable-grid dataset): one shape per payload.
    grids = [smooth(rng, 1, vocab, s)[0] for s in ((8, 12), (16, 16), (5,))]
    out = c.decode_batch(c.encode_batch(grids), [(8, 12), (16, 16), 5])
    assert all(np.array_equal(a, b) for a, b in zip(out, grids))


def test_bad_input_is_a_codec_error_naming_it():
    c = tokshard.codec("zstd", vocab_size=1000)
    good = c.encode_batch(np.zeros((2, 4), np.int64))
    for tokens, message in ((np.full((1, 4), 1000), r"\[0, 1000\)"), (np.full((1, 4), -1), r"\[0, 1000\)"),
                            (np.zeros((1, 4)), "integer"), (np.array(3), "batch of samples"), (7, "sequence")):
        with pytest.raises(CodecError, match=message):
            c.encode_batch(tokens)
    for shape, message in ((0, "positive"), ((4, -1), "positive"), ([(2, 2)], "one shape per payload"),
                           ("4", "one sample shape")):
        with pytest.raises(CodecError, match=message):
            c.decode_batch(good, shape)
    with pytest.raises(CodecError):
        c.decode_batch([good[0][:-3]], 4)                  # a truncated payload
    with pytest.raises(CodecError):
        c.decode_batch(good, 5)                            # the wrong token count
    with pytest.raises(CodecError, match="unknown codec"):
        tokshard.codec("gzip", vocab_size=1000)
    with pytest.raises(CodecError, match="no parameter"):
        tokshard.codec("zstd", vocab_size=1000, lvl=3)
    trained = tokshard.codec("rans-ctx", vocab_size=1000)
    with pytest.raises(CodecError, match="needs fit"):
        trained.encode_batch(np.zeros((1, 4), np.int64))
    trained.fit(np.random.default_rng(0).integers(0, 1000, (32, 64)))
    state = bytearray(trained.state())
    state[len(state) // 2] ^= 1
    with pytest.raises(CodecError):
        tokshard.codec_from(trained.describe(), 1000, bytes(state))


@pytest.mark.parametrize("name", ["raw", "zstd", "rans-ctx"])
def test_a_reader_asking_for_a_type_too_narrow_for_the_codebook_gets_a_codec_error(name):
    """A 2^18 codebook read back as uint16 would wrap codes above 65,535 into other codes:
    refused, naming the vocabulary and the type it needs; a wide-enough type is given."""
    rng = np.random.default_rng(5)
    tokens = smooth(rng, 4, 2**18)
    assert tokens.max() > 65535
    c = tokshard.codec(name, vocab_size=2**18).fit(smooth(rng, 32, 2**18))
    payloads = c.encode_batch(tokens)
    for narrow in ("uint16", np.int16, "float32"):
        with pytest.raises(CodecError, match="cannot hold this codec's codes: a vocabulary of 262,144 needs uint32"):
            c.decode_batch(payloads, (16, 16), dtype=narrow)
    with pytest.raises(CodecError, match="not a numpy dtype"):
        c.decode_batch(payloads, (16, 16), dtype="no-such-type")
    wide = c.decode_batch(payloads, (16, 16), dtype=np.int64)
    assert wide.dtype == np.int64 and np.array_equal(wide, tokens)
    narrow_ok = tokshard.codec(name, vocab_size=1024).fit(smooth(rng, 32, 1024))
    small = smooth(rng, 2, 1024)
    assert narrow_ok.decode_batch(narrow_ok.encode_batch(small), [(16, 16)] * 2, dtype="uint16")[0].dtype == np.uint16
