"""Bounded resources on hostile codec states and payloads (untrusted datasets).

Every stateful codec (rans-unigram, rans-ctx, zstd-dict) is fitted on small token
grids, its state is then tampered with (declared sizes of 1 TB and 2**62, negative
and overflowing counts, zstd frames that would decompress to gigabytes, truncation,
random bytes), and payload decoding is fed hostile sizes. Each case must raise
`CodecError` and nothing else, and must not grow the process's memory: the cases
run in a child process (with an address-space limit, so a regression fails instead
of exhausting the machine) that reports the exception of each case and the growth
of its peak RSS (VmHWM, reset before each case), which must stay under
`MAX_RSS_GROWTH_MB`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import resource
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zstandard

from tokshard.errors import CodecError
from tokshard.pipeline.format.codecs import codec_from_description, get_codec
from tokshard.pipeline.format.codecs.base import MAX_SAMPLE_TOKENS
from tokshard.pipeline.format.codecs.basic import MAX_DICT_SIZE

MAX_RSS_GROWTH_MB = 100
VOCAB = 256
STATEFUL = ("rans-unigram", "rans-ctx", "zstd-dict")
_HEAD = struct.Struct("<4sBBBBIiI")   # the rANS state header, plus a uint32 alphabet size after it
_RANS_HEAD = _HEAD.size + 4


# -- fitted codecs ------------------------------------------------------------------
def grids(n: int, vocab: int = VOCAB, seed: int = 0, shape: tuple[int, int] = (16, 16)) -> list[np.ndarray]:
    """Blocky random token grids with a little noise: neighbours often share a code."""
    rng = np.random.default_rng(seed)
    h, w = shape
    out = []
    for _ in range(n):
        g = np.kron(rng.integers(0, vocab, (h // 4, w // 4)), np.ones((4, 4), np.int64))
        m = rng.random((h, w)) < 0.1
        g[m] = rng.integers(0, vocab, int(m.sum()))
        out.append(g)
    return out


@functools.cache
def fitted(name: str):
    c = get_codec(name, VOCAB)
    c.fit(grids(24))
    return c


def rebuild(name: str, state: bytes, **params):
    """The reader's path: a description that matches `state` (sha256 and all)."""
    desc = fitted(name).describe()
    desc = {**desc, "params": {**desc["params"], **params}, "state_sha256": hashlib.sha256(state).hexdigest()}
    return codec_from_description(desc, VOCAB, state)


def with_header(state: bytes, **fields) -> bytes:
    """A rANS state with header fields replaced (names as in rans._HEADER, plus A)."""
    names = ("magic", "fmt", "kind", "classes", "flags", "vm1", "width", "plane")
    vals = dict(zip(names, _HEAD.unpack_from(state)))
    (vals["A"],) = struct.unpack_from("<I", state, _HEAD.size)
    vals.update(fields)
    return _HEAD.pack(*(vals[k] for k in names)) + struct.pack("<I", vals["A"]) + state[_RANS_HEAD:]


def body_size(state: bytes) -> int:
    return zstandard.frame_content_size(state[_RANS_HEAD:])


# -- zstd frames built by hand (no big buffers are ever made) -------------------------
def zframe(content_size: int | None, blocks: bytes = b"") -> bytes:
    """A zstd frame: single segment with an 8-byte content size, or without one."""
    if content_size is None:   # window descriptor 2**20, no content size
        return zstandard.MAGIC_NUMBER.to_bytes(4, "little") + bytes([0x00, (20 - 10) << 3]) + blocks
    return zstandard.MAGIC_NUMBER.to_bytes(4, "little") + bytes([0xE0]) + content_size.to_bytes(8, "little") + blocks


def rle_blocks(total: int, byte: int = 0) -> bytes:
    """RLE blocks of `total` bytes of `byte`: 4 bytes of frame per 128 KiB of content."""
    out, left = [], total
    while True:
        n = min(left, 128 * 1024)
        left -= n
        last = left == 0
        out.append((int(last) | (1 << 1) | (n << 3)).to_bytes(3, "little") + bytes([byte]))
        if last:
            return b"".join(out)


