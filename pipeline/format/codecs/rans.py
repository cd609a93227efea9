"""Entropy codecs for token grids: static rANS models fitted once per dataset.

Two codecs, both `needs_fit`:

``rans-unigram``
    Order-0: every token is coded with one static distribution over the codes
    (the baseline a context model has to beat; on 256-token images it lands
    at the empirical order-0 entropy H0 plus ~0.2 bits/token, nearly all of it
    the 8-byte final coder state that also carries the checksum).

``rans-ctx``
    A spatial (and, for video, temporal) context model. Tokens are coded in
    raster order; each token is conditioned on its decoded neighbours left (L),
    up (U), up-left (UL), up-right (UR) and, if `plane` is set, the co-located
    token of the previous frame/view (P). A token is coded in two steps:

    1. an *event*: "same as L" | "same as U" | ["same as P"] | "literal".
       VQ grids repeat codes a lot (on the bundled photos 28% of tokens equal
       their left and another 12% their upper neighbour), and whether a copy
       happens is a property of the grid's local structure rather than of the
       particular codes, so it transfers to unseen images. The event context
       is (class(L), class(U), L==U, L==UL, U==UL, U==UR[, P==L / P==U]);
       events that cannot happen there (no left neighbour, U equal to L, ...)
       get probability 0, so no code space is wasted on them.
    2. for literals only, the code itself from a distribution conditioned on
       (class(L), class(U)).

    The `classes` code classes (default 12) are fitted by an exchange
    (Brown-style) clustering of the codes as predictors: each code moves to
    the class that minimises the conditional entropy H(X | class(neighbour))
    of the tokens to its right and below. Clustering, not exact neighbour
    codes, because a dataset's fit sample (2048 images) is far too small for
    1024x1024 conditional tables. Probabilities are Dirichlet-smoothed along a
    back-off chain (full context -> one neighbour's class -> unigram ->
    uniform); the smoothing strengths are picked by 2-fold cross-validation
    over the fit samples (even/odd), so the model is only as specific as the
    fit data supports.

Alphabet: with vocab_size <= `max_symbols` (default 4095) every code has a
symbol (codes never seen in fitting get the smoothed minimum), so there are no
escapes. Larger vocabularies keep the `max_symbols` most frequent fitted codes
plus an escape symbol followed by the code in ceil(log2(vocab_size)) raw bits,
so any vocabulary up to 2**24 works and the tables stay small.

Coder: rANS with a 63-bit state in [2**31, 2**63) and 32-bit renormalisation
words, 10-bit precision for events and 14-bit for literals, written directly
in numpy. An event and its literal share one renormalisation (together they
act as one symbol of 24-bit precision), so a token costs one coder
"group". Why not `constriction`: a payload is one sequential stream, and the
context model makes every symbol's distribution depend on the previous
symbol, so a library call decodes at best one image per call with a
per-symbol probability table (measured here: ~4.6k images/s for the
constriction call alone with a (256, 1024) table). `decode_batch` instead
runs the 256 payloads of a loader batch in lockstep, one vectorised step per
token position for the whole batch (~40 small array operations), which is
what reaches >20k images/s per core. That numpy coder is now the reference and the
fallback: by default `rans_kernels.py` (numba, compiled on first use and cached on
disk) encodes and decodes the same payloads one stream at a time, several times
faster (`BACKEND` / TOKSHARD_RANS_BACKEND=numpy selects the numpy coder; tests
check the two byte for byte). rans-unigram uses the same coder so both share the
payload format and the checksum. Everything the coder uses
(frequencies, classes, alphabet) is integer and stored in the state, so
coding is bit-exact across machines; `fit` is deterministic on one machine
(same samples -> same state bytes).

Integrity: the encoder's initial rANS state is 2**31 + crc32(tokens as
little-endian token_dtype bytes). Decoding must end in exactly that state,
having consumed exactly every word, so a corrupted, truncated or extended
payload raises `CodecError` ("checksum mismatch", with the specific cause)
instead of yielding wrong tokens. The check rides in state bits that rANS
spends anyway; payload overhead per sample is the 8-byte final state.

Payload: uint64 LE final coder state, then uint32 LE words in decode order.

State (``codec/state.bin``): a 24-byte header and zstd-compressed integer
tables (alphabet, code classes, event and literal frequencies; ~90 KB for
1024 codes and 12 classes, independent of the dataset size). `width` (row
length) and `plane` (tokens per frame; 0 = no temporal context) are params;
left None they are inferred at fit and recorded in params and state. Fit
samples with their grid shape ((h, w) or (T, h, w)) give both exactly;
flattened samples (what convert passes today) give width = sqrt(n) for a
square n, else the divisor of n with the most vertical repeats, and plane 0.
An unfitted codec codes with an empty model (every token escaped or
uniform): convert always fits it first.

Bounds (a state is dataset bytes): `load_state` checks every header field
(magic, format, kind, flags, vocab_size, alphabet size A <= min(vocab_size,
max_symbols), classes, width, plane) against the params and vocab_size, derives
the exact byte size of the tables from them (at most ~68 MiB for the largest
valid params, classes=63 and max_symbols=8191; ~1.4 MiB for the defaults at 4096
codes), and only then decompresses, requiring the zstd frame to declare exactly
that size and capping output there; `MAX_STATE_BODY` is an absolute backstop and
`MAX_VOCAB` bounds the per-code decode tables. A payload longer than n tokens
can take (one 32-bit word per token, plus one per escape chunk) is refused
before its word buffer is allocated.
"""

from __future__ import annotations

import math
import os
import struct
import sys
import threading
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import zstandard

from tokshard.errors import CodecError
from tokshard.pipeline.format.codecs.base import TokenCodec, Widths, _bytes_view, _count, _zstd_decompress_exact
from tokshard.pipeline.format.codecs.registry import register_codec

__all__ = ["MAX_STATE_BODY", "MAX_VOCAB", "RansCtxCodec", "RansUnigramCodec"]

_LOW = 1 << 31            # rANS state lower bound; states live in [2**31, 2**63)
_PE = 10                  # event precision (bits)
_PL = 14                  # literal precision (bits)
_CHECK = _LOW             # initial state = 2**31 + crc32(tokens)
_MAGIC = b"TSRA"
_HEADER = struct.Struct("<4sBBBBIiI")   # magic, fmt, kind, classes, flags, vocab, width, plane
_FMT = 1
_KINDS = {"rans-unigram": 0, "rans-ctx": 1}
# Absolute caps on what a state (dataset bytes) may make us allocate. Every header
# field is checked against the codec's params and vocab_size first; these bound what
# those may imply, and are above anything valid params produce.
MAX_VOCAB = 1 << 24       # decode keeps code -> class tables: 16 bytes per code (256 MiB at the cap)
MAX_STATE_BODY = 1 << 27  # decompressed state tables; the largest valid params need ~68 MiB
_MAX_GRID = 1 << 31       # width and plane (params and state header)
_LIT_GRID = (4.0, 16.0, 64.0, 256.0, 1024.0)
_EV_GRID = (1.0, 4.0, 16.0, 64.0)
_UNI_GRID = (1.0, 32.0, 1024.0)
_EXCHANGE_PASSES = 6

