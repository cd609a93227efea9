"""The codec contract: one sample's integer tokens <-> a compact, bit-exact payload.

A codec is named and versioned because the manifest records which codec
(version, params, trained state) wrote the shards and readers rebuild it from
that record (`describe()` -> `codec_from_description()`).

Decoding is defensive: a payload that can be detected as bad (wrong length,
out-of-vocabulary value, broken zstd frame, trailing bytes) raises
`CodecError`, never another exception type and never a wrong array. What a
codec cannot detect (e.g. a bit flip that still yields in-range tokens) is the
shard sha256's job.

Resources are bounded before they are spent. Every count or size read from a
dataset (a sample's `n_tokens`, a state's header fields and table sizes, a zstd
frame's declared content size) is checked for type and range against what the
codec's params and `vocab_size` imply, and against the absolute caps below,
before anything is allocated or decompressed; a breach is a `CodecError` naming
the field. Decoding a sample allocates O(n_tokens) memory, never more.

- `MAX_SAMPLE_TOKENS` (2**26): tokens in one sample. 256x a 64-frame clip of
  64x64 grids, and at most 256 MiB of decoded uint32 tokens.
- A zstd frame may declare at most `ZSTD_BLOCK_MAX` (128 KiB, the format's block
  size limit) of content per 3 bytes of frame (a block header's size), so a
  payload that claims more than the format can encode is refused without
  decompressing it. Per-codec caps (rANS state tables, zstd dictionaries) live
  with the codecs.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import inspect
import operator
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import zstandard

from tokshard.errors import CodecError

MAX_SAMPLE_TOKENS = 1 << 26       # tokens in one sample (see the module doc)
# Row widths for decode_batch: one per payload (None: the codec's own), one for all, or none.
Widths = int | Sequence[int | None] | None
ZSTD_BLOCK_MAX = 128 * 1024       # the zstd format's largest block content
_ZSTD_MIN_BLOCK = 3               # a block header; every block is at least this long


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id below `vocab_size`."""
    if isinstance(vocab_size, bool):
        raise ValueError(f"vocab_size must be an integer, got {vocab_size!r}")
    v = operator.index(vocab_size)
    if not 1 <= v <= 2**32:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {v}")
    return np.dtype(np.uint16) if v <= 65536 else np.dtype(np.uint32)


def _count(n_tokens: Any) -> int:
    # n_tokens comes from a shard index, i.e. from data, so a bad one is a CodecError too.
    if isinstance(n_tokens, (bool, np.bool_)):
        raise CodecError(f"n_tokens must be an integer, got {n_tokens!r}")
    try:
        n = operator.index(n_tokens)
    except TypeError:
        raise CodecError(f"n_tokens must be an integer, got {type(n_tokens).__name__}") from None
    if n < 0:
        raise CodecError(f"n_tokens must be >= 0, got {n}")
    if n > MAX_SAMPLE_TOKENS:
        raise CodecError(f"n_tokens {n} is above the limit of {MAX_SAMPLE_TOKENS} tokens per sample")
    return n


