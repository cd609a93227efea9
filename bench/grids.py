"""Variable token grids (issue 17), ratios within one run.

- Data: the bundled photos and random crops (1,159 images of varied sizes and aspect ratios)
  as a Parquet source, converted with the default tokenizer (16-pixel patches) twice: square
  (`--resize-mode center_crop`, 256x256: a 16x16 grid each) and variable
  (`--resize-mode area --max-pixels 65536`: each image its own grid of at most 256 tokens,
  its aspect ratio kept), zstd Parquet shards of 256, one decode worker, interleaved rounds.
- What the grids are: how many distinct grids, tokens a sample, stored bytes a sample.
- loader: each dataset's shards listed 100 times, `ds.loader(256)` (num_workers=0, torch 1
  thread: one core) in interleaved rounds: batches of one grid each for the variable dataset
  (grouped by grid), against the square one; the share of samples in partial batches (the only
  padding waste grouping by grid leaves); and `pack=4096` (8 rows) on the variable dataset.

    python bench/grids.py

Writes its table into bench/RESULTS.md under "## Variable grids".
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import loader as loader_bench  # bench/ is the script's folder, so on sys.path
import pyarrow as pa
import pyarrow.parquet as pq
from results_md import publish

HEADING = "## Variable grids"
AREA = 256 * 256
BATCH = 256
REPEAT = 100
SAMPLES = 150_000
ROUNDS = 3


def make_source(tmp: Path) -> Path:
    from tokshard.pipeline.sample_data import jpeg_bytes, sample_images
    images = list(sample_images(crops_per_photo=60, seed=0))
    src = tmp / "src"
    src.mkdir()
    pq.write_table(pa.table({"key": [k for k, _, _ in images], "jpg": [jpeg_bytes(im, 90) for _, im, _ in images],
                             "label": [lab for _, _, lab in images]}), src / "0.parquet")
    return src


def convert_seconds(src: Path, out: Path, **kw) -> float:
    from tokshard.pipeline.convert.job import ConvertConfig, convert
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    convert(ConvertConfig(sources=[str(src)], out=str(out), format="parquet", codec="zstd", decode_workers=1,
                          shard_size=256, **kw), quiet=True)
    return time.perf_counter() - t0


def main() -> int:
    import torch

    import tokshard
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokshard-bench-") as tmp:
        tmp = Path(tmp)
        src = make_source(tmp)
        modes = {"square": {}, "variable": {"resize_mode": "area", "max_area": AREA}}
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(ROUNDS):
            for m, kw in modes.items():
                times[m].append(convert_seconds(src, tmp / m, **kw))
        small = {m: tokshard.open(tmp / m) for m in modes}
        big = {m: tokshard.open(loader_bench.repeat_manifest(tmp / m, tmp / f"big-{m}", REPEAT)) for m in modes}
        rates: dict[str, list[float]] = {"square": [], "variable": [], "packed": []}
        for r in range(ROUNDS):
            kw = dict(shuffle_buffer=10_000, rank=0, world_size=1, seed=r)
            for m in modes:
                rates[m].append(loader_bench.loader_rate(big[m].loader(BATCH, **kw), SAMPLES)[0])
            rates["packed"].append(loader_bench.loader_rate(big["variable"].loader(8, pack=4096, **kw), SAMPLES)[0])
        # padding waste: samples in batches short of BATCH, over one epoch of the big dataset
        sizes = [len(b["id"]) for b in big["variable"].loader(BATCH, shuffle_buffer=10_000, rank=0, world_size=1)]
        partial = sum(s for s in sizes if s < BATCH) / sum(sizes)
        grids = small["variable"].grids()
        tokens = grids.prod(axis=1)
        common = Counter(map(tuple, grids.tolist())).most_common(5)
        n = len(small["variable"])
        stored = {m: small[m].info.totals["stored_bytes"] / len(small[m]) for m in modes}
    conv = {m: n / min(times[m]) for m in modes}
    best = {k: max(v) for k, v in rates.items()}
    lines = [
        HEADING, "",
        f"_{datetime.date.today().isoformat()}, `python bench/grids.py`, {os.cpu_count()}-core machine, torch 1 "
        f"thread. {n:,} images (the bundled photos and random crops), default tokenizer (16-pixel patches), zstd "
        f"Parquet. Square: center_crop to 256x256 (16x16 = 256 tokens each); variable: `--resize-mode area "
        f"--max-pixels {AREA}` (each image its own grid, at most 256 tokens). Best of {ROUNDS} interleaved rounds; "
        "ratios within this run._", "",
        f"Variable grids: {len(set(map(tuple, grids.tolist())))} distinct grids; {tokens.mean():.1f} tokens a sample "
        f"on average ({tokens.min()}-{tokens.max()}); most common (h x w: samples): "
        + ", ".join(f"{h}x{w}: {c}" for (h, w), c in common) + ".", "",
        "| | square | variable | ratio |",
        "|---|---:|---:|---:|",
        f"| convert, one decode worker (images/s) | {conv['square']:,.0f} | {conv['variable']:,.0f} | "
        f"{conv['variable'] / conv['square']:.2f}x |",
        f"| stored bytes a sample | {stored['square']:,.1f} | {stored['variable']:,.1f} | "
        f"{stored['variable'] / stored['square']:.2f}x |",
        f"| loader, batches of {BATCH}, one core (samples/s; variable: each batch one grid) | "
        f"{best['square']:,.0f} | {best['variable']:,.0f} | {best['variable'] / best['square']:.2f}x |",
        f"| loader, `pack=4096`, 8 rows (samples/s) | | {best['packed']:,.0f} | "
        f"{best['packed'] / best['square']:.2f}x |",
        "",
        f"Grouping by grid leaves {partial:.2%} of an epoch's samples ({n * REPEAT:,}) in partial batches (one per "
        "grid at most): the only padding waste. Rounds (samples/s): "
        + "; ".join(f"{k} {', '.join(f'{x:,.0f}' for x in v)}" for k, v in rates.items()) + ".",
    ]
    publish(HEADING, "\n".join(lines), t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
