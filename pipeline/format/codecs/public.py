"""The codecs for code outside tokshard: `tokshard.codec(name, vocab_size=V, **params)`.

A training or preprocessing script that keeps tokens its own way (a LlamaGen `extract_codes`
folder, a TiTok JSONL) can store them with the same codecs as a tokshard dataset, without
the rest of tokshard. `Codec` is a small facade over a registered `TokenCodec`: whole
batches in, whole batches out, shapes kept, every problem a `CodecError`.

    c = tokshard.codec("rans-ctx", vocab_size=2**18)
    c.fit(train_tokens)                     # (N, 16, 16) ints; a no-op for untrained codecs
    payloads = c.encode_batch(tokens)       # list of bytes, one per sample
    back = c.decode_batch(payloads, (16, 16))   # (B, 16, 16), uint16 or uint32 as V needs
    back = c.decode_batch(payloads, [(12, 21), (16, 16)])   # samples of different grids: a list
    state = c.state(); desc = c.describe()  # to rebuild it: tokshard.codec_from(desc, V, state)

A 2-D sample (h, w) is coded as h rows of w tokens (rans-ctx's context is the token to the
left and the row above), so a batch may mix grids; `decode_batch` takes the same shapes.

Vocabularies up to 2**32 codes work through every codec; tokens come back as the narrowest
unsigned dtype that holds the vocabulary (uint16 up to 65,536, else uint32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tokshard.errors import CodecError
from tokshard.pipeline.format.codecs.base import TokenCodec
from tokshard.pipeline.format.codecs.registry import codec_from_description, get_codec

Shape = int | Sequence[int]


class Codec:
    """A registered codec behind batch-shaped calls (see the module docstring)."""

    def __init__(self, codec: TokenCodec):
        self._codec = codec

    @property
    def name(self) -> str:
        return self._codec.name

    @property
    def vocab_size(self) -> int:
        return self._codec.vocab_size

    @property
    def dtype(self) -> np.dtype:
        """The dtype decoded tokens come back as."""
        return self._codec.dtype

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._codec.params)

    @property
    def needs_fit(self) -> bool:
        return self._codec.needs_fit

    def __repr__(self) -> str:
        return f"tokshard.codec({self.name!r}, vocab_size={self.vocab_size}, {self.params})"

    def fit(self, tokens: np.ndarray | Sequence[np.ndarray]) -> Codec:
        """Train the codec's state on sample tokens (an (N, ...) array or N arrays); a no-op for
        codecs without state. Returns the codec."""
        self._codec.fit([self._checked(t) for t in _samples(tokens)])
        return self

    def encode_batch(self, tokens: np.ndarray | Sequence[np.ndarray]) -> list[bytes]:
        """One payload per sample of `tokens` (a (B, ...) array, or B arrays of any shapes). A
        2-D (h, w) sample is coded as a grid of rows of w (rans-ctx), so decode it with its
        shape: `decode_batch(payloads, [(h, w), ...])`."""
        if self._codec.needs_fit and self._codec.state() is None:
            raise CodecError(f"codec {self.name!r} needs fit() on sample tokens before it encodes")
        samples = [self._checked(t) for t in _samples(tokens)]
        widths = [_width(s.shape) if s.size else None for s in samples]
        return self._codec.encode_batch(samples, widths=None if all(w is None for w in widths) else widths)

    def decode_batch(self, payloads: Sequence[bytes | memoryview], shape: Shape | Sequence[Shape],
                     dtype: Any = None) -> np.ndarray | list[np.ndarray]:
        """Payloads back to tokens: with one sample `shape` (an int or a tuple), a (B, *shape)
        array; with one shape per payload (samples of different grids), a list of arrays.
        `dtype`: the integer type to return them in (default `self.dtype`); one that cannot hold
        every code of the vocabulary (uint16 for a 2^18 codebook) is a CodecError, not a
        silent wrap-around."""
        if self._codec.needs_fit and self._codec.state() is None:
            raise CodecError(f"codec {self.name!r} has no state: fit() it, or rebuild it with its state")
        want = self._dtype(dtype)
        payloads = list(payloads)
        one = _shape(shape)
        if one is not None:
            n = math.prod(one)
            out = self._codec.decode_matrix(payloads, n, widths=_width(one)).reshape(len(payloads), *one)
            return out if want is None else out.astype(want)
        shapes = [_shape(s) for s in shape]  # type: ignore[union-attr]
        if any(s is None for s in shapes) or len(shapes) != len(payloads):
            raise CodecError(f"shape must be one sample shape, or one shape per payload ({len(payloads)}); "
                             f"got {shape!r:.80}")
        counts = [math.prod(s) for s in shapes if s is not None]
        widths = [_width(s) for s in shapes if s is not None]
        rows = self._codec.decode_batch(payloads, counts,
                                        widths=None if all(w is None for w in widths) else widths)
        return [(r if want is None else r.astype(want)).reshape(s) for r, s in zip(rows, shapes) if s is not None]

    def _dtype(self, dtype: Any) -> np.dtype | None:
        if dtype is None:
            return None
        try:
            want = np.dtype(dtype)
        except TypeError:
            raise CodecError(f"dtype {dtype!r:.40} is not a numpy dtype") from None
        if want.kind not in "iu" or np.iinfo(want).max < self.vocab_size - 1:
            raise CodecError(f"dtype {want} cannot hold this codec's codes: a vocabulary of {self.vocab_size:,} "
                             f"needs {self.dtype} (or a wider integer type)")
        return want

    def describe(self) -> dict:
        """The codec's versioned description (name, version, params, state checksum), as a
        manifest records it."""
        return self._codec.describe()

    def state(self) -> bytes | None:
        """The trained state (None for codecs without one): keep it beside the payloads."""
        return self._codec.state()

    def _checked(self, tokens: Any) -> np.ndarray:
        a = np.asarray(tokens)
        if a.dtype.kind not in "iu":
            raise CodecError(f"tokens must be integers, got dtype {a.dtype}")
        return a


def _samples(tokens: np.ndarray | Sequence[np.ndarray]) -> list[Any]:
    if isinstance(tokens, np.ndarray):
        if tokens.ndim < 1:
            raise CodecError("tokens must hold a batch of samples (an (N, ...) array or a list of arrays)")
        return list(tokens)
    try:
        return list(tokens)
    except TypeError:
        raise CodecError(f"tokens must be an array or a sequence of arrays, got {type(tokens).__name__}") from None


def _shape(shape: Any) -> tuple[int, ...] | None:
    """`shape` as one sample's shape, or None if it is not one (a sequence of shapes)."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        dims: tuple = (int(shape),)
    elif isinstance(shape, (tuple, list)) and shape and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                                                  for d in shape):
        dims = tuple(int(d) for d in shape)
    else:
        return None
    if not dims or any(d < 1 for d in dims):
        raise CodecError(f"a sample shape needs positive sizes, got {shape!r}")
    return dims


def _width(shape: tuple[int, ...]) -> int | None:
    """The row width a sample of `shape` is coded in: a 2-D (h, w) grid's w (rans-ctx codes
    each grid in its own rows); None (the codec's own width) for other shapes."""
    return shape[1] if len(shape) == 2 else None


def codec(name: str, vocab_size: int, **params: Any) -> Codec:
    """The codec `name` for tokens below `vocab_size` (see the module docstring)."""
    return Codec(get_codec(name, vocab_size, **params))


def codec_from(description: dict, vocab_size: int, state: bytes | None = None) -> Codec:
    """A codec rebuilt from its `describe()` and `state()` (the state is checked against the
    description's checksum)."""
    return Codec(codec_from_description(description, vocab_size, state))