def _zstd_content_bound(frame_bytes: int) -> int:
    """The most content any zstd frame of `frame_bytes` bytes can decompress to."""
    return (frame_bytes // _ZSTD_MIN_BLOCK) * ZSTD_BLOCK_MAX


def _zstd_check_frame(data: bytes | memoryview, expected: int, what: str) -> None:
    """Refuse a zstd frame whose header does not declare exactly `expected` content bytes.

    python-zstandard allocates whatever a frame header declares, `max_output_size`
    notwithstanding, so this runs before any decompression; a frame without a
    declared size is refused too (tokshard always writes one).
    """
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise CodecError(f"{what}: bad zstd frame header: {e}") from None
    if declared != expected:
        raise CodecError(f"{what}: frame declares {'no' if declared < 0 else declared} content bytes; "
                         f"expected {expected}")
    if expected > _zstd_content_bound(len(data)):
        raise CodecError(f"{what}: a {len(data)}-byte zstd frame cannot hold {expected} content bytes")


def _zstd_decompress_exact(dctx: zstandard.ZstdDecompressor, data: bytes | memoryview, expected: int,
                           what: str, *, header_checked: bool = False) -> bytes:
    """Decompress one zstd frame (nothing after it) of exactly `expected` content bytes.

    The header is checked first (`_zstd_check_frame`, unless the caller just did),
    and the output is capped at `expected` bytes, so no more than that is ever
    allocated.
    """
    if not header_checked:
        _zstd_check_frame(data, expected, what)
    try:
        raw = dctx.decompress(data, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CodecError(f"{what}: corrupt zstd frame: {e}") from None
    if len(raw) != expected:
        raise CodecError(f"{what}: zstd frame decompressed to {len(raw)} bytes, expected {expected}")
    return raw


def _taking_widths(fn: Any) -> Any:
    """`fn` (an encode_batch, decode_batch or decode_matrix without `widths`) as one that
    takes and checks them."""
    if fn.__name__ == "encode_batch":
        @functools.wraps(fn)
        def encode(self: TokenCodec, batch: Sequence[np.ndarray], *, widths: Widths = None) -> Any:
            if widths is not None:
                self._widths([np.size(t) for t in batch], widths)
            return fn(self, batch)
        return encode

    @functools.wraps(fn)
    def decode(self: TokenCodec, payloads: Sequence[bytes | memoryview], n_tokens: Any, *,
               widths: Widths = None) -> Any:
        if widths is not None:
            self._widths(self._counts(payloads, n_tokens), widths)
        return fn(self, payloads, n_tokens)
    return decode


def _bytes_view(payload: Any) -> memoryview:
    try:
        mv = memoryview(payload)
    except TypeError:
        raise CodecError(f"payload must be bytes-like, got {type(payload).__name__}") from None
    # Contiguous too: zstd and numpy refuse a strided view (e.g. memoryview(b)[::2]).
    return mv if mv.format == "B" and mv.ndim == 1 and mv.c_contiguous else memoryview(mv.tobytes())


class TokenCodec(abc.ABC):
    """Base class; subclasses set `name`, `version`, `param_defaults` and the codec proper."""

    name: ClassVar[str]
    version: ClassVar[int]
    needs_fit: ClassVar[bool] = False
    # Every accepted parameter with its default; describe() records all of them so a
    # reader does not depend on this code's defaults.
    param_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, vocab_size: int, **params: Any):
        unknown = sorted(set(params) - set(self.param_defaults))
        if unknown:
            raise CodecError(f"codec {self.name!r} has no parameter(s) {unknown}; "
                             f"known: {sorted(self.param_defaults)}")
        try:
            self.dtype = token_dtype(vocab_size)
        except (TypeError, ValueError) as e:
            raise CodecError(f"codec {self.name!r}: {e}") from None
        self.vocab_size = operator.index(vocab_size)
        self._le = self.dtype.newbyteorder("<")   # the on-disk byte order, whatever the host's
        self.params = {**self.param_defaults, **params}

    # -- trained state (stateless by default) --------------------------------------
    def fit(self, samples: Sequence[np.ndarray]) -> None:  # noqa: B027 - a deliberate no-op default, not abstract
        """Train state from sample tokens; a no-op for codecs that need none."""

    def state(self) -> bytes | None:
        return None

    def load_state(self, state: bytes) -> None:
        raise CodecError(f"codec {self.name!r} is stateless; it cannot load a state")

    def describe(self) -> dict:
        st = self.state()
        return {
            "name": self.name,
            "version": self.version,
            "params": dict(sorted(self.params.items())),
            "state_sha256": None if st is None else hashlib.sha256(st).hexdigest(),
        }

    # -- the codec proper ---------------------------------------------------------
    @abc.abstractmethod
    def encode(self, tokens: np.ndarray) -> bytes: ...

    @abc.abstractmethod
    def decode(self, payload: bytes | memoryview, n_tokens: int) -> np.ndarray: ...

    def encode_batch(self, batch: Sequence[np.ndarray], *, widths: Widths = None) -> list[bytes]:
        """One payload per sample. `widths`: each sample's row width (its grid's w), for
        codecs whose coding depends on it (rans-ctx: decode with the same widths); None (or
        a None entry): the codec's own width, whatever the sample's shape. Checked as in
        `decode_batch`, and ignored by codecs that code the same bytes whatever the grid."""
        self._widths([np.size(t) for t in batch], widths)
        return [self.encode(t) for t in batch]

    def decode_batch(self, payloads: Sequence[bytes | memoryview], n_tokens: int | Sequence[int], *,
                     widths: Widths = None) -> list[np.ndarray]:
        """Decode each payload of its token count. `widths`: each sample's row width (its
        grid's w), for codecs whose coding depends on it (rans-ctx); None (or a None entry):
        the codec's own width. Validated here (a positive int dividing the row's token
        count, else a CodecError naming the row) and otherwise ignored: this default, and
        every codec that does not override `decode_batch` with a `widths` of its own,
        codes the same bytes whatever the grid (rans-ctx: the widths `encode_batch` was given)."""
        counts = self._counts(payloads, n_tokens)
        self._widths(counts, widths)
        return [self.decode(p, n) for p, n in zip(payloads, counts)]

    def decode_matrix(self, payloads: Sequence[bytes | memoryview], n_tokens: int, *,
                      widths: Widths = None) -> np.ndarray:
        """`decode_batch` of samples that all hold `n_tokens`, as one (len(payloads), n_tokens) array."""
        rows = self.decode_batch(payloads, n_tokens, widths=widths)
        return np.stack(rows) if rows else np.empty((0, _count(n_tokens)), self.dtype)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's `encode_batch`/`decode_batch`/`decode_matrix` written without `widths`
        (before the keyword existed, or because its coding ignores the grid) still takes it:
        the widths are validated, then the override runs without them."""
        super().__init_subclass__(**kwargs)
        for name in ("encode_batch", "decode_batch", "decode_matrix"):
            fn = cls.__dict__.get(name)
            if callable(fn) and "widths" not in inspect.signature(fn).parameters:
                setattr(cls, name, _taking_widths(fn))

    # -- helpers for subclasses ---------------------------------------------------
    def _counts(self, payloads: Sequence[bytes | memoryview], n_tokens: int | Sequence[int]) -> list[int]:
        if isinstance(n_tokens, (int, np.integer)):
            return [_count(n_tokens)] * len(payloads)
        if isinstance(n_tokens, np.ndarray) and n_tokens.ndim == 0:
            return [_count(n_tokens)] * len(payloads)
        try:
            items = list(n_tokens)
        except TypeError:
            raise CodecError(f"n_tokens must be an integer or a sequence of integers, "
                             f"got {type(n_tokens).__name__}") from None
        counts = [_count(n) for n in items]
        if len(counts) != len(payloads):
            raise CodecError(f"{len(payloads)} payloads but {len(counts)} token counts")
        return counts

    def _widths(self, counts: list[int], widths: Widths) -> list[int | None] | None:
        """`widths` checked against the rows' token counts: None, or one entry per row
        (None: the codec's own width; else an int >= 1 that divides the row's count)."""
        if widths is None:
            return None
        if isinstance(widths, (int, np.integer)) or (isinstance(widths, np.ndarray) and widths.ndim == 0):
            w = self._width(0, widths)
            bad = [i for i, n in enumerate(counts) if n % w] if w is not None else []
            if bad:
                self._width(bad[0], w, counts[bad[0]])
            return [w] * len(counts)
        try:
            items: list[Any] = list(widths)
        except TypeError:
            raise CodecError(f"{self.name}: widths must be an int or a sequence of ints, "
                             f"got {type(widths).__name__}") from None
        if len(items) != len(counts):
            raise CodecError(f"{self.name}: {len(counts)} payloads but {len(items)} row widths")
        return [self._width(i, w, n) for i, (n, w) in enumerate(zip(counts, items))]

    def _width(self, row: int, w: Any, n: int = 0) -> int | None:
        """One row's width: None, or an int >= 1 dividing its n tokens."""
        if w is None:
            return None
        if isinstance(w, (bool, np.bool_)):
            raise CodecError(f"{self.name}: row width of batch row {row} must be an integer, got {w!r}")
        try:
            w = operator.index(w)
        except TypeError:
            raise CodecError(f"{self.name}: row width of batch row {row} must be an integer, "
                             f"got {type(w).__name__}") from None
        if not 1 <= w <= MAX_SAMPLE_TOKENS or n % w:
            raise CodecError(f"{self.name}: row width {w} of batch row {row} does not divide its "
                             f"{n} tokens into rows")
        return w

    def _to_le(self, tokens: np.ndarray) -> np.ndarray:
        """Validated, flattened (C order) little-endian copy/view of `tokens`."""
        a = np.asarray(tokens)
        if a.dtype.kind not in "iu":
            raise CodecError(f"tokens must be an integer array, got dtype {a.dtype}")
        a = a.reshape(-1)
        if a.size:
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= self.vocab_size:
                raise CodecError(f"token values must be in [0, {self.vocab_size}), "
                                 f"got min {lo} max {hi}")
        return a.astype(self._le, copy=False)

    def _check_range(self, values: np.ndarray, what: str = "payload") -> None:
        if values.size and self.vocab_size < 2 ** (8 * self.dtype.itemsize):
            hi = int(values.max())
            if hi >= self.vocab_size:
                raise CodecError(f"{what} decodes to token {hi} >= vocab_size {self.vocab_size}")

    def _from_raw(self, raw: bytes | memoryview, n: int) -> np.ndarray:
        expected = n * self.dtype.itemsize
        if len(raw) != expected:
            raise CodecError(f"{self.name}: {len(raw)} bytes where {n} tokens need {expected}")
        # Copy: frombuffer over bytes is read-only, and the host may be big-endian.
        out = np.frombuffer(raw, dtype=self._le).astype(self.dtype)
        self._check_range(out)
        return out
