"""The codec contract: one sample's integer tokens <-> a compact, bit-exact payload.

A codec is named and versioned because the manifest records which codec
(version, params, trained state) wrote the shards and readers rebuild it from
that record (`describe()` -> `codec_from_description()`).

Decoding is defensive: a payload that can be detected as bad (wrong length,
out-of-vocabulary value, broken zstd frame, trailing bytes) raises
`CodecError`, never another exception type and never a wrong array. What a
codec cannot detect (e.g. a bit flip that still yields in-range tokens) is the
shard sha256's job.
"""

from __future__ import annotations

import abc
import hashlib
import operator
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from tokshard.errors import CodecError


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
    try:
        n = operator.index(n_tokens)
    except TypeError:
        raise CodecError(f"n_tokens must be an integer, got {n_tokens!r}") from None
    if n < 0:
        raise CodecError(f"n_tokens must be >= 0, got {n}")
    return n


def _bytes_view(payload: Any) -> memoryview:
    try:
        mv = memoryview(payload)
    except TypeError:
        raise CodecError(f"payload must be bytes-like, got {type(payload).__name__}") from None
    return mv if mv.format == "B" and mv.ndim == 1 else memoryview(mv.tobytes())


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

    # -- helpers for subclasses ---------------------------------------------------
    def _counts(self, payloads: Sequence[bytes | memoryview], n_tokens: int | Sequence[int]) -> list[int]:
        if isinstance(n_tokens, (int, np.integer)):
            return [_count(n_tokens)] * len(payloads)
        counts = [_count(n) for n in n_tokens]
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
