"""Mixture and worker throughput (issue 16), ratios within one run.

- Data: bench/loader.py's real tokens (bundled photos + crops, default tokenizer, zstd
  Parquet shards of 256 samples), as three datasets whose manifests list those shards 20, 30
  and 40 times (distinct dataset folders and shard ids, hard-linked files).
- single: one of them (the 40x one) through `ds.loader(256, shuffle_buffer=10_000,
  columns=["caption"])`, num_workers=0, torch 1 thread: one core.
- mixture: `tokshard.mix([a, b, c], weights=[1, 1, 2])` through the same loader settings,
  the caption column included: one core.
- workers: the single dataset with num_workers=1 and num_workers=2 (2-core machine),
  crop + flip in the workers, same settings otherwise.

    python bench/mixture.py

Writes its table into bench/RESULTS.md under "## Mixtures and workers".
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from pathlib import Path

import loader as loader_bench  # bench/ is the script's folder, so on sys.path
from results_md import publish

HEADING = "## Mixtures and workers"
BATCH = 256
SAMPLES = 150_000
TARGET_MIX = 40_000
TARGET_WORKERS = 1.6


def main() -> int:
    import torch

    import tokshard
    from tokshard.pipeline.stream.augment import Compose, TokenHFlip, TokenRandomResizedCrop
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokshard-bench-") as tmp:
        tmp = Path(tmp)
        _, tokens = loader_bench.convert_photos(tmp)
        paths = [loader_bench.repeat_manifest(tokens, tmp / name, repeat)
                 for name, repeat in (("a", 20), ("b", 30), ("c", 40))]
        a, b, c = (tokshard.open(p) for p in paths)
        kw = dict(shuffle_buffer=10_000, rank=0, world_size=1, seed=0, columns=["caption"])
        single, sn = loader_bench.loader_rate(c.loader(BATCH, **kw), SAMPLES)
        mixture = tokshard.mix([a, b, c], weights=[1, 1, 2])
        mixed, mn = loader_bench.loader_rate(mixture.loader(BATCH, **kw), SAMPLES)
        per_stream, pn = loader_bench.loader_rate(mixture.loader(BATCH, batching="per_stream", **kw), SAMPLES)
        aug = Compose([TokenRandomResizedCrop(16), TokenHFlip()])
        workers = {}
        for nw in (1, 2):
            workers[nw] = loader_bench.loader_rate(c.loader(BATCH, num_workers=nw, augment=aug, **kw), SAMPLES)
        sizes = [len(a), len(b), len(c)]
    w1, w2 = workers[1][0], workers[2][0]
    lines = [
        HEADING, "",
        f"_{datetime.date.today().isoformat()}, `python bench/mixture.py`, {os.cpu_count()}-core machine, torch 1 "
        f"thread, batch {BATCH}, shuffle buffer 10,000, the caption column delivered. Three datasets of real tokens "
        f"({sizes[0]:,}, {sizes[1]:,} and {sizes[2]:,} samples: bench/loader.py's converted photos, listed 20, 30 and "
        f"40 times). Ratios are within this run._", "",
        "| loader | samples/s | samples timed | ratio |",
        "|---|---:|---:|---:|",
        f"| one dataset, num_workers=0 (one core) | {single:,.0f} | {sn:,} | 1.00x |",
        f"| 3-dataset mixture, weights 1:1:2, num_workers=0 (one core) | {mixed:,.0f} | {mn:,} | "
        f"{mixed / single:.2f}x |",
        f"| the same mixture, batching=\"per_stream\" (one core) | {per_stream:,.0f} | {pn:,} | "
        f"{per_stream / single:.2f}x |",
        f"| one dataset, crop+flip, num_workers=1 | {w1:,.0f} | {workers[1][1]:,} | 1.00x |",
        f"| one dataset, crop+flip, num_workers=2 | {w2:,.0f} | {workers[2][1]:,} | {w2 / w1:.2f}x |",
        "",
        f"Targets (issue 16): a 3-dataset mixture with the caption column >= {TARGET_MIX:,} samples/s on one "
        f"core: {mixed:,.0f}, **{'met' if mixed >= TARGET_MIX else 'NOT met'}**; num_workers=2 >= "
        f"{TARGET_WORKERS}x num_workers=1: {w2 / w1:.2f}x, **{'met' if w2 / w1 >= TARGET_WORKERS else 'NOT met'}**.",
        "",
    ]
    publish(HEADING, "\n".join(lines), t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
