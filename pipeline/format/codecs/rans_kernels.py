"""Compiled rANS kernels for rans-unigram and rans-ctx (numba, cached on disk).

These code exactly the payloads `rans.py`'s numpy coder codes (same states, same
words, same checksum); `rans.py` keeps that coder as the reference and the fallback,
and imports this module lazily, on the first rANS encode or decode, so importing
tokshard does not pay numba's import (~0.6 s).

Why numba rather than Cython, a setuptools C extension or Rust: CI and every fresh
machine install with `pip install -e .` from PyPI alone. numba and llvmlite ship
manylinux/macOS/Windows wheels, so the kernels need no compiler, no build-system
change and no platform wheels of our own; a C/Cython/Rust extension would need a
compiler (or a Rust toolchain, which cannot be downloaded here) on every machine
that installs from source, plus wheels per platform for users. The cost is a JIT
compile on first use, which `cache=True` pays once per machine: numba writes the
machine code next to this file (`__pycache__/`, writable in an editable install)
or, where that is read-only (a site-packages install), in the user's cache
directory (or NUMBA_CACHE_DIR), and later processes load it in milliseconds.

One payload is one sequential stream, so the kernels decode a batch row by row (rans-ctx
two rows at a time, interleaved, so the two chains of dependent lookups overlap: 10-20%
faster; a pair that fails or escapes is decoded again row by row, for the error's row);
the per-token work is a few table lookups, which is what makes them faster than
zstd on 256-token images (the numpy coder must instead run all rows in lockstep).

Hostile payloads: the kernels never raise and never index out of bounds. Every
read of the payload (`p < end`) and every index into a table computed from decoded
data is compared with the table's size first; a failure stops the row and returns
an error code (`ERRORS`) that the codec turns into a CodecError naming the row.
Indexes that depend only on loop counters (a token's neighbours) are in range by
construction and are not re-checked.
"""

# The kernels do integer arithmetic on np.int64 scalars (array elements) and ints
# alike, which numba types as int64 throughout; mypy's numpy stubs keep them apart.
# mypy: disable-error-code="arg-type, assignment, return-value"

from __future__ import annotations

import numpy as np
from numba import njit
from numba.core.errors import NumbaError

__all__ = ["ERRORS", "LENGTH", "LOW", "PE", "PL", "CompileError", "decode_ctx", "decode_unigram",
           "encode_ctx", "encode_unigram"]

# The coder's constants; rans.py checks that they equal its own before using the kernels.
LOW = 1 << 31             # rANS state lower bound; states live in [2**31, 2**63)
PE = 10                   # event precision (bits)
PL = 14                   # literal precision (bits)
_MASK32 = 0xFFFFFFFF

# Error codes a decode kernel returns (0: fine). Detail: an int the message names.
HEAD_RANGE, PAST_END, LEFT_OVER, CRC, ESC_RANGE, ESC_HAS_SYM, TABLE, LENGTH = range(1, 9)
ERRORS = {
    HEAD_RANGE: "coder state out of range",
    PAST_END: "coded data ran past the end",
    LEFT_OVER: "{} words left over",
    CRC: "decoded tokens do not match the crc32",
    ESC_RANGE: "escaped token {} >= vocab_size",
    ESC_HAS_SYM: "an escaped code that has its own symbol",
    TABLE: "a decoded symbol or context outside the model's tables",
    LENGTH: "{} bytes is not a whole coder state plus at most the words its tokens take",
}
CompileError = NumbaError   # what a failed JIT compile raises; rans.py falls back on it
# Speed notes. The per-token loops are written out in the kernels, and the helpers
# they call take scalars only (numba inlines them): an array passed to, or aliased in,
# a helper costs a reference-count increment and decrement (atomics) per token, and a
# first version built from array-taking helpers ran ~5x slower than the plain loop.
_inline = njit(inline="always", nogil=True)
# Indexing with an unsigned integer skips numba's negative-index wraparound (three
# instructions per access, ~17% of the context decoder's time); every index wrapped
# in it is >= 0 by construction.
_ix = np.uint64
# Tried on the 256-token bench batches and not kept (no gain within this VM's noise):
# 4 rows interleaved instead of 2 (generated lanes), a branch-free event/literal choice
# (always decoding a literal too: ~20% slower), BUCKET_BITS 8-12, a bucket table packing
# the bucket's first symbol with its next 3 cumulative frequencies (one load instead of
# first + cum), a copy of _ctx_pair specialised for plane == 0. Comparing a np.uint64
# with an int64 compiles to a float compare: keep range checks on int64 values
# (`0 <= s < n`) and use _ix only for indexing.
BUCKET_BITS = 10          # literal slot buckets per context (decode_ctx)


