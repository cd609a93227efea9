"""zstd decode_batch: the per-sample loop (the base class's path) against the batch path.

- Payloads: 4096 samples of 256 tokens, vocab_size 1024 (uint16), tokens with an image
  tokenizer's kind of structure: a smoothed random walk folded into the vocabulary.
  zstd at the codec's default level; zstd-dict fitted on the first 512 samples.
- old: `TokenCodec.decode_batch(codec, ...)`, i.e. `decode()` once per sample (what
  `ZstdCodec` used before it had a `decode_batch` of its own).
- new: `codec.decode_batch(...)`.
- Both are checked to return the same arrays first. Then interleaved rounds (old, new,
  old, new, ...), the minimum of each over the rounds, for one batch of 4096 (a shard of
  4096 samples) and for batches of 256 (the smallest shards; the loader decodes a shard
  per call). One process pinned to one CPU where the OS allows it.

    python bench/codec_decode.py [--rounds N]

Writes its table into bench/RESULTS.md under its heading.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np
from results_md import publish  # bench/ is the script's folder, so on sys.path

from tokshard.pipeline.format.codecs import TokenCodec, get_codec

HEADING = "## zstd decode_batch: per-sample loop vs batch path"
SAMPLES = 4096
TOKENS = 256
VOCAB = 1024
FIT_SAMPLES = 512
BATCHES = (4096, 256)


def walk_tokens(n: int, length: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    """Smoothed random walks folded into [0, vocab): neighbouring tokens are close, like
    the codes of an image tokenizer along a raster scan."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = np.cumsum(rng.normal(0, 20, length + 7))
        out.append((np.round(np.convolve(w, np.ones(8) / 8, mode="valid")) % vocab).astype(np.int64))
    return out


def time_rounds(fns: dict, batches: list[list[bytes]], rounds: int) -> dict[str, float]:
    """Seconds per pass over `batches` for each fn, the minimum over interleaved rounds."""
    best = dict.fromkeys(fns, float("inf"))
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]   # neither always runs first
        for k in order:
            t = time.perf_counter()
            for b in batches:
                fns[k](b)
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    t0 = time.perf_counter()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if affinity:
        os.sched_setaffinity(0, {min(affinity)})
    tokens = walk_tokens(SAMPLES, TOKENS, VOCAB)
    rows = []
    for name in ("zstd", "zstd-dict"):
        codec = get_codec(name, VOCAB)
        if codec.needs_fit:
            codec.fit(tokens[:FIT_SAMPLES])
        payloads = codec.encode_batch(tokens)
        old = TokenCodec.decode_batch(codec, payloads, TOKENS)
        new = codec.decode_batch(payloads, TOKENS)
        assert len(old) == len(new) == SAMPLES
        for a, b, x in zip(old, new, tokens):
            assert a.dtype == b.dtype and np.array_equal(a, b) and np.array_equal(b, x), f"{name}: decode differs"
        mean_bytes = sum(map(len, payloads)) / len(payloads)
        fns = {"old": lambda b, c=codec: TokenCodec.decode_batch(c, b, TOKENS),
               "new": lambda b, c=codec: c.decode_batch(b, TOKENS)}
        for size in BATCHES:
            batches = [payloads[i:i + size] for i in range(0, SAMPLES, size)]
            best = time_rounds(fns, batches, args.rounds)
            o, n = SAMPLES / best["old"], SAMPLES / best["new"]
            rows.append(f"| {name} | {mean_bytes:.0f} | {size:,} | {o:,.0f} | {n:,.0f} | {n / o:.2f}x |")
    lines = [
        HEADING, "",
        f"_{datetime.date.today().isoformat()}, `python bench/codec_decode.py`, one process "
        f"{'pinned to one CPU' if affinity else '(not pinned)'}, {os.cpu_count()}-core machine, "
        f"Python {sys.version.split()[0]}. {SAMPLES:,} payloads of {TOKENS} tokens (vocab_size {VOCAB}, "
        f"smoothed random walks); minimum over {args.rounds} interleaved rounds._", "",
        "| codec | payload bytes (mean) | batch | old: per-sample loop, samples/s | new: decode_batch, samples/s "
        "| new / old |",
        "|---|---:|---:|---:|---:|---:|",
        *rows, "",
    ]
    if affinity:
        os.sched_setaffinity(0, affinity)
    publish(HEADING, "\n".join(lines), t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
