"""Where everything lives inside a dataset: the only code that builds a path in one.

    manifest.parquet            shards + dataset record (written last)
    labels.parquet              per-shard label counts (schema 1.2)
    timings.parquet             run statistics, kept apart so manifests stay byte-identical
    shards/NAME.EXT             token shards (EXT from the shard format)
    samples/NAME.parquet        per-shard sample index
    codec/state.bin             a fitted codec's state
    tokenizer/                  a copy of the tokenizer artifact
    _work/job.json              what the destination was claimed for (JobSpec)
    _work/units/NAME.json       one receipt per committed unit

Relative names (what the manifest and receipts record) come from the
`*_rel` methods; absolute paths from the others. A relative path read back
from a record goes through `resolve`, the one place that turns data into a
path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokshard.pipeline.storage import filesystem, join

MANIFEST = "manifest.parquet"
LABELS = "labels.parquet"
TIMINGS = "timings.parquet"
SHARDS_DIR = "shards"
INDEX_DIR = "samples"
CODEC_STATE = "codec/state.bin"
TOKENIZER_DIR = "tokenizer"
WORK_DIR = "_work"
JOB_SPEC = f"{WORK_DIR}/job.json"
RECEIPTS_DIR = f"{WORK_DIR}/units"


def shard_name(unit_index: int) -> str:
    """A shard's name: its unit's index, zero-padded so names sort as units do."""
    return f"{unit_index:06d}"


@dataclass
class DatasetLayout:
    """The paths of one dataset at `root` on filesystem `fs` (fsspec)."""
    fs: Any
    root: str

    @classmethod
    def at(cls, url: str, storage_options: dict | None = None) -> DatasetLayout:
        fs, root = filesystem(url, storage_options)
        return cls(fs, root)

    # -- relative names, as records store them ------------------------------------
    @staticmethod
    def shard_rel(name: str, extension: str) -> str:
        return f"{SHARDS_DIR}/{name}.{extension}"

    @staticmethod
    def index_rel(name: str) -> str:
        return f"{INDEX_DIR}/{name}.parquet"

    @staticmethod
    def receipt_rel(name: str) -> str:
        return f"{RECEIPTS_DIR}/{name}.json"

    # -- absolute paths -------------------------------------------------------------
    def resolve(self, rel: str) -> str:
        """A dataset-relative path (from the layout or read from a record) under the root."""
        return join(self.root, *rel.split("/"))

    @property
    def manifest(self) -> str:
        return self.resolve(MANIFEST)

    @property
    def labels(self) -> str:
        return self.resolve(LABELS)

    @property
    def timings(self) -> str:
        return self.resolve(TIMINGS)

    @property
    def codec_state(self) -> str:
        return self.resolve(CODEC_STATE)

    @property
    def tokenizer_dir(self) -> str:
        return self.resolve(TOKENIZER_DIR)

    @property
    def job_spec(self) -> str:
        return self.resolve(JOB_SPEC)

    def shard(self, name: str, extension: str) -> str:
        return self.resolve(self.shard_rel(name, extension))

    def index(self, name: str) -> str:
        return self.resolve(self.index_rel(name))

    def index_glob(self) -> str:
        """Every sample-index file, as a glob (DuckDB's read_parquet takes it)."""
        return self.resolve(f"{INDEX_DIR}/*.parquet")

    def receipt(self, name: str) -> str:
        return self.resolve(self.receipt_rel(name))

    def tokenizer_file(self, rel: str) -> str:
        """A file of the tokenizer copy (`rel`: a path inside the artifact)."""
        return self.resolve(f"{TOKENIZER_DIR}/{rel}")