def _crc_tables() -> np.ndarray:
    """zlib's CRC-32 (reflected polynomial 0xEDB88320) for slicing by 8: row 0 is the
    byte table, row k the same byte followed by k zero bytes."""
    t0 = np.arange(256, dtype=np.int64)
    for _ in range(8):
        t0 = np.where(t0 & 1, (t0 >> 1) ^ 0xEDB88320, t0 >> 1)
    t = np.empty((8, 256), np.int64)
    t[0] = t0
    for k in range(1, 8):
        t[k] = (t[k - 1] >> 8) ^ t0[t[k - 1] & 0xFF]
    return t.astype(np.uint32)   # 8 KiB: stays in L1 beside the decode tables


_CRC = _crc_tables()   # a global array: numba freezes it into the machine code
# Why slicing by 8, and two rows at a time in _ctx_pair: the check is a chain of
# dependent table lookups, 4 bytes a step it took ~0.45 us a 256-token row, ~9% of the
# whole context decode. 8 bytes a step, and two rows' chains interleaved, take 2.5x less.


@_inline
def _crc_word(crc: int) -> int:
    """Advance a CRC by the 4 bytes already xored into its low 32 bits."""
    return (np.int64(_CRC[3, _ix(crc & 0xFF)]) ^ np.int64(_CRC[2, _ix((crc >> 8) & 0xFF)])
            ^ np.int64(_CRC[1, _ix((crc >> 16) & 0xFF)]) ^ np.int64(_CRC[0, _ix((crc >> 24) & 0xFF)]))


@_inline
def _crc_dword(crc: int, hi: int) -> int:
    """Advance a CRC by 8 bytes: the first 4 already xored into its low 32 bits, `hi` the next 4."""
    return (np.int64(_CRC[7, _ix(crc & 0xFF)]) ^ np.int64(_CRC[6, _ix((crc >> 8) & 0xFF)])
            ^ np.int64(_CRC[5, _ix((crc >> 16) & 0xFF)]) ^ np.int64(_CRC[4, _ix((crc >> 24) & 0xFF)])
            ^ _crc_word(hi))


@_inline
def _crc_byte(crc: int, byte: int) -> int:
    return np.int64(_CRC[0, _ix((crc ^ byte) & 0xFF)]) ^ (crc >> 8)


@_inline
def _crc_u32(row: np.ndarray, t: int) -> int:
    """Tokens t.. of a row as one little-endian 32-bit word: two uint16 tokens or one uint32."""
    if row.itemsize == 2:
        return np.int64(row[_ix(t)]) | (np.int64(row[_ix(t + 1)]) << 16)
    return np.int64(row[_ix(t)])


@_inline
def _crc_tail(crc: int, row: np.ndarray, t: int) -> int:
    """The CRC of tokens t.. of a row (fewer than 8 bytes' worth) onto `crc`, finished."""
    n = row.shape[0]
    step = 4 // row.itemsize
    while t + step <= n:
        crc = _crc_word(crc ^ _crc_u32(row, t))
        t += step
    if t < n:                                 # a last uint16 token
        v = np.int64(row[_ix(t)])
        crc = _crc_byte(_crc_byte(crc, v & 0xFF), v >> 8)
    return crc ^ _MASK32


