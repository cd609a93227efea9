"""`tokshard verify`: every shard the manifest lists exists, has its size and
its sha256, and has its sample-index file; the label table is readable;
`--repair` re-converts the shards that fail, from the sources, and rewrites
the label table with the manifest.

Repair re-runs the dataset's own job (its job spec) with the tokenizer
copy stored in the dataset, after forgetting the bad shards' receipts: the
convert job's exactly-once machinery redoes only those, and the manifest it
rewrites is byte-identical when the sources are unchanged.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

from tokshard.errors import ManifestError, UsageError
from tokshard.pipeline.format.layout import JOB_SPEC, DatasetLayout
from tokshard.pipeline.format.manifest import read_record
from tokshard.pipeline.format.work import forget_receipt, read_job_spec


@dataclass
class Problem:
    shard: str      # the shard it belongs to, or "-" for a dataset-wide file
    path: str
    unit: int       # -1 for a dataset-wide file: rewritten with the manifest
    what: str


def verify(url: str, storage_options: dict | None = None) -> tuple[int, list[Problem]]:
    """(shards checked, problems found)."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq
    layout = DatasetLayout.at(url, storage_options)
    fs = layout.fs
    table, record, _ = read_record(layout, url)
    problems = []
    rows = table.select(["shard", "path", "unit", "stored_bytes", "sha256"]).to_pylist()
    for row in rows:
        index = layout.index_rel(row["shard"])
        if not fs.exists(layout.resolve(index)):
            problems.append(Problem(row["shard"], index, row["unit"], "sample index missing"))
        path = layout.resolve(row["path"])
        try:
            size = fs.size(path)
        except FileNotFoundError:
            problems.append(Problem(row["shard"], row["path"], row["unit"], "missing"))
            continue
        if size != row["stored_bytes"]:
            problems.append(Problem(row["shard"], row["path"], row["unit"],
                                    f"{size} bytes, the manifest says {row['stored_bytes']}"))
            continue
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != row["sha256"]:
            problems.append(Problem(row["shard"], row["path"], row["unit"],
                                    f"sha256 {digest.hexdigest()[:16]}..., the manifest says {row['sha256'][:16]}..."))
    if record.labels:
        try:
            pq.read_table(pa.BufferReader(fs.cat_file(layout.resolve(record.labels))))
        except (FileNotFoundError, pa.ArrowInvalid) as e:
            problems.append(Problem("-", record.labels, -1, f"missing or unreadable ({type(e).__name__})"))
    return len(rows), problems


def repair(url: str, problems: list[Problem], storage_options: dict | None = None, quiet: bool = True) -> dict:
    """Re-convert the shards in `problems` from the dataset's sources."""
    from tokshard.pipeline.convert.job import ConvertConfig, convert
    layout = DatasetLayout.at(url, storage_options)
    fs = layout.fs
    try:
        found = read_job_spec(layout)
    except ManifestError:
        found = None
    if found is None:
        raise UsageError(f"{url} has no readable {JOB_SPEC}: cannot tell how it was converted")
    job = found[0].config
    _, record, _ = read_record(layout, url)
    for p in problems:
        # A shard's receipt goes with its files, so the job redoes the unit; a dataset-wide
        # file (the label table) is rewritten from the receipts with the manifest.
        if fs.exists(layout.resolve(p.path)):
            fs.rm_file(layout.resolve(p.path))
        if p.unit >= 0:
            forget_receipt(layout, p.shard)
    with tempfile.TemporaryDirectory(prefix="tokshard-repair-") as tmp:
        # The dataset's own tokenizer copy: same weights, so the same job hash.
        fs.get(layout.resolve(record.tokenizer.path) + "/", tmp + "/", recursive=True)
        cfg = ConvertConfig(**{**job, "out": url, "storage_options": storage_options,
                               "tokenizer_options": {**job.get("tokenizer_options", {}), "path": tmp}})
        return convert(cfg, quiet=quiet)
