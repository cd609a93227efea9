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
import hashlib
import operator
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import zstandard

from tokshard.errors import CodecError

MAX_SAMPLE_TOKENS = 1 << 26       # tokens in one sample (see the module doc)
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

    def encode_batch(self, batch: Sequence[np.ndarray]) -> list[bytes]:
        return [self.encode(t) for t in batch]

    def decode_batch(self, payloads: Sequence[bytes | memoryview],
                     n_tokens: int | Sequence[int]) -> list[np.ndarray]:
        return [self.decode(p, n) for p, n in zip(payloads, self._counts(payloads, n_tokens))]

    def decode_matrix(self, payloads: Sequence[bytes | memoryview], n_tokens: int) -> np.ndarray:
        """`decode_batch` of samples that all hold `n_tokens`, as one (len(payloads), n_tokens) array."""
        rows = self.decode_batch(payloads, n_tokens)
        return np.stack(rows) if rows else np.empty((0, _count(n_tokens)), self.dtype)

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
