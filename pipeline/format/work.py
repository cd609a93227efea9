"""A convert's working state inside the dataset (`_work/`): the job spec that
claims the destination, and one receipt per committed unit.

A receipt is written last for its unit, so its presence means the unit's shard
and sample index are whole; a re-run reuses a unit whose receipt matches the
job and whose shard still has the size the receipt records.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pyarrow as pa

from tokshard.errors import ManifestError
from tokshard.pipeline.format.layout import JOB_SPEC, DatasetLayout
from tokshard.pipeline.storage import atomic_write, read_parquet_bytes
from tokshard.schemas.records import FileDigest, JobSpec, Receipt


def read_job_spec(layout: DatasetLayout) -> tuple[JobSpec, str] | None:
    """(spec, job hash) of the job that claimed the destination; None if unclaimed.
    A spec that is not a valid record is a ManifestError."""
    try:
        data = layout.fs.cat_file(layout.job_spec)
    except FileNotFoundError:
        return None
    return JobSpec.from_json(data, JOB_SPEC)


def write_job_spec(layout: DatasetLayout, spec: JobSpec, job_hash: str) -> None:
    atomic_write(layout.fs, layout.job_spec, spec.to_json(job_hash))


def write_receipt(layout: DatasetLayout, receipt: Receipt) -> None:
    atomic_write(layout.fs, layout.receipt(receipt.shard.shard), receipt.to_json())


def forget_receipt(layout: DatasetLayout, name: str) -> None:
    """Make shard `name`'s unit uncommitted, so the next run redoes it."""
    path = layout.receipt(name)
    if layout.fs.exists(path):
        layout.fs.rm_file(path)


def read_receipt(layout: DatasetLayout, name: str, unit_hash: str) -> Receipt | None:
    """Shard `name`'s receipt if its unit is committed for this job (`unit_hash`) and
    its shard is intact; None means: redo the unit."""
    try:
        receipt = Receipt.from_json(layout.fs.cat_file(layout.receipt(name)), layout.receipt_rel(name))
    except (FileNotFoundError, ManifestError):
        return None
    if receipt.unit_hash != unit_hash:
        return None
    try:
        shard = layout.resolve(receipt.shard.path, f"receipt {name}: shard.path")
    except ManifestError:
        return None                 # a receipt that points outside the dataset is no receipt
    if not layout.fs.exists(shard) or layout.fs.size(shard) != receipt.shard.stored_bytes:
        return None
    if receipt.labels is None or receipt.shard.index is None:
        # Committed before schema 1.2 (labels) or 1.3 (the index file's digest): complete the
        # receipt from the shard's index, which the receipt's presence says is whole.
        try:
            data = layout.fs.cat_file(layout.index(receipt.shard.shard))
            index = read_parquet_bytes(data, columns=["label"])
        except (FileNotFoundError, pa.ArrowInvalid):
            return None             # no readable index: redo the unit
        if receipt.labels is None:
            receipt.labels = sorted(Counter(v for v in index.column("label").to_pylist() if v is not None).items())
        if receipt.shard.index is None:
            digest = FileDigest.of(data)
            receipt.shard = replace(receipt.shard, index_bytes=digest.size, index_sha256=digest.sha256)
    return receipt
