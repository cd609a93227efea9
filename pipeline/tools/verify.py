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

import os
import tempfile
from dataclasses import dataclass

from tokshard.errors import ManifestError, UsageError
from tokshard.pipeline.format.layout import JOB_SPEC, DatasetLayout
from tokshard.pipeline.format.manifest import read_record
from tokshard.pipeline.format.work import forget_receipt, read_job_spec
from tokshard.pipeline.storage import read_parquet_bytes


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
    layout = DatasetLayout.at(url, storage_options)
    fs = layout.fs
    table, record, _ = read_record(layout, url)
    problems = []
    rows = table.select(["shard", "path", "unit", "stored_bytes", "sha256"]).to_pylist()
    for row in rows:
        index = layout.index_rel(row["shard"])
        try:
            if not fs.exists(layout.resolve(index, f"manifest shard {row['shard']!r:.40}: name")):
                problems.append(Problem(row["shard"], index, row["unit"], "sample index missing"))
            path = layout.resolve(row["path"], f"manifest shard {row['shard']!r:.40}: path")
        except ManifestError as e:
            # Never followed, never described: the re-convert writes the shard where it belongs.
            problems.append(Problem(row["shard"], str(row["path"]), row["unit"], str(e)))
            continue
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
            read_parquet_bytes(fs.cat_file(layout.resolve(record.labels, "record.labels")))
        except ManifestError as e:
            problems.append(Problem("-", record.labels, -1, str(e)))
        except (FileNotFoundError, pa.ArrowInvalid) as e:
            problems.append(Problem("-", record.labels, -1, f"missing or unreadable ({type(e).__name__})"))
    return len(rows), problems


def repair(url: str, problems: list[Problem], storage_options: dict | None = None, quiet: bool = True,
           trust_tokenizer_code: bool = False) -> dict:
    """Re-convert the shards in `problems` from the dataset's sources, with the dataset's
    tokenizer copy (one whose format runs code only with `trust_tokenizer_code`)."""
    from tokshard.pipeline.convert.job import ConvertConfig, convert
    from tokshard.pipeline.stream.dataset import check_tokenizer_trust
    from tokshard.tokenizers.registry import tokenizer_class
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
    check_tokenizer_trust(tokenizer_class(record.tokenizer.name), url, trust_tokenizer_code)
    tokenizer_dir = layout.resolve_tree(record.tokenizer.path, "record.tokenizer.path")
    for p in problems:
        # A shard's receipt goes with its files, so the job redoes the unit; a dataset-wide
        # file (the label table) is rewritten from the receipts with the manifest. A path that
        # leaves the root is not touched: the re-convert writes the shard where it belongs.
        try:
            path = layout.removable(p.path)
        except ManifestError:
            path = None
        if path is not None and (fs.exists(path) or os.path.islink(path)):
            fs.rm_file(path)
        if p.unit >= 0:
            try:
                forget_receipt(layout, p.shard)
            except ManifestError:
                pass                # a shard name that leaves the root has no receipt of ours
    with tempfile.TemporaryDirectory(prefix="tokshard-repair-") as tmp:
        # The dataset's own tokenizer copy: same weights, so the same job hash.
        fs.get(tokenizer_dir + "/", tmp + "/", recursive=True)
        cfg = ConvertConfig(**{**job, "out": url, "storage_options": storage_options,
                               "tokenizer_options": {**job.get("tokenizer_options", {}), "path": tmp}})
        return convert(cfg, quiet=quiet)
