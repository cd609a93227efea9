"""Random access: `ds[i]` lookups per second over a 100k-sample dataset, warm and cold,
against a baseline measured in the same run.

- Dataset: bench/loader.py's real tokens (bundled photos + crops, default tokenizer, zstd
  Parquet shards of 256 samples) listed enough times in one manifest to hold >= 100,000
  samples (distinct shard ids, hard-linked files: what a reader sees of any dataset).
- warm: every shard already parsed into the sample cache (`ds[i]` once per shard first;
  the default 256 MiB cache holds the whole dataset's stored bytes), then uniformly random
  ids: each lookup is a shard index, the decode of one sample and the dict it returns.
- cold: a fresh dataset with a one-shard cache: each random lookup parses its shard.
- baseline: the same random ids against the whole dataset decoded into memory (one numpy
  array of tokens, Python lists of the other columns) and the same dict per lookup
  (tokens copied, metadata parsed): the floor a random-access reader can approach.
- Python-level timing of one process, one core (torch 1 thread).

    python bench/access.py

Writes its table into bench/RESULTS.md under "## Random access".
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from pathlib import Path

import loader as loader_bench  # bench/ is the script's folder, so on sys.path
import numpy as np
from results_md import publish

HEADING = "## Random access"
TARGET_SAMPLES = 100_000
LOOKUPS = 100_000
TARGET_RATE = 20_000


def main() -> int:
    import torch

    import tokshard
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokshard-bench-") as tmp:
        tmp = Path(tmp)
        _, tokens = loader_bench.convert_photos(tmp)
        n_small = len(tokshard.open(tokens))
        repeat = -(-TARGET_SAMPLES // n_small)
        big = loader_bench.repeat_manifest(tokens, tmp / "big", repeat)
        ds = tokshard.open(big)
        n = len(ds)
        rng = np.random.default_rng(0)
        ids = rng.integers(0, n, LOOKUPS).tolist()

        # baseline: the whole dataset decoded in memory, and the same dict per lookup
        import json

        from tokshard.pipeline.format.shards.base import EXTRA_COLUMNS
        flat = [ds.read_shard(k, EXTRA_COLUMNS) for k in range(ds.num_shards)]
        all_tokens = np.concatenate([ds.decode_tokens(s["tokens"], s["id"]) for s in flat])
        col = {c: [v for s in flat for v in s[c].tolist()] for c in ("key", "label", *EXTRA_COLUMNS)}
        keys = col["key"]
        start = time.perf_counter()
        for i in ids:
            meta = col["meta"][i]
            _ = {"id": i, "key": keys[i], "tokens": all_tokens[i].copy(), "label": col["label"][i],
                 "caption": col["caption"][i], "width": col["width"][i], "height": col["height"][i],
                 "source": col["source"][i], "meta": None if meta is None else json.loads(meta)}
        baseline = LOOKUPS / (time.perf_counter() - start)
        del flat, all_tokens, col

        for k in range(ds.num_shards):            # warm the sample cache
            ds[int(ds.shard_offsets[k])]
        start = time.perf_counter()
        for i in ids:
            ds[i]
        warm = LOOKUPS / (time.perf_counter() - start)
        assert ds[ids[0]]["key"] == keys[ids[0]]

        cold_ds = tokshard.open(big, sample_cache_bytes=1)
        cold_n = 2_000
        start = time.perf_counter()
        for i in ids[:cold_n]:
            cold_ds[i]
        cold = cold_n / (time.perf_counter() - start)
        shard_samples = int(np.median(ds.shard_sizes))
        shards = ds.num_shards
    lines = [
        HEADING, "",
        f"_{datetime.date.today().isoformat()}, `python bench/access.py`, one process (torch 1 thread), "
        f"{os.cpu_count()}-core machine. {n:,} samples ({n_small:,} real images converted with the default "
        f"tokenizer, 16x16 tokens, zstd Parquet shards of {shard_samples} samples, listed "
        f"{repeat} times: {shards} shards); {LOOKUPS:,} uniformly random ids._", "",
        "| lookup | lookups/s | vs in-memory columns |",
        "|---|---:|---:|",
        f"| in-memory decoded columns (`tokens[i]` + the same dict, metadata parsed; baseline) | "
        f"{baseline:,.0f} | 1.00x |",
        f"| `ds[i]`, warm (every shard in the sample cache) | {warm:,.0f} | {warm / baseline:.3f}x |",
        f"| `ds[i]`, cold (one-shard cache: each lookup parses its shard; {cold_n:,} lookups) | {cold:,.0f} | "
        f"{cold / baseline:.4f}x |",
        "",
        f"Target (issue 16): `ds[i]` over a 100k-sample dataset >= {TARGET_RATE:,} lookups/s warm: "
        f"{warm:,.0f}, **{'met' if warm >= TARGET_RATE else 'NOT met'}**.",
        "",
    ]
    publish(HEADING, "\n".join(lines), t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
