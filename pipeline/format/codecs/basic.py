"""The general-purpose codecs: `raw` (the reference), `bitpack` (fixed width),
`zstd` (per sample) and `zstd-dict` (a dictionary trained per dataset)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import zstandard

from tokshard.errors import CodecError
from tokshard.pipeline.format.codecs.base import (
    ZSTD_BLOCK_MAX,
    TokenCodec,
    Widths,
    _bytes_view,
    _count,
    _zstd_check_frame,
    _zstd_decompress_exact,
)
from tokshard.pipeline.format.codecs.registry import register_codec

MAX_DICT_SIZE = 1 << 24   # zstd-dict: the largest dictionary (see ZstdDictCodec)


@register_codec
class RawCodec(TokenCodec):
    """Little-endian token_dtype bytes: the reference codec, no compression."""

    name = "raw"
    version = 1

    def encode(self, tokens: np.ndarray) -> bytes:
        return self._to_le(tokens).tobytes()

    def decode(self, payload: bytes | memoryview, n_tokens: int) -> np.ndarray:
        return self._from_raw(_bytes_view(payload), _count(n_tokens))


@register_codec
class BitpackCodec(TokenCodec):
    """Each token in exactly `bits` bits, LSB-first, zero-padded to a whole byte.

    `bits = max(1, ceil(log2(vocab_size)))`, so the payload is ceil(n*bits/8) bytes
    (256 tokens of vocab 1024 -> 320 bytes). Padding bits must be zero, which keeps
    payloads canonical: decode(p) re-encodes to exactly p.
    """

    name = "bitpack"
    version = 1

    def __init__(self, vocab_size: int, **params: Any):
        super().__init__(vocab_size, **params)
        self.bits = max(1, (self.vocab_size - 1).bit_length())

    def payload_size(self, n_tokens: int) -> int:
        return (n_tokens * self.bits + 7) // 8

    def _pack(self, le: np.ndarray) -> np.ndarray:
        """(B, n) little-endian tokens -> (B, payload_size(n)) uint8."""
        b, n = le.shape
        isz = self.dtype.itemsize
        bits = np.unpackbits(np.ascontiguousarray(le).view(np.uint8).reshape(b, n, isz),
                             axis=2, bitorder="little")
        return np.packbits(bits[:, :, :self.bits].reshape(b, n * self.bits),
                           axis=1, bitorder="little")

    def _unpack(self, data: np.ndarray, n: int) -> np.ndarray:
        """(B, payload_size(n)) uint8 -> (B, n) tokens, validated.

        Gathers the <= 5 bytes each token straddles and shifts; a handful of
        whole-array operations instead of expanding to one byte per bit.
        """
        b, nbytes = data.shape
        tail = (n * self.bits) % 8
        if tail and nbytes and (data[:, -1] >> tail).any():
            row = int(np.flatnonzero(data[:, -1] >> tail)[0])
            raise CodecError(f"bitpack: nonzero padding bits (batch row {row})")
        # bits + 7-bit offset must fit
        acc_t: type[np.unsignedinteger[Any]] = np.uint32 if self.bits <= 25 else np.uint64
        span = (self.bits + 14) // 8
        offset = np.arange(n, dtype=np.int64) * self.bits
        first, shift = offset >> 3, (offset & 7).astype(acc_t)
        padded = np.zeros((b, nbytes + span), np.uint8)
        padded[:, :nbytes] = data
        acc = np.zeros((b, n), acc_t)
        for k in range(span):
            acc |= padded[:, first + k].astype(acc_t) << acc_t(8 * k)
        values = (acc >> shift) & acc_t((1 << self.bits) - 1)
        if values.size and (1 << self.bits) != self.vocab_size:
            bad = values >= self.vocab_size
            if bad.any():
                row, col = (int(i[0]) for i in np.nonzero(bad))
                raise CodecError(f"bitpack: token {int(values[row, col])} >= vocab_size "
                                 f"{self.vocab_size} at position {col} (batch row {row})")
        return values.astype(self.dtype)

    def encode(self, tokens: np.ndarray) -> bytes:
        return self._pack(self._to_le(tokens)[None, :]).tobytes()

    def decode(self, payload: bytes | memoryview, n_tokens: int) -> np.ndarray:
        n, mv = _count(n_tokens), _bytes_view(payload)
        if len(mv) != self.payload_size(n):
            raise CodecError(f"bitpack: {len(mv)} bytes where {n} tokens of {self.bits} bits "
                             f"need {self.payload_size(n)}")
        return self._unpack(np.frombuffer(mv, np.uint8)[None, :], n)[0]

    def encode_batch(self, batch: Sequence[np.ndarray], *, widths: Widths = None) -> list[bytes]:
        self._widths([np.size(t) for t in batch], widths)     # (checked; bit packing ignores the grid)
        les = [self._to_le(t) for t in batch]   # per sample: np.stack would promote mixed dtypes
        if len({a.size for a in les}) != 1:
            return [self._pack(a[None, :]).tobytes() for a in les]
        return [row.tobytes() for row in self._pack(np.stack(les))]

    def decode_batch(self, payloads: Sequence[bytes | memoryview],
                     n_tokens: int | Sequence[int], *, widths: Widths = None) -> list[np.ndarray]:
        counts = self._counts(payloads, n_tokens)
        self._widths(counts, widths)
        if not payloads or len(set(counts)) != 1:
            return [self.decode(p, n) for p, n in zip(payloads, counts)]
        n = counts[0]
        size = self.payload_size(n)
        views = [_bytes_view(p) for p in payloads]
        if any(len(v) != size for v in views):
            return [self.decode(v, n) for v in views]   # names the bad one
        data = np.frombuffer(b"".join(views), np.uint8).reshape(len(views), size)
        # Rows are views of one (B, n) array: one allocation for the whole batch.
        return list(self._unpack(data, n))


@register_codec
class ZstdCodec(TokenCodec):
    """zstd of the raw little-endian bytes.

    Level 19 by default: conversion is written once and read many times, zstd
    decode speed barely depends on the level, and on ~500-byte payloads level 19
    costs well under 0.1 ms per sample. Frames carry the content size (so decode
    can bound its output exactly) but no checksum and no dict id (4 bytes each on
    a ~500-byte payload; the shard sha256 covers integrity).
    """

    name = "zstd"
    version = 1
    param_defaults: ClassVar[dict[str, Any]] = {"level": 19}

    def __init__(self, vocab_size: int, **params: Any):
        super().__init__(vocab_size, **params)
        level = self.params["level"]
        if (isinstance(level, bool) or not isinstance(level, int)   # -(1 << 17): ZSTD_minCLevel()
                or not -(1 << 17) <= level <= zstandard.MAX_COMPRESSION_LEVEL):
            raise CodecError(f"{self.name}: level must be an int in "
                             f"[-131072, {zstandard.MAX_COMPRESSION_LEVEL}], got {level!r}")
        self._generation = 0              # bumped when the dictionary changes
        self._tls = threading.local()

    # zstd contexts are not thread-safe (python-zstandard releases the GIL inside
    # them), so each thread gets its own pair, reused across calls.
    def _zdict(self) -> zstandard.ZstdCompressionDict | None:
        return None

    def _contexts(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor, bytes]:
        ctx = getattr(self._tls, "ctx", None)
        if ctx is None or ctx[0] != self._generation:
            zd = self._zdict()
            try:
                cctx = zstandard.ZstdCompressor(level=self.params["level"], dict_data=zd,
                                                write_checksum=False, write_dict_id=False,
                                                write_content_size=True)
                dctx = zstandard.ZstdDecompressor(dict_data=zd)
                empty = cctx.compress(b"")   # also proves the dictionary loads
            except zstandard.ZstdError as e:
                raise CodecError(f"{self.name}: cannot set up zstd: {e}") from None
            ctx = self._tls.ctx = (self._generation, cctx, dctx, empty)
        return ctx[1], ctx[2], ctx[3]

    def __getstate__(self) -> dict:
        # Codecs travel to data-loader workers; zstd contexts do not pickle.
        d = self.__dict__.copy()
        del d["_tls"]
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._tls = threading.local()

    def encode(self, tokens: np.ndarray) -> bytes:
        raw = self._to_le(tokens).tobytes()
        cctx, _, _ = self._contexts()
        return cctx.compress(raw)

    def decode(self, payload: bytes | memoryview, n_tokens: int) -> np.ndarray:
        n, mv = _count(n_tokens), _bytes_view(payload)
        _, dctx, empty = self._contexts()
        expected = n * self.dtype.itemsize
        # The declared content size must be exactly what n tokens take, checked before
        # decompressing (python-zstandard allocates whatever the header declares).
        _zstd_check_frame(mv, expected, f"{self.name}: {n} tokens")
        if expected == 0:
            # decompress() returns b"" for a 0-size header without reading the frame
            # body, so only the canonical empty frame is accepted.
            if mv != empty:
                raise CodecError(f"{self.name}: malformed empty-sample frame")
            return np.zeros(0, self.dtype)
        raw = _zstd_decompress_exact(dctx, mv, expected, f"{self.name}: {n} tokens", header_checked=True)
        return self._from_raw(raw, n)

    def decode_batch(self, payloads: Sequence[bytes | memoryview],
                     n_tokens: int | Sequence[int], *, widths: Widths = None) -> list[np.ndarray]:
        """`[decode(p, n) for ...]`, every check included, at a fraction of the per-sample cost.

        The checks of `decode`, hoisted out of the per-sample loop: first every frame
        header of the batch must declare exactly n * itemsize content bytes and no more
        than its frame's length can hold, and every 0-token sample must be the canonical
        empty frame; only then are the frames decompressed, each by zstd with
        `allow_extra_data=False` (one frame, nothing after it) into its checked size. The
        tokens of the whole batch are range-checked at once and the rows are views of one
        array. On any anomaly the batch goes through `decode` sample by sample, which
        raises the CodecError that names the sample and what is wrong.
        """
        counts = self._counts(payloads, n_tokens)
        self._widths(counts, widths)     # (checked; zstd ignores the grid)
        if not counts:
            return []
        views = [p if type(p) is bytes else _bytes_view(p) for p in payloads]
        rows = self._decode_batch_checked(views, counts)
        if rows is None:
            return [self.decode(v, n) for v, n in zip(views, counts)]
        return list(rows) if isinstance(rows, np.ndarray) else rows

    def decode_matrix(self, payloads: Sequence[bytes | memoryview], n_tokens: int, *,
                      widths: Widths = None) -> np.ndarray:
        counts = self._counts(payloads, n_tokens)
        self._widths(counts, widths)
        if not counts:
            return np.empty((0, _count(n_tokens)), self.dtype)
        views = [p if type(p) is bytes else _bytes_view(p) for p in payloads]
        rows = self._decode_batch_checked(views, counts)
        if isinstance(rows, np.ndarray):
            return rows                      # already one array: no np.stack copy
        return np.stack([self.decode(v, n) for v, n in zip(views, counts)])

    def _decode_batch_checked(self, views: list[bytes | memoryview],
                              counts: list[int]) -> np.ndarray | list[np.ndarray] | None:
        """decode_batch's fast path: the rows (one (B, n) array where every count is n), or
        None where `decode` must take over to name the error."""
        _, dctx, empty = self._contexts()
        sizes = [n * self.dtype.itemsize for n in counts]
        try:
            if [zstandard.frame_content_size(v) for v in views] != sizes:   # -1: no size declared
                return None
        except zstandard.ZstdError:
            return None
        lens = [len(v) for v in views]
        if (max(sizes) > min(lens) // 3 * ZSTD_BLOCK_MAX      # the batch's worst case, then each: _zstd_check_frame
                and any(s > k // 3 * ZSTD_BLOCK_MAX for s, k in zip(sizes, lens))):
            return None
        if 0 in sizes and any(v != empty for v, s in zip(views, sizes) if not s):
            return None   # decompress() would not read the body of a frame declaring 0 bytes
        decompress = dctx.decompress
        try:
            # (data, max_output_size, read_across_frames, allow_extra_data), positional:
            # keywords cost ~0.5 us a sample, 7-20% of the batch. The content size is
            # declared, so exactly that is allocated, and zstd refuses a frame that does
            # not fill it or has anything after it.
            raws = [decompress(v, s, False, False) for v, s in zip(views, sizes) if s]
        except zstandard.ZstdError:
            return None
        if [len(r) for r in raws] != [s for s in sizes if s]:
            return None
        # bytearray: writable, so on a little-endian host astype() has nothing to copy
        flat = np.frombuffer(bytearray().join(raws), dtype=self._le).astype(self.dtype, copy=False)
        del raws
        if flat.size and self.vocab_size < 2 ** (8 * self.dtype.itemsize) and int(flat.max()) >= self.vocab_size:
            return None
        n = counts[0]
        if counts.count(n) == len(counts):
            return flat.reshape(len(counts), n)   # one (B, n) array: decode_batch lists its rows
        ends = np.cumsum(counts).tolist()
        return [flat[e - k:e] for e, k in zip(ends, counts)]


@register_codec
class ZstdDictCodec(ZstdCodec):
    """zstd with a dictionary trained by `fit()` on sample tokens.

    The dictionary is trained with fixed fastCover parameters in one thread
    (deterministic: same samples -> same state bytes). `dict_size` is capped at a
    tenth of the training bytes (floor 256, zstd's minimum), since a dictionary
    larger than its evidence only adds noise. If zstd cannot train at all (fewer
    than 5 samples, tiny data), the dictionary is the tail of the concatenated
    samples used as raw content. `params["dict_kind"]` records which.
    State = 1-byte kind tag + dictionary bytes.

    Bounds: `dict_size` is at most `MAX_DICT_SIZE` (16 MiB: 1024x the default,
    ~150x zstd's own default; loading one costs ~100 MiB of zstd contexts), and a
    loaded state's dictionary is at most the description's `dict_size` bytes (what
    `fit` produces), checked before zstd parses it.
    """

    name = "zstd-dict"
    version = 1
    needs_fit = True
    param_defaults: ClassVar[dict[str, Any]] = {"level": 19, "dict_size": 16384,
                                                 "dict_kind": None}

    _KINDS = {b"T": "trained", b"R": "rawcontent"}
    _TRAIN_K, _TRAIN_D = 256, 8   # segment / dmer bytes; d=8 is 4 uint16 tokens
    _MIN_DICT = 256

    def __init__(self, vocab_size: int, **params: Any):
        super().__init__(vocab_size, **params)
        size, kind = self.params["dict_size"], self.params["dict_kind"]
        if isinstance(size, bool) or not isinstance(size, int) or not self._MIN_DICT <= size <= MAX_DICT_SIZE:
            raise CodecError(f"{self.name}: dict_size must be an int in [{self._MIN_DICT}, {MAX_DICT_SIZE}], "
                             f"got {size!r}")
        if kind not in (None, *self._KINDS.values()):
            raise CodecError(f"{self.name}: unknown dict_kind {kind!r}")
        self._state: bytes | None = None

    def fit(self, samples: Sequence[np.ndarray]) -> None:
        raw: list[bytes | bytearray | memoryview] = [self._to_le(s).tobytes() for s in samples]
        size = min(self.params["dict_size"], max(self._MIN_DICT, sum(map(len, raw)) // 10))
        try:
            trained = zstandard.train_dictionary(
                size, raw, k=min(self._TRAIN_K, size), d=self._TRAIN_D, f=20,
                split_point=1.0, accel=1, steps=1, threads=0, level=self.params["level"])
            state = b"T" + trained.as_bytes()
        except zstandard.ZstdError:
            state = b"R" + b"".join(raw)[-size:]
        self._install(state, expect_kind=None)

    def state(self) -> bytes | None:
        return self._state

    def load_state(self, state: bytes) -> None:
        mv = _bytes_view(state)
        self._check_size(len(mv))   # before copying it
        self._install(bytes(mv), expect_kind=self.params["dict_kind"])

    def _check_size(self, n: int) -> None:
        limit = 1 + self.params["dict_size"]
        if not 1 <= n <= limit:
            raise CodecError(f"{self.name}: state of {n} bytes; a kind tag plus a dictionary of at most "
                             f"dict_size={self.params['dict_size']} bytes is 1 to {limit}")

    def _install(self, state: bytes, expect_kind: str | None) -> None:
        self._check_size(len(state))
        kind = self._KINDS.get(state[:1])
        if kind is None:
            raise CodecError(f"{self.name}: state has unknown kind tag {state[:1]!r}")
        if expect_kind is not None and kind != expect_kind:
            raise CodecError(f"{self.name}: state holds a {kind} dictionary, "
                             f"description says {expect_kind}")
        old = self._state, self.params["dict_kind"]
        self._state, self.params["dict_kind"] = state, kind
        self._generation += 1
        try:
            self._contexts()
        except CodecError:
            self._state, self.params["dict_kind"] = old
            self._generation += 1
            raise

    def _zdict(self) -> zstandard.ZstdCompressionDict:
        if self._state is None:
            raise CodecError(f"{self.name}: no dictionary; call fit() or load_state() first")
        dict_type = (zstandard.DICT_TYPE_FULLDICT if self._state[:1] == b"T"
                     else zstandard.DICT_TYPE_RAWCONTENT)
        return zstandard.ZstdCompressionDict(self._state[1:], dict_type=dict_type)