@njit(cache=True, nogil=True)
def _crc32(row: np.ndarray) -> int:
    """zlib.crc32 of a row of uint16 or uint32 tokens as little-endian bytes, 8 at a time."""
    crc = _MASK32
    step = 8 // row.itemsize
    for t in range(0, row.shape[0] - step + 1, step):
        crc = _crc_dword(crc ^ _crc_u32(row, t), _crc_u32(row, t + step // 2))
    return _crc_tail(crc, row, (row.shape[0] // step) * step)


@njit(cache=True, nogil=True)
def _crc32_pair(ra: np.ndarray, rb: np.ndarray) -> tuple[int, int]:
    """_crc32 of two rows of the same length, their chains of lookups interleaved."""
    ca = cb = _MASK32
    step = 8 // ra.itemsize
    half = step // 2
    for t in range(0, ra.shape[0] - step + 1, step):
        ca = _crc_dword(ca ^ _crc_u32(ra, t), _crc_u32(ra, t + half))
        cb = _crc_dword(cb ^ _crc_u32(rb, t), _crc_u32(rb, t + half))
    t = (ra.shape[0] // step) * step
    return _crc_tail(ca, ra, t), _crc_tail(cb, rb, t)


@_inline
def _head(lo: int, hi: int) -> int:
    """The 64-bit final state from its two words, or -1 outside [LOW, 2**63)."""
    if hi >= 1 << 31:     # would not fit an int64 (>= 2**63)
        return -1
    x = (hi << 32) | lo
    return x if x >= LOW else -1


@njit(cache=True, nogil=True)
def _word_starts(lens: np.ndarray, rows: int, max_words: int, n_words: int) -> tuple[np.ndarray, int]:
    """Row b's payload is lens[b] bytes: a whole coder state plus whole 32-bit words, at
    most `max_words` of them (what its tokens can take) -> (starts, -1), row b's words
    being words[starts[b]:starts[b + 1]] (the payloads joined in order), or (_, bad row);
    (_, rows) when the lengths do not add up to the buffer."""
    starts = np.zeros(rows + 1, np.int64)
    if lens.shape[0] != rows:
        return starts, rows
    for b in range(rows):
        m = lens[b]
        if m < 8 or m % 4 or m // 4 - 2 > max_words:
            return starts, b
        starts[b + 1] = starts[b] + m // 4
    return starts, (-1 if starts[rows] == n_words else rows)


@_inline
def _renorm(x: int, words: np.ndarray, p: int, end: int) -> tuple[int, int, bool]:
    """Read one word into a state that fell below LOW -> (x, p, ok); not ok past the end."""
    if x < LOW:
        if p >= end:
            return x, p, False
        x = (x << 32) | np.int64(words[p])
        p += 1
    return x, p, True


@_inline
def _escape(x: int, words: np.ndarray, p: int, end: int, chunks: np.ndarray, code_sym: np.ndarray,
            esc_sym: int, vocab: int) -> tuple[int, int, int, int]:
    """An escaped code from its raw bits, high chunk first -> (code, x, p, error); on
    ESC_RANGE the code is the error's detail."""
    v = 0
    for i in range(chunks.shape[0]):
        b = chunks[i]
        chunk = x & ((1 << b) - 1)
        x, p, ok = _renorm(x >> b, words, p, end)
        if not ok:
            return 0, x, p, PAST_END
        v = (v << b) | chunk
    if v >= vocab or v >= code_sym.shape[0]:
        return v, x, p, ESC_RANGE
    if code_sym[v] != esc_sym:
        return 0, x, p, ESC_HAS_SYM
    return v, x, p, 0


@njit(cache=True, nogil=True)
def _tables_ok(alph: np.ndarray, cls_sym: np.ndarray, esc_sym: int, vocab: int, classes: int) -> bool:
    """Symbol -> code and symbol -> class hold codes < vocab and classes < `classes`
    (O(symbols) per call), so a decoded code or class can index the tables it feeds."""
    if cls_sym.shape[0] != alph.shape[0]:
        return False
    for s in range(alph.shape[0]):
        if s != esc_sym and not 0 <= alph[s] < vocab:
            return False
        if not 0 <= cls_sym[s] < max(classes, 1):
            return False
    return True


@njit(cache=True, nogil=True, error_model="numpy")
def decode_unigram(words: np.ndarray, lens: np.ndarray, max_words: int, out: np.ndarray, lut: np.ndarray,
                   lf: np.ndarray, lc: np.ndarray, alph: np.ndarray, cls_sym: np.ndarray,
                   code_sym: np.ndarray, esc_sym: int, chunks: np.ndarray, vocab: int) -> tuple[int, int, int]:
    """Decode out.shape[0] payloads (row b: lens[b] bytes of `words`, the payloads
    joined, its state first) into `out` -> (first bad row or -1, error code, detail).
    A LENGTH error (a row's length is not a state plus at most `max_words` words) is for
    the caller to name."""
    B, n = out.shape
    n_sym = alph.shape[0]
    starts, bad = _word_starts(lens, B, max_words, words.shape[0])
    if bad >= 0:
        return (bad, LENGTH, lens[bad]) if bad < B else (0, TABLE, 0)
    if not _tables_ok(alph, cls_sym, esc_sym, vocab, 1) \
            or lut.shape[0] != 1 << PL or lf.shape[0] != n_sym or lc.shape[0] != n_sym:
        return 0, TABLE, 0
    mask = (1 << PL) - 1
    for b in range(B):
        p, end = starts[b] + 2, starts[b + 1]
        x = _head(np.int64(words[p - 2]), np.int64(words[p - 1]))
        if x < 0:
            return b, HEAD_RANGE, 0
        row = out[b]
        for t in range(n):
            slot = x & mask
            s = np.int64(lut[_ix(slot)])            # slot < 2**PL == len(lut)
            if _ix(s) >= n_sym:
                return b, TABLE, 0
            x = lf[_ix(s)] * (x >> PL) + slot - lc[_ix(s)]
            if x < LOW:
                if p >= end:
                    return b, PAST_END, 0
                x = (x << 32) | np.int64(words[_ix(p)])
                p += 1
            if s == esc_sym:
                v, x, p, err = _escape(x, words, p, end, chunks, code_sym, esc_sym, vocab)
                if err:
                    return b, err, v
                row[_ix(t)] = v
            else:
                row[_ix(t)] = alph[_ix(s)]
        if p != end:
            return b, LEFT_OVER, end - p
        if x != LOW + _crc32(row):
            return b, CRC, 0
    return -1, 0, 0


@njit(cache=True, nogil=True)
def _ctx_tables_ok(classes: int, plane: int, n_sym: int, evpack: np.ndarray, first: np.ndarray,
                   cum: np.ndarray) -> bool:
    """The context tables have exactly the sizes the model's shape implies, so an index
    built from in-range classes, flags, slots and symbols is in range."""
    n_l = (classes + 1) ** 2
    n_e = (4 if plane else 1) * 16 * n_l
    return (classes >= 1 and evpack.shape[0] == n_e and first.shape[0] == n_l << BUCKET_BITS
            and cum.shape[0] == n_l * (n_sym + 1))


@njit(cache=True, nogil=True, error_model="numpy")
def decode_ctx(words: np.ndarray, lens: np.ndarray, max_words: int, out: np.ndarray, evpack: np.ndarray,
               first: np.ndarray, cum: np.ndarray, alph: np.ndarray, cls_sym: np.ndarray,
               code_sym: np.ndarray, width: int, plane: int, classes: int, esc_sym: int,
               chunks: np.ndarray, vocab: int) -> tuple[int, int, int]:
    """As decode_unigram, with the context model (see rans.py's module doc).

    Tables (see rans._Model.kernel_tables): `evpack[literal context * 2**flag bits + flags]`
    (flags: L == U, L == UL, U == UL, U == UR, then P's 2 bits; the literal context is
    class(L) * (classes + 1) + class(U), so one context's 16 or 64 events are adjacent) packs the event
    distribution's cumulative frequencies c0..c4 in 12-bit fields; a literal's symbol
    is found from `first[literal context, slot >> (PL - BUCKET_BITS)]` (the symbol at
    the start of the slot's bucket) by a short forward scan of `cum[literal context]`
    (cumulative literal frequencies, n_sym + 1 per context). Together these are ~0.7 MB
    for 12 classes where a slot -> symbol table would be 5.5 MB: decoding one stream
    is a chain of dependent lookups, so it runs at the speed of the cache they hit.

    Neighbours come from a grid padded with a column of "absent" (-1) on both sides
    and `pad` rows above, so no lookup needs a branch; codes' classes ride along in a
    second grid, and the left neighbour's code and class stay in registers.
    """
    B, n = out.shape
    n_sym = alph.shape[0]
    starts, bad = _word_starts(lens, B, max_words, words.shape[0])
    if bad >= 0:
        return (bad, LENGTH, lens[bad]) if bad < B else (0, TABLE, 0)
    if width < 1 or plane < 0 or plane % width or classes > 63 \
            or not _tables_ok(alph, cls_sym, esc_sym, vocab, classes) \
            or not _ctx_tables_ok(classes, plane, n_sym, evpack, first, cum):
        return 0, TABLE, 0
    w2 = width + 2
    pad = max(1, plane // width if plane else 0)
    size = ((n + width - 1) // width + pad) * w2
    grid = np.full(size, -1, np.int64)          # codes; every cell is written before it is read
    gcls = np.full(size, classes, np.int64)     # their classes (`classes`: absent)
    g2 = np.full((2, size), (-1 << 6) | classes, np.int64)   # _ctx_pair's packed grids
    apack = np.empty(n_sym, np.int64)
    for s in range(n_sym):                      # classes <= 63: a class fits 6 bits
        apack[s] = (alph[s] << 6) | cls_sym[s]  # the escape symbol's alph is -1: negative
    for b in range(0, B, 2):
        if b + 1 < B and _ctx_pair(b, words, starts, out, g2, evpack, first, cum, apack, width, plane, classes):
            continue
        for r in range(b, min(b + 2, B)):
            err, detail = _ctx_row(r, words, starts, out[r], grid, gcls, evpack, first, cum, alph, cls_sym,
                                   code_sym, width, plane, classes, esc_sym, chunks, vocab)
            if err:
                return r, err, detail
    return -1, 0, 0


@njit(cache=True, nogil=True, error_model="numpy")
def _ctx_row(b: int, words: np.ndarray, starts: np.ndarray, row: np.ndarray, grid: np.ndarray,
             gcls: np.ndarray, evpack: np.ndarray, first: np.ndarray, cum: np.ndarray, alph: np.ndarray,
             cls_sym: np.ndarray, code_sym: np.ndarray, width: int, plane: int, classes: int,
             esc_sym: int, chunks: np.ndarray, vocab: int) -> tuple[int, int]:
    """Decode row b (decode_ctx's tables, checked) into `row` -> (error code, detail)."""
    n = row.shape[0]
    n_sym = alph.shape[0]
    q1 = classes + 1
    nf = 64 if plane else 16
    lit_ev = 3 if plane else 2
    w2 = width + 2
    up_rows = plane // width if plane else 0
    pad = max(1, up_rows)
    poff = up_rows * w2
    p, end = starts[b] + 2, starts[b + 1]
    x = _head(np.int64(words[p - 2]), np.int64(words[p - 1]))
    if x < 0:
        return HEAD_RANGE, 0
    i, j = pad * w2 + 1, 0                  # grid cell and column of token t
    L, cl = -1, classes                     # the left neighbour and its class
    P, cP = -1, classes
    for t in range(n):
        U, UL, UR, cU = grid[_ix(i - w2)], grid[_ix(i - w2 - 1)], grid[_ix(i - w2 + 1)], gcls[_ix(i - w2)]
        flags = (1 if (L == U and L >= 0) else 0) + (2 if L == UL else 0) \
            + (4 if U == UL else 0) + (8 if U == UR else 0)
        if plane:
            P, cP = grid[_ix(i - poff)], gcls[_ix(i - poff)]
            flags += 16 * (0 if P < 0 else (1 if P == L else (2 if P == U else 3)))
        ctx_l = cl * q1 + cU
        pk = evpack[_ix(ctx_l * nf + flags)]
        # The event: its cumulative frequencies are pk's 12-bit fields c0..c4.
        slot = x & ((1 << PE) - 1)
        e = np.int64(slot >= ((pk >> 12) & 0xFFF)) + np.int64(slot >= ((pk >> 24) & 0xFFF)) \
            + np.int64(slot >= ((pk >> 36) & 0xFFF))
        c = (pk >> (12 * e)) & 0xFFF
        x = (((pk >> (12 * e + 12)) & 0xFFF) - c) * (x >> PE) + slot - c
        if e != lit_ev:                     # a copy (an absent source has frequency 0)
            code = L if e == 0 else (U if e == 1 else P)
            cls = cl if e == 0 else (cU if e == 1 else cP)
        else:                               # a literal, with no renormalisation before it
            slot = x & ((1 << PL) - 1)
            s = np.int64(first[_ix((ctx_l << BUCKET_BITS) + (slot >> (PL - BUCKET_BITS)))])
            if _ix(s) >= n_sym:
                return TABLE, 0
            base = ctx_l * (n_sym + 1)
            while s + 1 < n_sym and slot >= cum[_ix(base + s + 1)]:
                s += 1
            c = np.int64(cum[_ix(base + s)])
            x = (np.int64(cum[_ix(base + s + 1)]) - c) * (x >> PL) + slot - c
            code, cls = alph[_ix(s)], cls_sym[_ix(s)]
            if s == esc_sym:
                x, p, ok = _renorm(x, words, p, end)
                if not ok:
                    return PAST_END, 0
                code, x, p, err = _escape(x, words, p, end, chunks, code_sym, esc_sym, vocab)
                if err:
                    return err, code
        if code < 0:                        # a copy of an absent neighbour: bad tables
            return TABLE, 0
        if x < LOW:
            if p >= end:
                return PAST_END, 0
            x = (x << 32) | np.int64(words[_ix(p)])
            p += 1
        grid[_ix(i)], gcls[_ix(i)], row[_ix(t)] = code, cls, code
        i, j = i + 1, j + 1
        L, cl = code, cls
        if j == width:                      # next grid row: skip the padding columns
            i, j, L, cl = i + 2, 0, -1, classes
    if p != end:
        return LEFT_OVER, end - p
    if x != LOW + _crc32(row):
        return CRC, 0
    return 0, 0


@njit(cache=True, nogil=True, error_model="numpy")
def _ctx_pair(b: int, words: np.ndarray, starts: np.ndarray, out: np.ndarray, g: np.ndarray,
              evpack: np.ndarray, first: np.ndarray, cum: np.ndarray, apack: np.ndarray, width: int,
              plane: int, classes: int) -> bool:
    """Rows b and b + 1 decoded interleaved, token by token (two independent chains of
    lookups that the CPU overlaps) -> whether both decoded cleanly. On False (any error,
    or an escape, which this fast path leaves out) the caller decodes both rows again with
    _ctx_row, which names the error exactly as a row-by-row decode would; the checks here
    are the same bounds checks, so a hostile payload never reads out of bounds.

    Its grids (g[0], g[1]) hold each cell packed as code << 6 | class (absent: -1 << 6 |
    classes), so one load gives a neighbour's code and class; `apack` packs each symbol's
    code and class the same way (the escape symbol's is negative). Codes and classes are
    one-to-one with symbols (the state's alphabet is distinct codes), so two packed cells
    are equal exactly when their codes are. The first step of the literal bucket scan,
    the copied neighbour and the renormalisation are computed without branches where
    the CPU would mispredict them: the word read is clamped to the row's last word and
    shifted in by 32 * (x < LOW) bits, and reading past the end is caught afterwards
    (p > end), a check that never fails on a valid payload. Written as
    `x = (x << 32 | w) if x < LOW else x` next to a `x < LOW and p >= end` check,
    LLVM turned the renormalisation back into a branch, taken on ~1 token in 5 and
    unpredictable (measured: the arithmetic form decodes 8-10% faster)."""
    n = out.shape[1]
    n_sym = apack.shape[0]
    q1 = classes + 1
    nf = 64 if plane else 16
    lit_ev = 3 if plane else 2
    w2 = width + 2
    up_rows = plane // width if plane else 0
    pad = max(1, up_rows)
    poff = up_rows * w2
    absent = (-1 << 6) | classes
    pa, enda = starts[b + 0] + 2, starts[b + 1]
    xa = _head(np.int64(words[pa - 2]), np.int64(words[pa - 1]))
    if xa < 0:
        return False
    ga, rowa = g[0], out[b + 0]
    La, cla, Pa = absent, classes * q1, absent
    pb, endb = starts[b + 1] + 2, starts[b + 2]
    xb = _head(np.int64(words[pb - 2]), np.int64(words[pb - 1]))
    if xb < 0:
        return False
    gb, rowb = g[1], out[b + 1]
    Lb, clb, Pb = absent, classes * q1, absent
    i, j = pad * w2 + 1, 0
    for t in range(n):
        Ua, ULa, URa = ga[_ix(i - w2)], ga[_ix(i - w2 - 1)], ga[_ix(i - w2 + 1)]
        ctxa = cla + (Ua & 63)
        fa = (1 if (La == Ua and La >= 0) else 0) + (2 if La == ULa else 0) \
            + (4 if Ua == ULa else 0) + (8 if Ua == URa else 0)
        if plane:
            Pa = ga[_ix(i - poff)]
            fa += 16 * (0 if Pa < 0 else (1 if Pa == La else (2 if Pa == Ua else 3)))
        pka = evpack[_ix(ctxa * nf + fa)]
        slota = xa & ((1 << PE) - 1)
        ea = np.int64(slota >= ((pka >> 12) & 0xFFF)) + np.int64(slota >= ((pka >> 24) & 0xFFF)) \
            + np.int64(slota >= ((pka >> 36) & 0xFFF))
        ka = pka >> (12 * ea)
        xa = (((ka >> 12) & 0xFFF) - (ka & 0xFFF)) * (xa >> PE) + slota - (ka & 0xFFF)
        if ea != lit_ev:
            va = (La & -np.int64(ea == 0)) | (Ua & -np.int64(ea == 1)) | (Pa & -np.int64(ea == 2))
        else:
            slota = xa & ((1 << PL) - 1)
            sa = np.int64(first[_ix((ctxa << BUCKET_BITS) + (slota >> (PL - BUCKET_BITS)))])
            if sa < 0 or sa >= n_sym:
                return False
            basea = ctxa * (n_sym + 1)
            sa += np.int64(slota >= cum[_ix(basea + sa + 1)])
            while sa < n_sym and slota >= cum[_ix(basea + sa + 1)]:
                sa += 1
            if sa >= n_sym:
                return False
            ca0 = np.int64(cum[_ix(basea + sa)])
            xa = (np.int64(cum[_ix(basea + sa + 1)]) - ca0) * (xa >> PL) + slota - ca0
            va = apack[_ix(sa)]
        if va < 0:
            return False
        wa = np.int64(words[_ix(min(pa, enda - 1))])
        na = np.int64(xa < LOW)
        xa = (xa << (na << 5)) | (wa & -na)
        pa += na
        if pa > enda:
            return False
        ga[_ix(i)], rowa[_ix(t)] = va, va >> 6
        La, cla = va, (va & 63) * q1

        Ub, ULb, URb = gb[_ix(i - w2)], gb[_ix(i - w2 - 1)], gb[_ix(i - w2 + 1)]
        ctxb = clb + (Ub & 63)
        fb = (1 if (Lb == Ub and Lb >= 0) else 0) + (2 if Lb == ULb else 0) \
            + (4 if Ub == ULb else 0) + (8 if Ub == URb else 0)
        if plane:
            Pb = gb[_ix(i - poff)]
            fb += 16 * (0 if Pb < 0 else (1 if Pb == Lb else (2 if Pb == Ub else 3)))
        pkb = evpack[_ix(ctxb * nf + fb)]
        slotb = xb & ((1 << PE) - 1)
        eb = np.int64(slotb >= ((pkb >> 12) & 0xFFF)) + np.int64(slotb >= ((pkb >> 24) & 0xFFF)) \
            + np.int64(slotb >= ((pkb >> 36) & 0xFFF))
        kb = pkb >> (12 * eb)
        xb = (((kb >> 12) & 0xFFF) - (kb & 0xFFF)) * (xb >> PE) + slotb - (kb & 0xFFF)
        if eb != lit_ev:
            vb = (Lb & -np.int64(eb == 0)) | (Ub & -np.int64(eb == 1)) | (Pb & -np.int64(eb == 2))
        else:
            slotb = xb & ((1 << PL) - 1)
            sb = np.int64(first[_ix((ctxb << BUCKET_BITS) + (slotb >> (PL - BUCKET_BITS)))])
            if sb < 0 or sb >= n_sym:
                return False
            baseb = ctxb * (n_sym + 1)
            sb += np.int64(slotb >= cum[_ix(baseb + sb + 1)])
            while sb < n_sym and slotb >= cum[_ix(baseb + sb + 1)]:
                sb += 1
            if sb >= n_sym:
                return False
            cb0 = np.int64(cum[_ix(baseb + sb)])
            xb = (np.int64(cum[_ix(baseb + sb + 1)]) - cb0) * (xb >> PL) + slotb - cb0
            vb = apack[_ix(sb)]
        if vb < 0:
            return False
        wb = np.int64(words[_ix(min(pb, endb - 1))])
        nb = np.int64(xb < LOW)
        xb = (xb << (nb << 5)) | (wb & -nb)
        pb += nb
        if pb > endb:
            return False
        gb[_ix(i)], rowb[_ix(t)] = vb, vb >> 6
        Lb, clb = vb, (vb & 63) * q1

        i, j = i + 1, j + 1
        if j == width:
            i, j = i + 2, 0
            La, cla, Lb, clb = absent, classes * q1, absent, classes * q1
    if pa != enda or pb != endb:
        return False
    ca, cb = _crc32_pair(rowa, rowb)
    return xa == LOW + ca and xb == LOW + cb


@_inline
def _contexts(cL: int, cU: int, L: int, U: int, UL: int, UR: int, P: int, classes: int,
              plane: int) -> tuple[int, int]:
    """(event context, literal context) from the neighbours' codes (-1: absent) and
    the classes of L and U (`classes`: absent), exactly as _Model.contexts."""
    q1 = classes + 1
    ctx_l = cL * q1 + cU
    flags = (1 if (L == U and L >= 0) else 0) + (2 if L == UL else 0) \
        + (4 if U == UL else 0) + (8 if U == UR else 0)
    if plane:
        flags += 16 * (0 if P < 0 else (1 if P == L else (2 if P == U else 3)))
    return flags * q1 * q1 + ctx_l, ctx_l


# -- encoding --------------------------------------------------------------------------
# rANS encodes backwards: tokens last to first, and within a token the steps in the
# reverse of the order the decoder takes them. Each row owns `cap` words of `out` and
# fills them from the end, so its payload lands in decode order without a copy.
# Tokens are the caller's validated codes (< vocab_size) and the tables the model's own.

@_inline
def _code_step(x: int, f: int, c: int, bits: int) -> int:
    """Encode one symbol of frequency f, cumulative c at precision `bits`."""
    return ((x // f) << bits) + (x % f) + c


@_inline
def _emit(x: int, out: np.ndarray, w: int) -> tuple[int, int]:
    """Renormalise: the low 32 bits of x go out (before the words already written)."""
    w -= 1
    out[w] = x & _MASK32
    return x >> 32, w


@_inline
def _put_escape(x: int, v: int, chunks: np.ndarray, out: np.ndarray, w: int) -> tuple[int, int]:
    """Raw bits of an escaped code, low chunk first (decoding reads the high chunk first);
    each chunk is a step of frequency 1 at precision b."""
    shift = 0
    for i in range(chunks.shape[0] - 1, -1, -1):
        b = chunks[i]
        if x >> (63 - b):
            x, w = _emit(x, out, w)
        x = (x << b) + ((v >> shift) & ((1 << b) - 1))
        shift += b
    return x, w


@_inline
def _put_head(x: int, out: np.ndarray, w: int) -> int:
    """The final state, as two words before the others -> the payload's first word."""
    out[w - 2] = x & _MASK32
    out[w - 1] = x >> 32
    return w - 2


@njit(cache=True, nogil=True, error_model="numpy")   # no zero-division checks: f >= 1
def encode_unigram(X: np.ndarray, out: np.ndarray, starts: np.ndarray, lf: np.ndarray,
                   lc: np.ndarray, code_sym: np.ndarray, esc_sym: int, chunks: np.ndarray) -> None:
    """Encode the rows of X into `out`, which holds `cap` = len(out) // len(X) words per
    row: row b's payload is out[starts[b]:(b + 1) * cap], as uint32 words."""
    B, n = X.shape
    cap = out.shape[0] // max(B, 1)
    for b in range(B):
        row = X[b]
        x, w = LOW + _crc32(row), (b + 1) * cap
        for t in range(n - 1, -1, -1):
            v = np.int64(row[t])
            s = code_sym[v]
            if s == esc_sym:
                x, w = _put_escape(x, v, chunks, out, w)
            f = lf[s]
            if (x >> (63 - PL)) >= f:
                x, w = _emit(x, out, w)
            x = _code_step(x, f, lc[s], PL)
        starts[b] = _put_head(x, out, w)


@njit(cache=True, nogil=True, error_model="numpy")   # no zero-division checks: f >= 1
def encode_ctx(X: np.ndarray, out: np.ndarray, starts: np.ndarray, lf: np.ndarray, lc: np.ndarray,
               ef: np.ndarray, ec: np.ndarray, code_cls: np.ndarray, code_sym: np.ndarray, width: int,
               plane: int, classes: int, n_ev: int, esc_sym: int, chunks: np.ndarray) -> None:
    """As encode_unigram, with the context model."""
    B, n = X.shape
    cap = out.shape[0] // max(B, 1)
    n_sym = lf.shape[0] // (classes + 1) ** 2
    lit_ev = n_ev - 1
    for b in range(B):
        row = X[b]
        x, w = LOW + _crc32(row), (b + 1) * cap
        j = (n - 1) % width if n else 0
        for t in range(n - 1, -1, -1):
            v = np.int64(row[t])
            L = np.int64(row[t - 1]) if j else -1
            U = UL = UR = P = -1
            if t >= width:
                U = np.int64(row[t - width])
                UL = np.int64(row[t - width - 1]) if j else -1
                UR = np.int64(row[t - width + 1]) if j < width - 1 else -1
            if plane and t >= plane:
                P = np.int64(row[t - plane])
            cL = code_cls[L] if L >= 0 else classes
            cU = code_cls[U] if U >= 0 else classes
            ctx_e, ctx_l = _contexts(cL, cU, L, U, UL, UR, P, classes, plane)
            e = 0 if v == L else (1 if v == U else (2 if (plane and v == P) else lit_ev))
            k = ctx_e * n_ev + e
            fe = ef[k]
            if e == lit_ev:
                s = code_sym[v]
                if s == esc_sym:
                    x, w = _put_escape(x, v, chunks, out, w)
                kl = ctx_l * n_sym + s
                f = lf[kl]
                # Event and literal renormalise once, as one step of precision PE + PL.
                if (x >> (63 - PE - PL)) >= fe * f:
                    x, w = _emit(x, out, w)
                x = _code_step(x, f, lc[kl], PL)
            elif (x >> (63 - PE - PL)) >= fe << PL:   # the same group, its literal step the identity
                x, w = _emit(x, out, w)
            x = _code_step(x, fe, ec[k], PE)
            j = width - 1 if j == 0 else j - 1
        starts[b] = _put_head(x, out, w)