def zeros_compressed(total: int) -> bytes:
    """A real zstd frame of `total` zero bytes (content size declared), compressed in 1 MiB chunks."""
    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=total)
    chunk = bytes(1 << 20)
    parts = [cobj.compress(chunk[: min(len(chunk), total - i)]) for i in range(0, total, len(chunk))]
    return b"".join(parts) + cobj.flush()


# -- the hostile cases ----------------------------------------------------------------
CASES: dict[str, Callable[[], None]] = {}


def case(label: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        CASES[label] = fn
        return fn
    return register


def refused(fn: Callable, *args, what: str = "", **kwargs) -> None:
    """`fn(*args, **kwargs)` must raise CodecError (any other exception propagates)."""
    try:
        fn(*args, **kwargs)
    except CodecError:
        return
    raise AssertionError(f"no CodecError: {what or fn}")


def loads_or_refused(name: str, state: bytes) -> None:
    """Loading may succeed (e.g. a raw-content dictionary is any bytes) or raise CodecError."""
    try:
        rebuild(name, state)
    except CodecError:
        pass


def refused_state(name: str, state: bytes, what: str = "", **params) -> None:
    refused(rebuild, name, state, what=what, **params)
    refused(get_codec(name, VOCAB, **params).load_state, state, what=what)


def _rans_header_cases(name: str) -> None:
    st = fitted(name).state()
    bad = [dict(vm1=0xFFFFFFFF), dict(vm1=2 * VOCAB - 1), dict(A=0xFFFFFFFF), dict(A=1 << 31),
           dict(A=VOCAB + 1), dict(flags=1), dict(magic=b"XXXX"), dict(fmt=2), dict(kind=7)]
    if name == "rans-ctx":
        bad += [dict(width=-1), dict(width=-(1 << 31)), dict(width=0),
                dict(plane=0xFFFFFFFF), dict(plane=1 << 31), dict(plane=17),
                dict(classes=0), dict(classes=64), dict(classes=255)]
    else:
        bad += [dict(classes=255), dict(width=-1), dict(plane=0xFFFFFFFF)]
    for fields in bad:
        refused_state(name, with_header(st, **fields), what=f"{name} header {fields}")


def _rans_body_cases(name: str) -> None:
    st = fitted(name).state()
    head, total = st[:_RANS_HEAD], body_size(st)
    bodies = {
        "declares 1 TB": zframe(1 << 40, rle_blocks(1000)),
        "declares 2**62": zframe(1 << 62, rle_blocks(1000)),
        "declares 2**64-3": zframe(2**64 - 3, rle_blocks(1000)),
        # 128 KiB of frame that decompresses to 4 GiB (the reported blow-up)
        "4 GiB of RLE blocks": zframe(1 << 32, rle_blocks(1 << 32)),
        "64 MiB of zeros, compressed": zeros_compressed(64 << 20),
        "64 MiB of RLE blocks, no content size": zframe(None, rle_blocks(64 << 20)),
        "declares the right size, holds 64 MiB": zframe(total, rle_blocks(64 << 20)),
        "declares the right size, holds less": zframe(total, rle_blocks(total - 1)),
        "declares one byte more": zframe(total + 1, rle_blocks(total + 1)),
        "right size but the frame is too short for it": zframe(total),
        "trailing frame": st[_RANS_HEAD:] + zframe(0, rle_blocks(0)),
        "trailing byte": st[_RANS_HEAD:] + b"\0",
        "empty body": b"",
        "not zstd": b"\0" * 64,
    }
    for what, body in bodies.items():
        refused_state(name, head + body, what=f"{name} body: {what}")


def _truncated_and_random(name: str) -> None:
    st = fitted(name).state()
    cuts = sorted({*range(0, min(len(st), 64)), *range(0, len(st), max(1, len(st) // 97)), len(st) - 1})
    for k in cuts:
        if name == "zstd-dict" and k > 0:   # a dictionary cut in its content is still a dictionary
            loads_or_refused(name, st[:k])
        else:
            refused_state(name, st[:k], what=f"{name} truncated to {k}")
    rng = np.random.default_rng(7)
    for i in range(200):
        junk = rng.bytes(int(rng.integers(0, 4096)))
        if i % 2:   # keep the header (or kind tag) valid half the time: exercises what follows
            junk = (st[:_RANS_HEAD] + junk) if name != "zstd-dict" else (b"T" + junk[:1000])
        loads_or_refused(name, junk)


for _n in ("rans-unigram", "rans-ctx"):
    case(f"{_n}: header fields out of range")(functools.partial(_rans_header_cases, _n))
    case(f"{_n}: compressed tables bombs and size mismatches")(functools.partial(_rans_body_cases, _n))
for _n in STATEFUL:
    case(f"{_n}: truncated and random states")(functools.partial(_truncated_and_random, _n))


@case("rans-ctx: tables of the declared size but inconsistent")
def _rans_inconsistent_tables() -> None:
    st = fitted("rans-ctx").state()
    total = body_size(st)
    raw = bytearray(zstandard.ZstdDecompressor().decompress(st[_RANS_HEAD:]))
    for fill in (b"\0", b"\xff"):
        body = zstandard.ZstdCompressor().compress(fill * total)
        refused_state("rans-ctx", st[:_RANS_HEAD] + body, what=f"tables of {fill!r}")
    raw[0:4] = raw[4:8]   # a repeated alphabet code
    refused_state("rans-ctx", st[:_RANS_HEAD] + zstandard.ZstdCompressor().compress(bytes(raw)))


@case("zstd-dict: dictionary larger than dict_size, bad sizes in the description")
def _zstd_dict_sizes() -> None:
    st = fitted("zstd-dict").state()
    refused_state("zstd-dict", st + b"\0" * 16384, what="dictionary above dict_size")
    refused_state("zstd-dict", b"R" + bytes(300), what="raw dictionary above dict_size=256", dict_size=256)
    for size in (1 << 40, 2**62, MAX_DICT_SIZE + 1, -1, 0, 255, True, 1.5, "16384", None):
        refused(get_codec, "zstd-dict", VOCAB, dict_size=size, what=f"dict_size={size!r}")
        refused(rebuild, "zstd-dict", st, dict_size=size, what=f"description dict_size={size!r}")
    for tag in (b"X", b"\xff", b"R"):   # unknown tags; R is raw content where the description says trained
        refused_state("zstd-dict", tag + st[1:], what=f"kind tag {tag!r}", dict_kind="trained")
    refused_state("zstd-dict", b"", what="empty state")


@case("zstd, zstd-dict: payload frames that declare more than n tokens")
def _zstd_payload_bombs() -> None:
    for name in ("zstd", "zstd-dict"):
        c = fitted(name) if name == "zstd-dict" else get_codec(name, VOCAB)
        for payload in (zframe(1 << 40, rle_blocks(1000)), zframe(2**62), zframe(1 << 32, rle_blocks(1 << 32)),
                        zeros_compressed(64 << 20), zframe(None, rle_blocks(64 << 20)),
                        zframe(512, rle_blocks(64 << 20))):
            refused(c.decode, payload, 256, what=f"{name} payload")
            refused(c.decode_batch, [c.encode(np.arange(256) % VOCAB), payload], 256, what=f"{name} batch")
        # n_tokens itself hostile: above the cap, or a frame far too small for the size it claims
        n = 32 << 20   # 64 MiB of uint16, under MAX_SAMPLE_TOKENS
        refused(c.decode, zframe(2 * n, rle_blocks(1000)), n, what=f"{name}: 13-byte frame for 64 MiB")
        for n in (MAX_SAMPLE_TOKENS + 1, 1 << 40, 2**62, 2**64):
            refused(c.decode, zframe(2 * n if 2 * n < 2**64 - 2 else 1 << 40, rle_blocks(1000)), n,
                    what=f"{name}: n_tokens={n}")


@case("zstd, zstd-dict: one hostile frame in the middle of a good batch")
def _zstd_batch_middle() -> None:
    n = 256
    for name in ("zstd", "zstd-dict"):
        c = fitted(name) if name == "zstd-dict" else get_codec(name, VOCAB)
        good = c.encode_batch(grids(8, seed=5))
        empty = c.encode(np.zeros(0, np.int64))
        frame = good[0]
        over = c._contexts()[0].compress(np.full(n, VOCAB, "<u2").tobytes())   # token 256 >= vocab_size
        hostile = {
            "declares 1 TB": zframe(1 << 40, rle_blocks(1000)),
            "declares 4 GiB, holds it in RLE blocks": zframe(1 << 32, rle_blocks(1 << 32)),
            "64 MiB of zeros, compressed": zeros_compressed(64 << 20),
            "no content size, 64 MiB of RLE blocks": zframe(None, rle_blocks(64 << 20)),
            "declares the right size, holds 64 MiB": zframe(2 * n, rle_blocks(64 << 20)),
            "declares the right size, holds less": zframe(2 * n, rle_blocks(2 * n - 1)),
            "declares 2 bytes more": zframe(2 * n + 2, rle_blocks(2 * n + 2)),
            "right size, frame too short for it": zframe(2 * n),
            "truncated": frame[:-1],
            "trailing byte": frame + b"\0",
            "trailing frame": frame + empty,
            "garbage": bytes(range(64)),
            "out-of-vocabulary token": over,
            "empty": b"",
        }
        for what, bad in hostile.items():
            for at in (0, 4, 8):
                batch = [*good[:at], bad, *good[at:]]
                refused(c.decode_batch, batch, n, what=f"{name} batch, {what} at {at}")
                refused(c.decode_batch, batch, [n] * len(batch), what=f"{name} batch counts, {what} at {at}")
        for what, bad in {"declares 0, 64 MiB of RLE blocks behind": zframe(0, rle_blocks(64 << 20)),
                          "trailing byte": empty + b"\0", "two empty frames": empty + empty,
                          "no content size": zframe(None, rle_blocks(0))}.items():
            refused(c.decode_batch, [empty, bad, empty], 0, what=f"{name} empty batch, {what}")
            refused(c.decode_batch, [frame, bad, frame], [n, 0, n], what=f"{name} mixed batch, {what}")
        # hostile counts in the middle: a tiny frame for 64 MiB, counts above the cap
        m = 32 << 20
        refused(c.decode_batch, [frame, zframe(2 * m, rle_blocks(1000)), frame], [n, m, n],
                what=f"{name}: 13-byte frame for 64 MiB in a batch")
        for bad_n in (MAX_SAMPLE_TOKENS + 1, 2**64, -1, True, 1.5, None):
            refused(c.decode_batch, [frame, frame, frame], [n, bad_n, n], what=f"{name}: batch n_tokens={bad_n!r}")


@case("rans: payloads longer than n tokens can take, hostile n_tokens")
def _rans_payloads() -> None:
    for name in ("rans-unigram", "rans-ctx"):
        c = fitted(name)
        good = c.encode(grids(1, seed=3)[0])
        for n, payload in ((4, good[:8] + bytes(4 * 1000)), (0, good), (256, good[:8] + bytes(4 * (1 << 20))),
                           (256, good + bytes(4 * 257))):
            refused(c.decode, payload, n, what=f"{name}: {len(payload)} bytes for {n} tokens")
            refused(c.decode_batch, [good, payload], n, what=f"{name}: batch")
        for n in (MAX_SAMPLE_TOKENS + 1, 1 << 40, 2**62, 2**64, -1, -(2**63), np.int64(-5),
                  np.uint64(2**64 - 1), True, 1.5, "3", None, b"x"):
            refused(c.decode, good, n, what=f"{name}: n_tokens={n!r}")
            refused(c.decode_batch, [good], [n], what=f"{name}: batch n_tokens={n!r}")
        for counts in (1.5, None, object(), [256, -1], [256]):
            refused(c.decode_batch, [good, good], counts, what=f"{name}: batch counts {counts!r}")


# -- the child process ----------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def _reset_peak() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS, where the kernel allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    try:
        return _status_kb("VmHWM") / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def _child() -> None:
    """Run every case; print {label: {"error": None | "Type: msg", "rss_mb": growth}}."""
    for name in STATEFUL:   # fitting, imports and the zstd contexts are the baseline
        fitted(name).decode(fitted(name).encode(grids(1)[0]), 256)
    zeros_compressed(1 << 20)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # A regression raises MemoryError here instead of exhausting the machine.
    limit = _status_kb("VmSize") * 1024 + (2 << 30)
    if hard == resource.RLIM_INFINITY or limit < hard:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    results = {}
    for label, fn in CASES.items():
        # Growth of the peak over the RSS at the start of the case (or, where the peak
        # cannot be reset, over the peak so far, which includes fitting: a weaker bound).
        before = _status_kb("VmRSS") / 1024 if _reset_peak() else _peak_mb()
        try:
            fn()
            error = None
        except BaseException as e:   # reported to the parent, which fails on it
            error = f"{type(e).__name__}: {e}"
        results[label] = {"error": error, "rss_mb": _peak_mb() - before}
    print(json.dumps(results))


@pytest.fixture(scope="module")
def child_results():
    here = Path(__file__).resolve().parent
    code = f"import sys; sys.path.insert(0, {str(here)!r}); import test_codec_bounds as t; t._child()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("label", list(CASES))
def test_hostile_input_is_a_codec_error_in_bounded_memory(child_results, label):
    r = child_results[label]
    assert r["error"] is None, r["error"]
    assert r["rss_mb"] < MAX_RSS_GROWTH_MB, f"peak RSS grew by {r['rss_mb']:.0f} MB"


# -- valid states and payloads are untouched --------------------------------------------
@pytest.mark.parametrize("name", STATEFUL)
def test_valid_states_still_load_and_decode(name):
    c = fitted(name)
    st = c.state()
    again = rebuild(name, st)
    assert again.state() == st and again.describe() == c.describe()
    xs = grids(5, seed=11)
    payloads = c.encode_batch(xs)
    assert again.encode_batch(xs) == payloads
    for got, want in zip(again.decode_batch(payloads, 256), xs):
        assert np.array_equal(got, want.reshape(-1))
    assert again.decode(again.encode(np.zeros(0, np.int64)), 0).size == 0


def test_state_size_checks_come_from_params():
    # rans: the alphabet may not exceed max_symbols even when the vocabulary allows it
    c = get_codec("rans-unigram", VOCAB, max_symbols=16)
    c.fit(grids(8))
    st = c.state()
    with pytest.raises(CodecError, match="max_symbols"):
        c.load_state(with_header(st, A=17))
    # a frame declaring other than the exact table size is refused before decompressing
    with pytest.raises(CodecError, match=r"declares 1099511627776 content bytes; expected \d+"):
        c.load_state(st[:_RANS_HEAD] + zframe(1 << 40, rle_blocks(1000)))
    with pytest.raises(CodecError, match="declares no content bytes"):
        c.load_state(st[:_RANS_HEAD] + zframe(None, rle_blocks(1000)))
    # zstd-dict: the state is at most a tag plus dict_size bytes
    with pytest.raises(CodecError, match="dict_size"):
        get_codec("zstd-dict", VOCAB, dict_size=256).load_state(b"R" + bytes(257))
    get_codec("zstd-dict", VOCAB, dict_size=256).load_state(b"R" + bytes(256))


def test_sample_token_cap():
    c = get_codec("raw", VOCAB)
    with pytest.raises(CodecError, match="limit"):
        c.decode(b"", MAX_SAMPLE_TOKENS + 1)
    with pytest.raises(CodecError, match="n_tokens must be an integer"):
        c.decode(b"\0\0", True)
    assert c.decode_batch([b"\1\0"], np.array(1)).__len__() == 1