_G = TypeVar("_G")   # a smoothing-grid entry

# Which coder runs: "compiled" (the default: numba kernels in rans_kernels.py, loaded on
# first use) or "numpy" (the lockstep numpy coder in this module: the reference the
# kernels are tested against byte for byte, and the fallback when numba cannot be
# imported or compiled). Read at every call, so a test can switch it;
# TOKSHARD_RANS_BACKEND=numpy sets it for a process.
BACKEND = os.environ.get("TOKSHARD_RANS_BACKEND", "compiled")
_kernel_lock = threading.Lock()
_kernel_module: list[Any] = []   # [] until loaded, then [module] or [None] (unavailable)


def _kernels() -> Any:
    """The compiled kernels module, or None for the numpy coder (by BACKEND, on a
    big-endian host (the kernels read payload words natively), or when unavailable)."""
    if BACKEND == "numpy" or sys.byteorder != "little":
        return None
    if not _kernel_module:
        with _kernel_lock:
            if not _kernel_module:
                _kernel_module.append(_load_kernels())
    return _kernel_module[0]


def _load_kernels() -> Any:
    try:
        from tokshard.pipeline.format.codecs import rans_kernels as k
    except ImportError as e:   # numba/llvmlite missing or broken on this machine
        _warn_fallback(e)
        return None
    if (k.LOW, k.PE, k.PL) != (_LOW, _PE, _PL):   # a guard against the two drifting apart
        _warn_fallback("coder constants differ from rans.py")
        return None
    return k


def _warn_fallback(reason: object) -> None:
    warnings.warn(f"tokshard: compiled rANS kernels unavailable ({reason}); "
                  "using the slower numpy coder", RuntimeWarning, stacklevel=4)


def _disable_kernels(reason: object) -> None:
    """A kernel failed to compile: use the numpy coder from now on in this process."""
    _warn_fallback(reason)
    with _kernel_lock:
        _kernel_module[:] = [None]


def _crc(le_tokens: np.ndarray) -> int:
    return zlib.crc32(le_tokens.tobytes())


def _flogf(a: np.ndarray) -> np.ndarray:
    out = np.zeros(a.shape)
    m = a > 0
    out[m] = a[m] * np.log2(a[m])
    return out


def _quantize(p: np.ndarray, bits: int, possible: np.ndarray | None = None) -> np.ndarray:
    """Rows of probabilities -> integer frequencies summing to exactly 2**bits.

    Every possible symbol gets >= 1 (so it stays codable), impossible ones 0.
    """
    total = 1 << bits
    p = np.asarray(p, np.float64)
    if possible is None:
        possible = np.ones(p.shape, bool)
    p = np.where(possible, p, 0.0)
    p = p / p.sum(axis=1, keepdims=True)
    scaled = p * total
    f = np.floor(scaled).astype(np.int64)
    f[possible & (f == 0)] = 1
    frac = np.where(possible, scaled - np.floor(scaled), -1.0)
    for i in range(len(f)):
        d = total - int(f[i].sum())
        if d > 0:       # fewer than #possible units short: top fractional parts get one each
            order = np.argsort(-frac[i], kind="stable")[:d]
            f[i, order] += 1
        while d < 0:    # the forced 1s overshot: take units from the largest entries
            big = np.flatnonzero(f[i] > 1)
            take = big[np.argsort(-f[i, big], kind="stable")[:-d]]
            f[i, take] -= 1
            d += len(take)
    return f


