"""Manifest queries at LAION scale: 200,000 shards, 2 billion samples.

Synthesises a manifest as a LAION-400M/2B conversion would write it (200k
shards of 10,000 samples, img2dataset keys SSSSSSIIII, one source tar per
shard) and a per-sample index for a subset of the shards (the full 2B-row
index, ~40 GB, would not fit this machine's budget; a lookup reads one index
file whichever shard it is, so the subset is what a lookup touches anyway).
Times, on this machine, with every figure including opening the manifest:
- aggregates over the shard table with `tokshard query` (DuckDB);
- key lookups with `tokshard lookup` (routed by the manifest's key ranges),
  beside the baseline of the same lookup as SQL over the index files
  (`SELECT ... FROM samples WHERE key = ...`), which opens every file: the
  baseline is timed on the subset and grows with the number of shards.

    python bench/query.py     # or: make bench

Writes its table into bench/RESULTS.md under "## Manifest queries at scale".
"""

from __future__ import annotations

import datetime
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from results_md import publish  # bench/ is the script's folder, so on sys.path

HEADING = "## Manifest queries at scale"
SHARDS, PER_SHARD, INDEXED = 200_000, 10_000, 40
LABELS_PER_SHARD = 50


def synthesise(root: Path) -> None:
    from tokshard.pipeline.format.layout import DatasetLayout
    from tokshard.pipeline.format.manifest import write_manifest
    from tokshard.pipeline.format.shards import EncodedSample, get_format
    from tokshard.pipeline.storage import sha256
    from tokshard.schemas.records import DatasetRecord, ShardEntry, TokenizerRecord
    from tokshard.schemas.v1 import LABELS, SAMPLES
    from tokshard.schemas.v1 import SHARDS as SHARD_SCHEMA
    rng = np.random.default_rng(0)
    stored = rng.integers(2_000_000, 3_000_000, SHARDS)
    skipped = rng.integers(0, 400, SHARDS)
    names = [f"{s:06d}" for s in range(SHARDS)]
    cols = {
        "shard": names, "path": [f"shards/{n}.parquet" for n in names], "format": ["parquet"] * SHARDS,
        "codec": ["zstd"] * SHARDS, "codec_version": [1] * SHARDS, "samples": [PER_SHARD] * SHARDS,
        "tokens": [PER_SHARD * 256] * SHARDS, "raw_bytes": [PER_SHARD * 512] * SHARDS,
        "payload_bytes": (stored - 600_000).tolist(), "stored_bytes": stored.tolist(),
        "source_bytes": rng.integers(300_000_000, 500_000_000, SHARDS).tolist(),
        "sha256": ["0" * 64] * SHARDS, "tokenizer_id": ["kmeans-vq/1"] * SHARDS,
        "tokenizer_config_hash": ["c" * 64] * SHARDS, "codebook_hash": ["b" * 64] * SHARDS,
        "grid": [[16, 16]] * SHARDS, "source_shards": [[f"s3://laion/laion2b/{n[1:]}.tar"] for n in names],
        "unit": list(range(SHARDS)), "skipped": skipped.tolist(),
        "skipped_by_reason": [[{"reason": "decode_error", "count": int(k)}] for k in skipped],
        "key_min": [f"{n}0000" for n in names], "key_max": [f"{n}{PER_SHARD - 1:04d}" for n in names],
    }
    # The indexed shards exist for real: `lookup` checks the key it returns against its shard.
    indexed_shards = np.linspace(0, SHARDS - 1, INDEXED).astype(int)
    (root / "shards").mkdir()
    tokens = np.zeros(256, np.uint16)
    for s in indexed_shards:
        n = names[s]
        data, _ = get_format("parquet").write(
            [EncodedSample(f"{n}{i:04d}", b"\0", tokens, None, None, 256, 256, "", None) for i in range(PER_SHARD)],
            "zstd", (16, 16), np.dtype(np.uint16), {})
        (root / cols["path"][s]).write_bytes(data)
        cols["sha256"][s], cols["stored_bytes"][s] = sha256(data), len(data)
    table = pa.Table.from_pydict(cols, schema=SHARD_SCHEMA)
    record = DatasetRecord(
        tokshard_version="bench", format="parquet", codec={"name": "zstd", "version": 1},
        tokenizer=TokenizerRecord(name="kmeans-vq", tokenizer_id="kmeans-vq/1", tokenizer_config_hash="c" * 64,
                                  codebook_hash="b" * 64, config={}, vocab_size=1024, path="tokenizer"),
        grid=[16, 16], token_dtype="uint16", job_hash="", shards=SHARDS,
        totals={"samples": SHARDS * PER_SHARD}, skipped_by_reason={}, labels="labels.parquet")
    write_manifest(DatasetLayout.at(str(root)), [ShardEntry(**r) for r in table.to_pylist()], record)
    # labels.parquet: each shard holds LABELS_PER_SHARD of 1,000 classes (ImageNet-like).
    shard_col = np.repeat(np.array(names, dtype=object), LABELS_PER_SHARD)
    label_col = (np.arange(SHARDS)[:, None] * 7 + np.arange(LABELS_PER_SHARD)[None, :]) % 1000
    pq.write_table(pa.Table.from_pydict({
        "shard": pa.array(shard_col, pa.string()), "label": label_col.reshape(-1),
        "count": np.full(SHARDS * LABELS_PER_SHARD, PER_SHARD // LABELS_PER_SHARD)}, schema=LABELS),
        root / "labels.parquet", compression="zstd")
    (root / "samples").mkdir()
    for s in indexed_shards:
        n = names[s]
        pq.write_table(pa.Table.from_pydict({
            "key": [f"{n}{i:04d}" for i in range(PER_SHARD)], "shard": [n] * PER_SHARD,
            "row": np.arange(PER_SHARD), "offset": np.full(PER_SHARD, -1), "size": rng.integers(150, 200, PER_SHARD),
            "label": rng.integers(-1, 1000, PER_SHARD), "width": rng.integers(256, 1024, PER_SHARD).astype(np.int32),
            "height": rng.integers(256, 1024, PER_SHARD).astype(np.int32),
            "source": [f"s3://laion/laion2b/{n[1:]}.tar"] * PER_SHARD}, schema=SAMPLES),
            root / "samples" / f"{n}.parquet", compression="zstd")


def timed(fn, repeat: int = 5) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> int:
    from tokshard.pipeline.tools.query import lookup, run
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokshard-bench-") as tmp:
        root = Path(tmp) / "laion2b-tokens"
        root.mkdir()
        synthesise(root)
        manifest_mb = (root / "manifest.parquet").stat().st_size / 2**20
        url = str(root)
        queries = [
            ("samples, bytes and skips over all shards",
             "SELECT count(*), sum(samples), sum(stored_bytes), sum(skipped) FROM shards"),
            ("bytes per sample by tokenizer and codec",
             "SELECT tokenizer_id, codec, sum(stored_bytes) / sum(samples) FROM shards GROUP BY ALL"),
            ("the shards made from one source tar",
             "SELECT shard FROM shards WHERE list_contains(source_shards, 's3://laion/laion2b/12345.tar')"),
            ("skips by reason", "SELECT r.reason, sum(r.count) FROM (SELECT unnest(skipped_by_reason) AS r "
                                "FROM shards) GROUP BY 1 ORDER BY 2 DESC"),
            (f"label histogram (labels.parquet, {SHARDS * LABELS_PER_SHARD / 1e6:.0f}M rows)",
             "SELECT label, sum(count) FROM labels GROUP BY label"),
            ("the shards holding one label", "SELECT shard FROM labels WHERE label = 123"),
        ]
        rows = []
        for name, sql in queries:
            seconds, result = timed(lambda sql=sql: run(url, sql), 3)
            rows.append((name, seconds, result[1][:1]))
        assert rows[0][2][0][1] == SHARDS * PER_SHARD
        indexed = sorted(p.stem for p in (root / "samples").glob("*.parquet"))
        keys = [f"{indexed[i]}{(i * 2654435761) % PER_SHARD:04d}" for i in range(len(indexed))][:10]
        routed = [timed(lambda k=k: lookup(url, k), 3) for k in keys]
        assert all(len(r[1][1]) == 1 for r in routed)
        routed_s = statistics.median(r[0] for r in routed)
        scan_s, scan = timed(lambda: run(url, f"SELECT shard, row FROM samples WHERE key = '{keys[0]}'"), 3)
        assert len(scan[1]) == 1
    lines = [
        HEADING, "",
        f"_{datetime.date.today().isoformat()}, `python bench/query.py`. A synthetic manifest of "
        f"{SHARDS:,} shards x {PER_SHARD:,} samples ({SHARDS * PER_SHARD / 1e9:.0f} billion samples; "
        f"manifest.parquet {manifest_mb:.1f} MiB) and sample-index files for {INDEXED} of the shards. "
        f"Median of repeated runs; every time includes opening the manifest._", "",
        "| query | seconds | target |", "|---|---:|---|",
        *[f"| {name} | {s:.3f} | < 1 s: {'met' if s < 1 else 'NOT met'} |" for name, s, _ in rows],
        f"| key lookup, `tokshard lookup` (routed by key ranges; median of {len(keys)} keys) | {routed_s:.3f} | "
        f"< 0.2 s: {'met' if routed_s < 0.2 else 'NOT met'} |",
        f"| baseline: the same lookup as SQL over the {INDEXED} index files | {scan_s:.3f} | "
        f"(grows with the number of index files: {SHARDS:,} at full scale) |",
        "",
        f"The routed lookup is {scan_s / routed_s:.1f}x faster than scanning only {INDEXED} index files; "
        f"over all {SHARDS:,} files the scan would be ~{SHARDS // INDEXED:,}x slower still, while the routed "
        f"lookup still reads one file.", "",
    ]
    section = "\n".join(lines)
    publish(HEADING, section, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
