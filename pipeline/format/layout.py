"""Where everything lives inside a dataset: the only code that builds a path in one.

    manifest.parquet            shards + dataset record (written last)
    labels.parquet              per-shard label counts (schema 1.2)
    timings.parquet             run statistics, kept apart so manifests stay byte-identical
    shards/NAME.EXT             token shards (EXT from the shard format)
    samples/NAME.parquet        per-shard sample index
    codec/state.bin             a fitted codec's state
    tokenizer/                  a copy of the tokenizer artifact
    text_tokenizer/tokenizer.json  a copy of the text tokenizer (--text-tokenizer)
    _work/job.json              what the destination was claimed for (JobSpec)
    _work/units/NAME.json       one receipt per committed unit

Relative names (what the manifest and receipts record) come from the
`*_rel` methods; absolute paths from the others. A relative path read back
from a record goes through `resolve`, the one place that turns data into a
path, and the one that keeps it inside the dataset: a dataset may come from
anyone (docs/security.md), so `..`, absolute paths, other schemes or buckets
and, on local disks, symlinks that leave the root are refused with a
`ManifestError` naming the field. The refusal never looks at, or describes,
what the path points to outside.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from tokshard.errors import ManifestError
from tokshard.pipeline.storage import filesystem, join

MANIFEST = "manifest.parquet"
LABELS = "labels.parquet"
TIMINGS = "timings.parquet"
SHARDS_DIR = "shards"
INDEX_DIR = "samples"
CODEC_STATE = "codec/state.bin"
TOKENIZER_DIR = "tokenizer"
TEXT_TOKENIZER = "text_tokenizer/tokenizer.json"
WORK_DIR = "_work"
JOB_SPEC = f"{WORK_DIR}/job.json"
RECEIPTS_DIR = f"{WORK_DIR}/units"
FIELDS_DIR = "fields"          # fields/NAME/: a token field's own dataset (tokshard add-tokens)


# Anything `resolve` could refuse contains one of these: an empty, "." or ".." part,
# a backslash, a colon, a NUL.
_SUSPICIOUS = r"\.\.|//|^/|/$|^\./|/\./|/\.$|^\.$|\\|:|\x00"


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
    def field_rel(name: str) -> str:
        """The root of token field `name`'s dataset, relative to this one."""
        return f"{FIELDS_DIR}/{name}"

    @staticmethod
    def index_rel(name: str) -> str:
        return f"{INDEX_DIR}/{name}.parquet"

    @staticmethod
    def index_rels(names: Any) -> Any:
        """`index_rel` of every name of an Arrow string column, in one vectorised pass (an
        Arrow array: `check_paths` takes it as it is)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        return pc.binary_join_element_wise(pa.scalar(f"{INDEX_DIR}/"), names, pa.scalar(".parquet"), "")

    @staticmethod
    def receipt_rel(name: str) -> str:
        return f"{RECEIPTS_DIR}/{name}.json"

    # -- absolute paths -------------------------------------------------------------
    def resolve(self, rel: Any, field: str = "path", *, follow_links: bool = True) -> str:
        """The dataset-relative path `rel` (from the layout, or read from a record's
        `field`) under the root; a ManifestError if it could leave the root.

        `follow_links=False` skips the symlink check (a lexical check only), for
        validating many paths at open without touching the disk."""
        if not isinstance(rel, str) or not rel:
            raise ManifestError(f"{field}: {rel!r:.80} is not a path inside the dataset")
        parts = rel.split("/")
        # An empty part is a leading "/" (absolute) or "//" (a scheme: s3://other-bucket);
        # "\\" and ":" are other systems' separators and drive or scheme markers.
        if any(p in ("", ".", "..") for p in parts) or "\\" in rel or ":" in parts[0] or "\0" in rel:
            raise ManifestError(f"{field}: {rel!r:.200} leaves the dataset root (only plain relative "
                                "paths inside it are allowed)")
        path = join(self.root, *parts)
        if follow_links and isinstance(self.fs, LocalFileSystem):
            root = os.path.realpath(self.root)
            real = os.path.realpath(path)
            if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
                raise ManifestError(f"{field}: {rel!r:.200} is a symbolic link (or under one) that "
                                    "leaves the dataset root")
        return path

    def check_paths(self, paths: Any, field: Callable[[int], str]) -> None:
        """`resolve(paths[i], field(i), follow_links=False)` for every i of a list or an Arrow
        column, in one vectorised pass: a manifest of 200,000 shards is checked in
        milliseconds, not seconds. The pass flags a superset of what `resolve` refuses;
        `resolve` judges (and words) each flagged one."""
        import pyarrow as pa
        import pyarrow.compute as pc
        column: Any
        if isinstance(paths, (pa.Array, pa.ChunkedArray)):
            column = paths if pa.types.is_string(paths.type) else None
            paths = paths.to_pylist() if column is None else paths
        else:
            try:
                column = pa.array(paths, pa.string())
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                column = None
        if column is None:
            flagged = [i for i, p in enumerate(paths) if not isinstance(p, str)]
        else:
            suspicious = pc.match_substring_regex(column, _SUSPICIOUS)
            suspicious = pc.or_kleene(pc.fill_null(suspicious, True), pc.equal(pc.utf8_length(column), 0))
            flagged = pc.indices_nonzero(pc.fill_null(suspicious, True)).to_pylist()
        for i in flagged:
            rel = paths[i]
            self.resolve(rel.as_py() if isinstance(rel, pa.Scalar) else rel, field(i), follow_links=False)

    def resolve_tree(self, rel: Any, field: str = "path") -> str:
        """`rel`, a folder (the tokenizer copy), resolved like `resolve`, and every entry
        under it too: a file inside it cannot be a link to one outside the root."""
        path = self.resolve(rel, field)
        if isinstance(self.fs, LocalFileSystem) and os.path.isdir(path):
            for folder, dirs, files in os.walk(path):
                for name in dirs + files:
                    sub = os.path.relpath(os.path.join(folder, name), path).replace(os.sep, "/")
                    self.resolve(f"{rel}/{sub}", f"{field} ({sub})")
        return path

    def removable(self, rel: Any, field: str = "path") -> str:
        """`rel` as a path that may be deleted: inside the root lexically, its folder inside
        the root on disk. The file itself may be a symlink: removing one removes the link,
        never what it points to."""
        path = self.resolve(rel, field, follow_links=False)
        parent = rel.rpartition("/")[0]
        if parent:
            self.resolve(parent, field)
        return path

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
    def text_tokenizer(self) -> str:
        return self.resolve(TEXT_TOKENIZER)

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
