"""The dataset manifest: one Parquet file whose rows are the shards and whose
key-value metadata is the dataset record (schema version, tokenizer, codec,
totals). Readers trust only the manifest. It is written last, atomically.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from tokshard.errors import ManifestError
from tokshard.pipeline.storage import atomic_write, filesystem, join
from tokshard.schemas.v1 import LABELS, METADATA_KEY, SCHEMA_VERSION, SHARDS, TIMINGS

MANIFEST = "manifest.parquet"
TIMINGS_FILE = "timings.parquet"   # run statistics: kept apart so manifests stay byte-identical
LABELS_FILE = "labels.parquet"     # per-shard label counts (schema 1.2)


def write_manifest(fs, root: str, rows: list[dict], dataset: dict) -> bytes:
    meta = {"schema_version": SCHEMA_VERSION, **dataset}
    table = pa.Table.from_pylist(rows, schema=SHARDS.with_metadata(
        {METADATA_KEY: json.dumps(meta, sort_keys=True).encode()}))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    atomic_write(fs, join(root, MANIFEST), data)
    return data


def write_labels(fs, root: str, receipts: list[dict]) -> None:
    """labels.parquet from the shards' receipts, in shard order then label order."""
    rows = [{"shard": r["shard"]["shard"], "label": label, "count": count}
            for r in receipts for label, count in r["labels"]]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=LABELS), buf, compression="zstd")
    atomic_write(fs, join(root, LABELS_FILE), buf.getvalue())


def write_timings(fs, root: str, rows: list[dict]) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=TIMINGS), buf)
    atomic_write(fs, join(root, TIMINGS_FILE), buf.getvalue())


def check_version(version: str, where: str) -> None:
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise ManifestError(f"{where}: malformed schema version {version!r}") from None
    supported = int(SCHEMA_VERSION.split(".")[0])
    if major > supported:
        raise ManifestError(f"{where}: manifest schema {version} is newer than this tokshard "
                            f"supports ({SCHEMA_VERSION}); upgrade tokshard")


def read_manifest(url: str, storage_options: dict | None = None) -> tuple[pa.Table, dict]:
    """(shards table, dataset record) of the dataset at `url`."""
    fs, root = filesystem(url, storage_options)
    path = join(root, MANIFEST)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ManifestError(f"no manifest at {url} (expected {MANIFEST}); is the convert finished?") from None
    try:
        # Never through a Python file object (io.BytesIO): pyarrow's thread pool can then
        # abort the interpreter at exit, up to 1 run in 4 here (apache/arrow#34314).
        table = pq.read_table(pa.BufferReader(data))
        meta = json.loads(table.schema.metadata[METADATA_KEY])
    except Exception as e:
        raise ManifestError(f"{url}/{MANIFEST} is not a tokshard manifest: {e}") from e
    check_version(meta.get("schema_version", "0"), f"{url}/{MANIFEST}")
    return table, meta