class _Model:
    """Fitted integer tables plus the derived decode tables."""

    def __init__(self, *, contextual: bool, vocab: int, width: int, plane: int, classes: int,
                 alphabet: np.ndarray, cls_sym: np.ndarray, ev_freq: np.ndarray | None,
                 lit_freq: np.ndarray):
        self.contextual, self.vocab, self.width, self.plane = contextual, vocab, width, plane
        self.Q = classes
        self.alphabet = alphabet.astype(np.int64)            # rank -> code
        self.A = len(alphabet)
        self.has_esc = self.A < vocab
        self.S = self.A + self.has_esc
        self.esc = self.A if self.has_esc else -1
        self.cls_sym = cls_sym.astype(np.int64)
        self.n_ev = (4 if plane else 3) if contextual else 1
        self.nL = (classes + 1) ** 2 if contextual else 1
        self.n_pst = 4 if (contextual and plane) else 1
        self.nE = self.n_pst * 16 * self.nL if contextual else 0
        self.ev_freq = ev_freq
        self.lit_freq = lit_freq.astype(np.int64)
        self.lit_cum = np.concatenate([np.zeros((self.nL, 1), np.int64),
                                       np.cumsum(self.lit_freq, axis=1)[:, :-1]], axis=1)
        if contextual:
            assert ev_freq is not None   # a contextual model always has event tables
            self.ev_freq = ev_freq.astype(np.int64)
            cum = np.cumsum(self.ev_freq, axis=1)
            self.ev_cum = np.concatenate([np.zeros((self.nE, 1), np.int64), cum[:, :-1]], axis=1)
            self.ev_freq_flat = self.ev_freq.reshape(-1)
            self.ev_cum_flat = self.ev_cum.reshape(-1)
        self.lit_freq_flat = self.lit_freq.reshape(-1)
        self.lit_cum_flat = self.lit_cum.reshape(-1)
        order = np.argsort(self.alphabet, kind="stable")
        self.sorted_codes, self.sorted_syms = self.alphabet[order], order.astype(np.int64)
        vb = max(0, (vocab - 1).bit_length())
        self.esc_chunks = [vb - 16, 16] if vb > 16 else ([vb] if vb else [])
        self._tables: tuple[np.ndarray, ...] | None = None
        self._ktables: dict[str, Any] | None = None
        self._lock = threading.Lock()

    # -- symbols --------------------------------------------------------------------
    def syms(self, codes: np.ndarray) -> np.ndarray:
        """Codes -> literal symbols (the escape symbol for codes outside the alphabet)."""
        if self.A == 0:
            return np.full(codes.shape, self.esc, np.int64)
        i = np.searchsorted(self.sorted_codes, codes)
        ic = np.minimum(i, self.A - 1)
        hit = self.sorted_codes[ic] == codes
        return np.where(hit, self.sorted_syms[ic], self.esc)

    def tables(self) -> tuple[np.ndarray, ...]:
        """Decode tables, built on first decode: (literal slot -> symbol per literal
        context, event slot -> event per event context, code -> class, code -> class * (Q+1))."""
        if self._tables is None:
            with self._lock:
                if self._tables is None:
                    syms = np.arange(self.S, dtype=np.int16)
                    lit = np.concatenate([np.repeat(syms, row) for row in self.lit_freq])
                    ev = np.zeros(0, np.int8)
                    if self.contextual:
                        assert self.ev_freq is not None
                        evs = np.arange(self.n_ev, dtype=np.int8)
                        ev = np.concatenate([np.repeat(evs, row) for row in self.ev_freq])
                    code_cls = np.full(self.vocab, self.cls_sym[self.esc] if self.has_esc else 0,
                                       np.int64)
                    code_cls[self.alphabet] = self.cls_sym[: self.A]
                    self._tables = (lit, ev, code_cls, code_cls * (self.Q + 1))
        return self._tables

    def kernel_tables(self) -> dict[str, Any]:
        """What the compiled kernels take besides the payloads, built once (see
        rans_kernels.decode_ctx for the decode tables' layout)."""
        if self._ktables is None:
            lut, _, code_cls, _ = self.tables()   # before taking the (non-reentrant) lock
            with self._lock:
                if self._ktables is None:
                    self._ktables = self._build_kernel_tables(lut, code_cls)
        return self._ktables

    def _build_kernel_tables(self, lut: np.ndarray, code_cls: np.ndarray) -> dict[str, Any]:
        from tokshard.pipeline.format.codecs.rans_kernels import BUCKET_BITS
        code_sym = np.full(self.vocab, self.esc, np.int32)
        code_sym[self.alphabet] = np.arange(self.A, dtype=np.int32)
        t: dict[str, Any] = dict(
            lut=lut, lf=self.lit_freq_flat, lc=self.lit_cum_flat, cls_sym=self.cls_sym,
            alph=np.append(self.alphabet, -1) if self.has_esc else self.alphabet,
            code_sym=code_sym, esc_sym=self.esc, chunks=np.array(self.esc_chunks, np.int64))
        if not self.contextual:
            return t
        # Literal decode: cumulative frequencies per context, and per bucket of
        # 2**(PL - BUCKET_BITS) slots the symbol whose range holds the bucket's first slot.
        cum = np.zeros((self.nL, self.S + 1), np.int64)
        np.cumsum(self.lit_freq, axis=1, out=cum[:, 1:])
        starts = np.arange(0, 1 << _PL, 1 << (_PL - BUCKET_BITS))
        first = np.stack([np.searchsorted(row, starts, side="right") - 1 for row in cum])
        # Event decode: the cumulative frequencies c0..c4 (c4 = 2**PE) in 12-bit fields.
        assert self.ev_freq is not None
        ecum = np.full((self.nE, 5), 1 << _PE, np.int64)
        ecum[:, 0] = 0
        ecum[:, 1:self.n_ev] = np.cumsum(self.ev_freq, axis=1)[:, :-1]
        # Rows in (literal context, flags) order, where the model's are (flags, literal context).
        evpack = (ecum << (12 * np.arange(5))).sum(axis=1).reshape(-1, self.nL).T.reshape(-1)
        t.update(evpack=np.ascontiguousarray(evpack), first=first.astype(np.int16).reshape(-1),
                 cum=cum.astype(np.uint16).reshape(-1), ef=self.ev_freq_flat, ec=self.ev_cum_flat,
                 code_cls=code_cls, width=self.width, plane=self.plane, classes=self.Q, n_ev=self.n_ev)
        return t

    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        d["_tables"] = None
        d["_ktables"] = None
        del d["_lock"]
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update({"_ktables": None, **d})
        self._lock = threading.Lock()

    # -- contexts (shared by fit and encode; decode recomputes them incrementally) ------
    def neighbours(self, X: np.ndarray, fill: int, width: int | None = None) -> dict[str, np.ndarray]:
        """(B, n) -> arrays of the L/U/UL/UR/P neighbour values, `fill` where absent, for
        rows of `width` tokens (default: the model's width)."""
        B, n = X.shape
        W, plane = width or self.width, self.plane
        j = np.arange(n) % W
        out = {}
        for name, lag, col_ok in (("L", 1, j > 0), ("U", W, None), ("UL", W + 1, j > 0),
                                  ("UR", W - 1, j < W - 1), ("P", plane, None)):
            a = np.full((B, n), fill, np.int64)
            if name == "P" and not plane:
                out[name] = a
                continue
            if name in ("UL", "UR"):
                assert col_ok is not None   # UL, UR and L have a column condition
                ok = (np.arange(n) >= W) & col_ok
            elif name == "U":
                ok = np.arange(n) >= W
            elif name == "P":
                ok = np.arange(n) >= plane
            else:
                assert col_ok is not None
                ok = col_ok
            idx = np.flatnonzero(ok)
            a[:, idx] = X[:, idx - lag]
            out[name] = a
        return out

    def contexts(self, X: np.ndarray,
                 width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(B, n) codes in rows of `width` (default: the model's) -> (events, event ctx,
        literal ctx, literal symbols), all (B, n)."""
        sym = self.syms(X)
        if not self.contextual:
            z = np.zeros(X.shape, np.int64)
            return z, z, z, sym
        Q = self.Q
        nb = self.neighbours(X, -1, width)
        cls = self.cls_sym[sym]
        cn = self.neighbours(cls, Q, width)
        L, U, UL, UR, P = nb["L"], nb["U"], nb["UL"], nb["UR"], nb["P"]
        ctxL = cn["L"] * (Q + 1) + cn["U"]
        flags = (((L == U) & (L >= 0)).astype(np.int64) + 2 * (L == UL) + 4 * (U == UL)
                 + 8 * (U == UR))
        lit = self.n_ev - 1
        ev = np.where(X == L, 0, np.where(X == U, 1, lit))
        if self.plane:
            pst = np.where(P < 0, 0, np.where(P == L, 1, np.where(P == U, 2, 3)))
            ev = np.where(ev == lit, np.where(X == P, 2, lit), ev)
            flags = flags + 16 * pst
        ctxE = flags * self.nL + ctxL
        return ev, ctxE, ctxL, sym

    def event_possible(self) -> np.ndarray:
        """(nE, n_ev) which events can occur in each event context."""
        Q, nL = self.Q, self.nL
        c = np.arange(self.nE)
        ctxL, flags = c % nL, c // nL
        cL, cU = ctxL // (Q + 1), ctxL % (Q + 1)
        eqLU, pst = flags & 1, flags >> 4
        pos = np.ones((self.nE, self.n_ev), bool)
        pos[:, 0] = cL != Q
        pos[:, 1] = (cU != Q) & (eqLU == 0)
        if self.plane:
            pos[:, 2] = pst == 3
        return pos


def _infer_grid(samples: list[np.ndarray]) -> tuple[int, int]:
    """(width, plane) from the fit samples' shapes, else from their flattened length."""
    shaped = [s for s in samples if s.ndim >= 2]
    if shaped:
        shape = Counter(s.shape for s in shaped).most_common(1)[0][0]
        width = max(1, shape[-1])
        plane = shape[-2] * shape[-1] if len(shape) >= 3 and math.prod(shape[:-2]) > 1 else 0
        return width, plane
    lengths = Counter(s.size for s in samples)
    if not lengths:
        return 1, 0
    n = lengths.most_common(1)[0][0]
    r = math.isqrt(n)
    if n > 0 and r * r == n:
        return r, 0
    flat = [s.reshape(-1).astype(np.int64) for s in samples if s.size == n]
    best, best_score = max(n, 1), -1.0
    for w in range(2, n // 2 + 1):
        if n % w:
            continue
        score = float(np.mean([np.mean(x[w:] == x[:-w]) for x in flat]))
        if score > best_score:
            best, best_score = w, score
    return best, 0


def _exchange_classes(pred: np.ndarray, x: np.ndarray, S: int, Q: int,
                      order: np.ndarray) -> np.ndarray:
    """Classes for predictor symbols minimising H(X | class(pred)) (exchange algorithm)."""
    cls = np.empty(S, np.int64)
    cls[order] = np.arange(S) % Q
    if Q <= 1 or len(pred) == 0:
        return np.zeros(S, np.int64) if Q <= 1 else cls
    key = np.unique(pred * S + x, return_counts=True)
    rows, cols, vals = key[0] // S, key[0] % S, key[1].astype(np.float64)
    starts = np.searchsorted(rows, np.arange(S + 1))
    C = np.zeros((Q, S))
    np.add.at(C, (cls[rows], cols), vals)
    for _ in range(_EXCHANGE_PASSES):
        moved = 0
        for a in order:
            lo, hi = starts[a], starts[a + 1]
            if lo == hi:
                continue
            nz, r = cols[lo:hi], vals[lo:hi]
            ca = cls[a]
            C[ca, nz] -= r
            Cq = C[:, nz]
            tot = C.sum(axis=1)
            gain = (_flogf(Cq + r) - _flogf(Cq)).sum(axis=1) \
                - (_flogf(tot + r.sum()) - _flogf(tot))
            q = int(np.argmax(gain))
            if gain[q] <= gain[ca] + 1e-9:
                q = ca
            moved += q != ca
            cls[a] = q
            C[q, nz] += r
        if not moved:
            break
    return cls


class _RansCodec(TokenCodec):
    """Shared machinery: fit, state, and the lockstep rANS coder."""

    needs_fit = True
    contextual: ClassVar[bool] = False

    def __init__(self, vocab_size: int, **params: Any):
        super().__init__(vocab_size, **params)
        if self.vocab_size > MAX_VOCAB:
            raise CodecError(f"{self.name}: vocab_size {self.vocab_size} is above the "
                             f"supported {MAX_VOCAB}")
        ms = self.params["max_symbols"]
        if isinstance(ms, bool) or not isinstance(ms, int) or not 1 <= ms <= (1 << _PL) // 2 - 1:
            raise CodecError(f"{self.name}: max_symbols must be an int in "
                             f"[1, {(1 << _PL) // 2 - 1}], got {ms!r}")
        if self.contextual:
            for k, lo in (("width", 1), ("plane", 0)):
                v = self.params[k]
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo
                                      or v >= _MAX_GRID):
                    raise CodecError(f"{self.name}: {k} must be None or an int >= {lo}, got {v!r}")
            q = self.params["classes"]
            if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 63:
                raise CodecError(f"{self.name}: classes must be an int in [1, 63], got {q!r}")
            if self.params["plane"] and self.params["width"] and self.params["plane"] % self.params["width"]:
                raise CodecError(f"{self.name}: plane must be a multiple of width")
        self._state: bytes | None = None
        self._m: _Model | None = None

    # -- fitting ---------------------------------------------------------------------
    def fit(self, samples: Sequence[np.ndarray]) -> None:
        arrays = []
        for s in samples:
            a = np.asarray(s)
            le = self._to_le(a)
            arrays.append(le.astype(np.int64).reshape(a.shape if a.ndim >= 2 else (-1,)))
        width = plane = 0
        if self.contextual:
            iw, ip = _infer_grid(arrays)
            width = self.params["width"] or iw
            plane = self.params["plane"]
            if plane is None:
                plane = ip if ip % width == 0 else 0
            elif plane % width:
                raise CodecError(f"{self.name}: plane {plane} is not a multiple of width {width}")
        flat = [a.reshape(-1) for a in arrays]
        model = self._build(flat, width, plane, [self._grid_width(a.shape, width, plane) for a in arrays])
        self._install(self._serialize(model), model)

    def _grid_width(self, shape: tuple[int, ...], width: int, plane: int) -> int:
        """The row width a fit sample of `shape` is modelled with: a 2-D (h, w) grid's own w
        (rans-ctx without a plane), else the model's `width` (flattened samples; frames and
        views (T, h, w) too)."""
        if not self.contextual or plane or len(shape) != 2 or shape[0] * shape[1] == 0:
            return width
        return int(shape[1])

    def _build(self, flat: list[np.ndarray], width: int, plane: int,
               widths: Sequence[int] | None = None) -> _Model:
        """The model fitted on `flat` samples, sample i in rows of widths[i] (default: `width`)."""
        V, Q = self.vocab_size, (self.params["classes"] if self.contextual else 0)
        allx = np.concatenate(flat) if flat else np.zeros(0, np.int64)
        codes, counts = np.unique(allx, return_counts=True)
        alphabet = codes[np.lexsort((codes, -counts))[: self.params["max_symbols"]]]
        if V <= self.params["max_symbols"]:   # every code gets a symbol: no escapes at all
            alphabet = np.concatenate([alphabet, np.setdiff1d(np.arange(V), alphabet)])
        A = len(alphabet)
        S = A + (A < V)

        def model(cls_sym: np.ndarray, ev_freq: np.ndarray | None, lit_freq: np.ndarray) -> _Model:
            return _Model(contextual=self.contextual, vocab=V, width=width, plane=plane,
                          classes=Q, alphabet=alphabet, cls_sym=cls_sym, ev_freq=ev_freq,
                          lit_freq=lit_freq)

        # Provisional model (uniform tables) to map codes to symbols and contexts.
        cls0 = np.zeros(S, np.int64)
        tmp = model(cls0, None if not self.contextual else
                    np.full((16 * (4 if plane else 1) * (Q + 1) ** 2, 4 if plane else 3), 1),
                    np.ones(((Q + 1) ** 2 if self.contextual else 1, S), np.int64))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, f in enumerate(flat):
            groups.setdefault((f.size, widths[i] if widths else width), []).append(i)
        sym_of = [tmp.syms(f) for f in flat]
        n_esc_pseudo = max(1, int(np.sum(counts == 1))) if A < V else 0

        cls_sym = np.zeros(S, np.int64)
        if self.contextual:
            # Code classes from (neighbour -> token) pairs, neighbours L and U.
            order = np.lexsort((np.arange(S), -np.bincount(
                np.concatenate(sym_of) if sym_of else np.zeros(0, np.int64), minlength=S)))
            preds, xs = [], []
            for (_, w), idx in groups.items():
                Sy = np.stack([sym_of[i] for i in idx])
                nb = tmp.neighbours(Sy, -1, w)
                for k in ("L", "U"):
                    m = nb[k] >= 0
                    preds.append(nb[k][m])
                    xs.append(Sy[m])
            cls_sym = _exchange_classes(np.concatenate(preds) if preds else np.zeros(0, np.int64),
                                        np.concatenate(xs) if xs else np.zeros(0, np.int64),
                                        S, Q, order)
            tmp = model(cls_sym, tmp.ev_freq, tmp.lit_freq)

        # Per-token events and contexts, with a fold id (even/odd sample) for tuning.
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("ev", "ctxE", "ctxL", "sym", "fold")}
        for (n, w), idx in groups.items():
            X = np.stack([flat[i] for i in idx])
            ev, ctxE, ctxL, sym = tmp.contexts(X, w)
            for k, v in (("ev", ev), ("ctxE", ctxE), ("ctxL", ctxL), ("sym", sym),
                         ("fold", np.repeat(np.array(idx) % 2, n).reshape(len(idx), n))):
                cols[k].append(v.reshape(-1))
        c = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in cols.items()}
        c["cL"], c["cU"] = c["ctxL"] // (Q + 1), c["ctxL"] % (Q + 1)
        possible = tmp.event_possible() if self.contextual else None
        nE, nL, n_ev = tmp.nE, tmp.nL, tmp.n_ev
        lit = c["ev"] == n_ev - 1

        def ev_probs(m: np.ndarray, a_ev: float) -> np.ndarray:
            assert possible is not None   # events exist only in a contextual model
            ne = np.bincount(c["ctxE"][m] * n_ev + c["ev"][m], minlength=nE * n_ev)
            ne = ne.reshape(nE, n_ev).astype(np.float64)
            fl = np.arange(nE) // nL
            nf = np.zeros((nE // nL, n_ev))
            np.add.at(nf, fl, ne)
            pf = (nf + 0.5) / (nf + 0.5).sum(axis=1, keepdims=True)
            pb = np.where(possible, pf[fl], 0.0)
            pb /= pb.sum(axis=1, keepdims=True)
            return (ne + a_ev * pb) / (ne.sum(axis=1, keepdims=True) + a_ev)

        def lit_probs(m: np.ndarray, alphas: tuple[float, float]) -> np.ndarray:
            a, a0 = alphas
            m = m & lit
            sym = c["sym"][m]
            n0 = np.bincount(sym, minlength=S).astype(np.float64)
            if A < V:
                n0[A] += n_esc_pseudo
            p0 = (n0 + a0 / S) / (n0.sum() + a0)
            if not self.contextual:
                return p0[None, :]
            cL, cU = c["cL"][m], c["cU"][m]
            n1 = np.bincount(np.concatenate([cL, cU]) * S + np.concatenate([sym, sym]),
                             minlength=(Q + 1) * S).reshape(Q + 1, S).astype(np.float64)
            p1 = (n1 + a * p0) / (n1.sum(axis=1, keepdims=True) + a)
            n2 = np.bincount(c["ctxL"][m] * S + sym, minlength=nL * S).reshape(nL, S)
            k = np.arange(nL)
            pb = 0.5 * (p1[k // (Q + 1)] + p1[k % (Q + 1)])
            return (n2 + a * pb) / (n2.sum(axis=1, keepdims=True) + a)

        a_ev, a_lit = 16.0, (64.0, 16.0)
        lit_grid = [(a, a0) for a in (_LIT_GRID if self.contextual else (0.0,)) for a0 in _UNI_GRID]
        if len(flat) >= 4:   # 2-fold cross-validation (even/odd samples) of the smoothing
            folds = [c["fold"] == 0, c["fold"] == 1]

            def best(probs: Callable[[np.ndarray, _G], np.ndarray], grid: Sequence[_G], ev_part: bool) -> _G:
                totals = []
                for a in grid:
                    t = 0.0
                    for k in (0, 1):
                        p = probs(folds[k], a)
                        te = folds[1 - k] if ev_part else folds[1 - k] & lit
                        idx = (c["ctxE"][te], c["ev"][te]) if ev_part else (c["ctxL"][te], c["sym"][te])
                        t -= float(np.log2(p[idx]).sum())
                    totals.append(t)
                return grid[int(np.argmin(totals))]
            if self.contextual:
                a_ev = best(ev_probs, _EV_GRID, True)
            a_lit = best(lit_probs, lit_grid, False)
        everything = np.ones(len(c["ev"]), bool)
        ev_freq = _quantize(ev_probs(everything, a_ev), _PE, possible) if self.contextual else None
        lit_freq = _quantize(lit_probs(everything, a_lit), _PL)
        return model(cls_sym, ev_freq, lit_freq)

    # -- state -------------------------------------------------------------------------
    def _serialize(self, m: _Model) -> bytes:
        parts = [m.alphabet.astype("<u4").tobytes(), m.cls_sym.astype(np.uint8).tobytes(),
                 m.lit_freq.astype("<u2").tobytes()]
        if m.contextual:
            assert m.ev_freq is not None
            parts.append(m.ev_freq.astype("<u4").tobytes())
        body = zstandard.ZstdCompressor(level=19, write_checksum=False).compress(b"".join(parts))
        head = _HEADER.pack(_MAGIC, _FMT, _KINDS[self.name], m.Q, 0, m.vocab - 1 if m.vocab else 0,
                            m.width, m.plane)
        return head + struct.pack("<I", m.A) + body

    def _deserialize(self, state: bytes) -> _Model:
        """Parse a state, validating every count and size in its header against the
        params and vocab_size before anything is allocated or decompressed."""
        head = _HEADER.size + 4
        if len(state) < head:
            raise CodecError(f"{self.name}: state too short ({len(state)} bytes; the header is {head})")
        magic, fmt, kind, Q, flags, vm1, width, plane = _HEADER.unpack_from(state)
        (A,) = struct.unpack_from("<I", state, _HEADER.size)
        if magic != _MAGIC or fmt != _FMT:
            raise CodecError(f"{self.name}: not a rANS codec state (format {fmt})")
        if kind != _KINDS[self.name]:
            raise CodecError(f"{self.name}: the state belongs to another rANS codec (kind {kind})")
        if flags:
            raise CodecError(f"{self.name}: state header flags {flags:#x} are not defined")
        V = self.vocab_size
        if vm1 != V - 1:
            raise CodecError(f"{self.name}: state was fitted for vocab_size {vm1 + 1}, not {V}")
        if A > min(V, self.params["max_symbols"]):
            raise CodecError(f"{self.name}: state alphabet of {A} codes exceeds "
                             f"max_symbols={self.params['max_symbols']}/vocab_size={V}")
        if self.contextual:
            if not 1 <= width < _MAX_GRID or not 0 <= plane < _MAX_GRID or plane % width or not 1 <= Q <= 63:
                raise CodecError(f"{self.name}: bad grid/classes in state ({width}, {plane}, {Q})")
            for k, v in (("width", width), ("plane", plane), ("classes", Q)):
                if self.params[k] is not None and self.params[k] != v:
                    raise CodecError(f"{self.name}: params say {k}={self.params[k]}, state says {v}")
        elif (Q, width, plane) != (0, 0, 0):
            raise CodecError(f"{self.name}: bad unigram state header")
        S = A + (A < V)
        nL = (Q + 1) ** 2 if self.contextual else 1
        n_ev = 4 if plane else 3
        nE = (4 if plane else 1) * 16 * nL
        # The tables' exact byte sizes follow from the validated header alone.
        sizes = [4 * A, S, 2 * nL * S] + ([4 * nE * n_ev] if self.contextual else [])
        total = sum(sizes)
        if total > MAX_STATE_BODY:   # unreachable with valid params; a backstop
            raise CodecError(f"{self.name}: state tables of {total} bytes exceed the limit {MAX_STATE_BODY}")
        # The frame must declare exactly `total` bytes (checked before decompressing:
        # python-zstandard allocates what a header declares), and output is capped there.
        body = _zstd_decompress_exact(zstandard.ZstdDecompressor(), memoryview(state)[head:], total,
                                      f"{self.name}: state tables")
        offs = np.cumsum([0] + sizes)
        alphabet = np.frombuffer(body[offs[0]:offs[1]], "<u4").astype(np.int64)
        cls_sym = np.frombuffer(body[offs[1]:offs[2]], np.uint8).astype(np.int64)
        lit = np.frombuffer(body[offs[2]:offs[3]], "<u2").astype(np.int64).reshape(nL, S)
        if len(np.unique(alphabet)) != A or (A and int(alphabet.max()) >= V):
            raise CodecError(f"{self.name}: state alphabet is not distinct codes < vocab_size")
        if (S and int(cls_sym.max()) >= max(Q, 1)) or (lit < 1).any() \
                or (lit.sum(axis=1) != 1 << _PL).any():
            raise CodecError(f"{self.name}: state tables are inconsistent")
        ev = None
        if self.contextual:
            ev = np.frombuffer(body[offs[3]:offs[4]], "<u4").astype(np.int64).reshape(nE, n_ev)
        m = _Model(contextual=self.contextual, vocab=V, width=width, plane=plane, classes=Q,
                   alphabet=alphabet, cls_sym=cls_sym, ev_freq=ev, lit_freq=lit)
        if ev is not None:   # i.e. self.contextual
            pos = m.event_possible()
            if (ev.sum(axis=1) != 1 << _PE).any() or (ev[~pos] != 0).any() or (ev[:, -1] < 1).any():
                raise CodecError(f"{self.name}: state event tables are inconsistent")
        return m

    def state(self) -> bytes | None:
        return self._state

    def load_state(self, state: bytes) -> None:
        state = bytes(_bytes_view(state))
        self._install(state, self._deserialize(state))

    def _install(self, state: bytes, model: _Model) -> None:
        self._state, self._m = state, model
        if self.contextual:
            self.params.update(width=model.width, plane=model.plane)

    def _model(self) -> _Model:
        if self._m is None:
            # Unfitted: an empty alphabet, so every token is an escape (a checksummed
            # bit-packer). convert always fits; this keeps programmatic use total.
            self._m = self._build([], self.params.get("width") or 1,
                                  (self.params.get("plane") or 0) if self.contextual else 0)
        return self._m

    # -- coding ----------------------------------------------------------------------
    def encode(self, tokens: np.ndarray) -> bytes:
        return self.encode_batch([tokens])[0]

    def encode_batch(self, batch: Sequence[np.ndarray], *, widths: Widths = None) -> list[bytes]:
        """One payload per sample; rans-ctx codes sample i in rows of widths[i] tokens (its
        grid's w; None: the model's width), and decoding takes the same widths. Samples are
        coded in groups of one length and width; payloads come back in the batch's order."""
        les = [self._to_le(t) for t in batch]
        out: list[bytes | None] = [None] * len(les)
        m = self._model()
        ws = self._row_widths(m, [a.size for a in les], widths)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, key in enumerate(zip((a.size for a in les), ws)):
            groups.setdefault(key, []).append(i)
        for (n, w), idx in groups.items():
            X = np.stack([les[i] for i in idx]) if n else np.zeros((len(idx), 0), self._le)
            payloads = self._encode_compiled(m, X, w)
            if payloads is None:
                crcs = np.array([_crc(les[i]) for i in idx], np.int64)
                payloads = self._encode_group(m, X.astype(np.int64), crcs, w)
            for i, p in zip(idx, payloads):
                out[i] = p
        return out  # type: ignore[return-value]

    def _encode_compiled(self, m: _Model, X: np.ndarray, width: int) -> list[bytes] | None:
        """(B, n) little-endian tokens in rows of `width` -> payloads with the compiled kernels; None when
        they are not in use (then the numpy coder runs)."""
        k = _kernels()
        if k is None:
            return None
        B, n = X.shape
        t = m.kernel_tables()
        # Room per row: the 2-word state plus at most one word per coder group.
        cap = 2 + n * (1 + len(m.esc_chunks))
        out = np.empty(B * cap, np.uint32)
        starts = np.empty(B, np.int64)
        common = (X, out, starts, t["lf"], t["lc"])
        try:
            if m.contextual:
                k.encode_ctx(*common, t["ef"], t["ec"], t["code_cls"], t["code_sym"], width,
                             t["plane"], t["classes"], t["n_ev"], t["esc_sym"], t["chunks"])
            else:
                k.encode_unigram(*common, t["code_sym"], t["esc_sym"], t["chunks"])
        except k.CompileError as e:
            _disable_kernels(e)
            return None
        return [out[int(starts[b]):(b + 1) * cap].tobytes() for b in range(B)]

    def _encode_group(self, m: _Model, X: np.ndarray, crcs: np.ndarray, width: int) -> list[bytes]:
        B, n = X.shape
        ev, ctxE, ctxL, sym = m.contexts(X, width)
        lit_ev = m.n_ev - 1
        x = _CHECK + crcs
        words: list[np.ndarray] = []
        masks: list[np.ndarray] = []

        def put(*steps: tuple[np.ndarray, np.ndarray, int]) -> None:
            """Encode a group of coder steps (f, c, bits), given in decode order, that the
            decoder takes without renormalising in between: the group acts as one symbol
            of frequency prod(f) at precision sum(bits) <= 24, so one 32-bit word out at
            most, before it."""
            nonlocal x
            ftot, ptot = steps[0][0], steps[0][2]
            for f, _, b in steps[1:]:
                ftot, ptot = ftot * f, ptot + b
            emit = (x >> (63 - ptot)) >= ftot
            words.append(x & 0xFFFFFFFF)
            masks.append(emit)
            x = np.where(emit, x >> 32, x)
            for f, c, b in reversed(steps):
                x = ((x // f) << b) + (x % f) + c

        esc_bits = m.esc_chunks
        for t in range(n - 1, -1, -1):
            lit = ev[:, t] == lit_ev
            s = sym[:, t]
            if m.has_esc:
                esc = lit & (s == m.esc)
                if esc.any():
                    v = X[:, t]
                    shift = 0
                    for b in reversed(esc_bits):   # decode reads the high chunk first
                        chunk = (v >> shift) & ((1 << b) - 1)
                        put((np.where(esc, 1, 1 << b), np.where(esc, chunk, 0), b))
                        shift += b
            k = ctxL[:, t] * m.S + s
            lit_step = (np.where(lit, m.lit_freq_flat[k], 1 << _PL),
                        np.where(lit, m.lit_cum_flat[k], 0), _PL)
            if m.contextual:
                k = ctxE[:, t] * m.n_ev + ev[:, t]
                put((m.ev_freq_flat[k], m.ev_cum_flat[k], _PE), lit_step)
            else:
                put(lit_step)
        W = np.stack(words) if words else np.zeros((0, B), np.int64)
        M = np.stack(masks) if masks else np.zeros((0, B), bool)
        out = []
        for i in range(B):
            w = W[M[:, i], i][::-1]
            out.append(struct.pack("<Q", int(x[i])) + w.astype("<u4").tobytes())
        return out

    def decode(self, payload: bytes | memoryview, n_tokens: int) -> np.ndarray:
        return self.decode_batch([payload], [n_tokens])[0]

    def decode_batch(self, payloads: Sequence[bytes | memoryview], n_tokens: int | Sequence[int], *,
                     widths: Widths = None) -> list[np.ndarray]:
        """rans-ctx decodes row i in rows of widths[i] tokens (None: the model's width), the
        width its 2-D sample was encoded with; rans-unigram checks and ignores them."""
        counts = self._counts(payloads, n_tokens)
        views = [p if type(p) is bytes else _bytes_view(p) for p in payloads]
        m = self._model()
        ws = self._row_widths(m, counts, widths)
        B = len(views)
        if counts and counts.count(counts[0]) == B and ws.count(ws[0]) == B:   # the loader's case
            return list(self._decode_group(m, views, counts[0], ws[0]))
        out: list[np.ndarray | None] = [None] * B
        groups: dict[tuple[int, int], list[int]] = {}
        for i, key in enumerate(zip(counts, ws)):
            groups.setdefault(key, []).append(i)
        for (n, w), idx in groups.items():
            rows = self._decode_group(m, [views[i] for i in idx], n, w, idx)
            for i, r in zip(idx, rows):
                out[i] = r
        return out  # type: ignore[return-value]

    def decode_matrix(self, payloads: Sequence[bytes | memoryview], n_tokens: int, *,
                      widths: Widths = None) -> np.ndarray:
        """The rows decode into one (B, n) array already: no np.stack copy."""
        n = _count(n_tokens)
        if not payloads:
            self._widths([], widths)
            return np.empty((0, n), self.dtype)
        m = self._model()
        ws = self._row_widths(m, [n] * len(payloads), widths)
        if ws.count(ws[0]) != len(ws):
            return np.stack(self.decode_batch(payloads, n, widths=ws))
        return self._decode_group(m, [p if type(p) is bytes else _bytes_view(p) for p in payloads], n, ws[0])

    def _row_widths(self, m: _Model, counts: list[int], widths: Widths) -> list[int]:
        """Each row's width, checked (base._widths). The model's where none is given, for
        rans-unigram, for empty rows (no width changes them) and for a model with a plane
        (a video model's frame geometry is its own: widths are checked, then ignored)."""
        ws = self._widths(counts, widths)
        if ws is None or not self.contextual or m.plane:
            return [m.width] * len(counts)
        return [m.width if w is None or n == 0 else w for n, w in zip(counts, ws)]

    def _fail(self, n: int, row: int | None, reason: str) -> CodecError:
        """Every integrity failure reads as a checksum mismatch, with its specific cause."""
        where = "" if row is None else f" (batch row {row})"
        return CodecError(f"{self.name}: checksum mismatch{where} in a sample of {n} tokens: "
                          f"{reason}; the payload is corrupt, truncated, or was written with "
                          "another model/vocab_size")

    def _decode_group(self, m: _Model, views: list[bytes | memoryview], n: int, width: int,
                      rows: list[int] | None = None) -> np.ndarray:
        """Payloads of n tokens each, in rows of `width` -> their (B, n) tokens. `rows`: their
        rows in the caller's batch (for errors; default: the batch is `views`)."""
        if rows is None:
            at = (lambda i: None) if len(views) == 1 else (lambda i: i)
        else:
            at = rows.__getitem__
        out = self._decode_compiled(m, views, n, width, at)
        if out is not None:
            return out
        return self._decode_numpy(m, views, self._check_lengths(m, views, n, at), n, width, at)

    def _decode_compiled(self, m: _Model, views: list[bytes | memoryview], n: int, width: int,
                         at: Callable[[int], int | None]) -> np.ndarray | None:
        """Decode with the compiled kernels; None when they are not in use. The kernel checks
        each payload's length as _check_lengths does (which then names a bad one)."""
        k = _kernels()
        if k is None:
            return None
        B = len(views)
        lens = np.fromiter(map(len, views), np.int64, B)
        max_words = self._max_words(m, n)
        # What the joined buffer may hold at most; past it, or not whole words, _check_lengths
        # refuses a payload (before the buffer is allocated).
        total = int(lens.sum())
        if total > B * (8 + 4 * max_words) or total % 4:   # some payload is bad
            self._check_lengths(m, views, n, at)
        # One buffer of every payload's 32-bit words, row b's lens[b] // 4 of them in order.
        words = np.frombuffer(b"".join(views), np.uint32) if B else np.empty(0, np.uint32)
        out = np.empty((B, n), self.dtype)
        t = m.kernel_tables()
        try:
            if m.contextual:
                row, err, detail = k.decode_ctx(
                    words, lens, max_words, out, t["evpack"], t["first"], t["cum"], t["alph"], t["cls_sym"],
                    t["code_sym"], width, t["plane"], t["classes"], t["esc_sym"], t["chunks"], self.vocab_size)
            else:
                row, err, detail = k.decode_unigram(words, lens, max_words, out, t["lut"], t["lf"], t["lc"],
                                                    t["alph"], t["cls_sym"], t["code_sym"], t["esc_sym"],
                                                    t["chunks"], self.vocab_size)
        except k.CompileError as e:
            _disable_kernels(e)
            return None
        if row >= 0:
            if err == k.LENGTH:
                self._check_lengths(m, views, n, at)   # raises, naming the first bad payload
            raise self._fail(n, at(row), k.ERRORS[err].format(detail))
        return out

    @staticmethod
    def _max_words(m: _Model, n: int) -> int:
        """Each token renormalises at most once, plus once per escape chunk, and each
        renormalisation reads one word: a payload with more words is not valid."""
        return n * (1 + (len(m.esc_chunks) if m.has_esc else 0))

    def _check_lengths(self, m: _Model, views: list[bytes | memoryview], n: int,
                       at: Callable[[int], int | None]) -> np.ndarray:
        """Payload byte lengths, each a whole coder state plus 32-bit words, and no more
        words than n tokens can take."""
        B = len(views)
        lens = np.fromiter(map(len, views), np.int64, B)
        bad = np.flatnonzero((lens < 8) | (lens % 4 != 0))
        if len(bad):
            i = int(bad[0])
            raise self._fail(n, at(i), f"{lens[i]} bytes is not a whole coder state "
                             "plus 32-bit words")
        nw = lens // 4 - 2
        # A longer payload cannot be valid (_max_words), and is refused before the word
        # buffer (sized from the payloads) is allocated.
        max_words = self._max_words(m, n)
        bad = np.flatnonzero(nw > max_words)
        if len(bad):
            i = int(bad[0])
            raise self._fail(n, at(i), f"{int(nw[i])} coded words where {n} tokens "
                             f"take at most {max_words}")
        return lens

    def _decode_numpy(self, m: _Model, views: list[bytes | memoryview], lens: np.ndarray,
                      n: int, width: int, at: Callable[[int], int | None]) -> np.ndarray:
        """The reference decoder: every row in lockstep, one numpy step per token."""
        B = len(views)
        nw = lens // 4 - 2
        heads = np.frombuffer(b"".join(bytes(v[:8]) for v in views), "<u8")
        bodies = [np.frombuffer(v[8:], "<u4") for v in views]
        start = np.concatenate([[0], np.cumsum(nw)[:-1]]).astype(np.int64)
        end = start + nw
        steps = n * (1 + len(m.esc_chunks)) + 1
        words = np.zeros(int(nw.sum()) + steps, np.int64)
        if nw.sum():
            words[: int(nw.sum())] = np.concatenate(bodies)
        bad = np.flatnonzero((heads < _LOW) | (heads >= 1 << 63))
        if len(bad):
            i = int(bad[0])
            raise self._fail(n, at(i), "coder state out of range")
        x = heads.astype(np.int64)
        ptr = start.copy()
        res, x = self._decode_lockstep(m, x, ptr, words, B, n, width)
        if (ptr != end).any():
            i = int(np.flatnonzero(ptr != end)[0])
            what = "ran past the end" if ptr[i] > end[i] else f"{int(end[i] - ptr[i])} words left over"
            raise self._fail(n, at(i), f"coded data {what}")
        le = res.astype(self._le, copy=False)
        for i in range(B):
            if int(x[i]) != _CHECK + _crc(le[i]):
                raise self._fail(n, at(i), "decoded tokens do not match the crc32")
        return res

    def _decode_lockstep(self, m: _Model, x: np.ndarray, ptr: np.ndarray, words: np.ndarray,
                         B: int, n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode B streams of n tokens in rows of `width` in lockstep -> ((B, n) tokens,
        final states).

        `ptr` (each lane's next word) is advanced in place.

        Arrays are laid out (position, lane) so a position's values are contiguous.
        This loop is the loader's hot path: it is written as few whole-batch numpy
        operations per token position as possible (Python ints as scalars are the
        cheapest operands).
        """
        out = np.empty((n, B), np.int64)
        flat_out = out.reshape(-1)
        lut, evlut, code_cls, code_clsq = m.tables()
        lf, lc = m.lit_freq_flat, m.lit_cum_flat
        alph = np.append(m.alphabet, -1) if m.has_esc else m.alphabet
        S, esc_sym = m.S, m.esc
        maskL, maskE = (1 << _PL) - 1, (1 << _PE) - 1
        esc_errors: list[str] = []

        def renorm() -> None:
            nonlocal x
            need = x < _LOW
            x = np.where(need, (x << 32) | words[ptr], x)
            np.add(ptr, need, out=ptr)

        def escapes(sym: np.ndarray, lit: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
            """Read the raw bits of escaped literals; returns their codes (0 elsewhere)."""
            nonlocal x
            esc = sym == esc_sym
            if lit is not None:
                esc &= lit
            if not esc.any():
                return None, esc
            v = np.zeros(B, np.int64)
            for b in m.esc_chunks:
                chunk = x & ((1 << b) - 1)
                x = np.where(esc, x >> b, x)
                renorm()
                v = (v << b) | chunk
            v = np.where(esc, v, 0)
            if int(v.max()) >= self.vocab_size:
                i = int(np.argmax(v))
                esc_errors.append(f"token {int(v[i])} >= vocab_size {self.vocab_size} (lane {i})")
                # Decoding goes on to the end (the error is raised there); later
                # contexts index tables by this token, so keep it in range.
                v = np.where(v >= self.vocab_size, 0, v)
            elif m.A and (m.syms(v[esc]) != esc_sym).any():
                esc_errors.append("an escaped code that has its own symbol")
            return v, esc

        if not m.contextual:
            for t in range(n):
                slot = x & maskL
                sym = lut[slot]
                x = lf[sym] * (x >> _PL) + slot - lc[sym]
                renorm()
                code = alph[sym]
                if esc_sym >= 0 and esc_sym in sym:
                    v, esc = escapes(sym, None)
                    if v is not None:
                        code = np.where(esc, v, code)
                out[t] = code
            if esc_errors:
                raise self._fail(n, None, esc_errors[0])
            return out.T.astype(self.dtype), x

        W, Q1, nL, n_ev, plane = width, m.Q + 1, m.nL, m.n_ev, m.plane
        nL2, p16 = 2 * nL, 16 * nL
        lit_ev = n_ev - 1
        ef, ec = m.ev_freq_flat, m.ev_cum_flat
        none_code = np.full(B, -1, np.int64)
        noneq = np.full(B, m.Q * Q1, np.int64)
        # Flat (position, lane) index of each slot, and per event the offset of its source
        # (left, up, previous plane; a literal "copies" itself).
        srcbase = np.arange(n * B, dtype=np.int64).reshape(n, B)
        offs = np.array([-B, -W * B, -plane * B, 0][:n_ev - 1] + [0], np.int64)
        for r0 in range(0, n, W):
            r1 = min(n, r0 + W)
            width = r1 - r0
            if r0 >= W:
                U = out[r0 - W: r1 - W]
                cU = code_cls[U]
                UL = np.full((width, B), -1, np.int64)
                UL[1:] = out[r0 - W: r1 - W - 1]
                UR = np.full((width, B), -1, np.int64)
                k = min(width, W - 1)
                UR[:k] = out[r0 - W + 1: r0 - W + 1 + k]
            else:
                U = UL = UR = np.full((width, B), -1, np.int64)
                cU = np.full((width, B), m.Q, np.int64)
            baseE = ((U == UL) * 4 + (U == UR) * 8) * nL
            rowP = None
            if plane and r0 >= plane:
                rowP = np.where(out[r0 - plane: r1 - plane] == U, 2 * p16, 3 * p16)
            for j in range(width):
                t = r0 + j
                if j:
                    L = out[t - 1]
                    ctxL = code_clsq[L] + cU[j]
                    ctxE = baseE[j] + ctxL + (L == U[j]) * nL + (L == UL[j]) * nL2
                else:
                    L = none_code
                    ctxL = noneq + cU[j]
                    ctxE = baseE[j] + ctxL + nL2     # L and UL both absent count as equal
                if rowP is not None:
                    ctxE += np.where(out[t - plane] == L, p16, rowP[j])
                slot = x & maskE
                e = evlut[(ctxE << _PE) + slot]
                k = ctxE * n_ev + e
                x = ef[k] * (x >> _PE) + slot - ec[k]
                lit = e == lit_ev          # no renormalisation between event and literal
                slot = x & maskL
                sym = lut[(ctxL << _PL) + slot]
                k = ctxL * S + sym
                x = np.where(lit, lf[k] * (x >> _PL) + slot - lc[k], x)
                renorm()
                row = out[t]
                np.take(alph, sym, out=row)
                if esc_sym >= 0 and esc_sym in sym:
                    v, esc = escapes(sym, lit)
                    if v is not None:
                        np.copyto(row, v, where=esc)
                row[:] = flat_out[offs[e] + srcbase[t]]
        if esc_errors:
            raise self._fail(n, None, esc_errors[0])
        return out.T.astype(self.dtype), x


@register_codec
class RansUnigramCodec(_RansCodec):
    """rANS with one static order-0 distribution fitted per dataset (see module doc)."""

    name = "rans-unigram"
    version = 1
    param_defaults: ClassVar[dict[str, Any]] = {"max_symbols": 4095}


@register_codec
class RansCtxCodec(_RansCodec):
    """rANS with a spatial/temporal context model fitted per dataset (see module doc)."""

    name = "rans-ctx"
    version = 1
    contextual = True
    param_defaults: ClassVar[dict[str, Any]] = {"width": None, "plane": None, "classes": 12,
                                                 "max_symbols": 4095}

