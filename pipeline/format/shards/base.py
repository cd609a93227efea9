"""The shard-format contract: one object per on-disk format writes a shard,
parses it back and names its members, so adding a format is one module.

Reading trusts nothing in the file beyond what the manifest promises (see
`registry.parse_shard`): the sample count must match and every token member
must have the manifest's shape.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass
class EncodedSample:
    key: str
    payload: bytes          # codec output for the tokens
    tokens: np.ndarray      # the codes (for the raw fixed-size Parquet column)
    caption: str | None
    label: int | None
    width: int
    height: int
    source: str
    meta: dict | None
    text_tokens: np.ndarray | None = None   # the caption's text token ids (uint32), with a text tokenizer



# The columns a shard stores besides key, tokens and label, which a reader asks for by name
# (`ShardFormat.parse(..., columns=...)`): caption, source and meta (JSON text) as object
# arrays (None where absent), width and height as int64 arrays.
EXTRA_COLUMNS = ("caption", "width", "height", "source", "meta")
# Columns only the shards of some datasets store, asked for by name like EXTRA_COLUMNS:
# text_tokens (a dataset converted with --text-tokenizer), an object array of 1-D uint32 id
# arrays (empty for a sample without a caption).
OPTIONAL_COLUMNS = ("text_tokens",)


def pad_text_tokens(ids: Sequence[np.ndarray] | np.ndarray, pad: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(an (n, longest) int64 matrix of the id arrays `ids`, padded with `pad`; their (n,) int64
    lengths): a batch's text tokens as one array (ids are never negative, so -1 marks padding)."""
    lengths = np.fromiter((len(a) for a in ids), np.int64, count=len(ids))
    out = np.full((len(ids), int(lengths.max(initial=0))), pad, np.int64)
    for row, a in enumerate(ids):
        out[row, : len(a)] = a
    return out, lengths


class ShardColumns(dict):
    """{"tokens": (n, T) array of token ids, or an object array of coded payloads;
    "label": int64 (-1 unlabelled); "key": object array of str; and the EXTRA_COLUMNS
    asked for}. Parsed with `rows`, only those rows; `total` then says how many the shard holds."""

    total: int | None = None

    def __len__(self) -> int:  # number of samples, not of columns
        return len(self["key"])

    @property
    def rows_in_shard(self) -> int:
        return len(self) if self.total is None else self.total

    def take(self, rows: np.ndarray | None) -> ShardColumns:
        """These rows of every column, `total` kept. All of them when `rows` is None, or names
        a row the shard does not hold: parse_shard's count check then fails it, as it should
        (rows are below the manifest's count)."""
        if rows is None or (len(rows) and rows[-1] >= len(self)):
            return self
        out = ShardColumns({c: v[rows] for c, v in self.items()})
        out.total = self.rows_in_shard
        return out


def _meta_json(meta: dict | None) -> str | None:
    return None if meta is None else json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)


def parse_meta(texts: Sequence[str | None] | np.ndarray, shard: str,
               rows: Sequence[int] | np.ndarray | None = None) -> list:
    """Stored metadata (`_meta_json`'s JSON text, None where a sample has none) back to
    dicts; text that does not parse is a ShardError naming the shard and the row (`rows`:
    the rows the texts are, when not 0, 1, ...)."""
    try:
        return [None if t is None else json.loads(t) for t in texts]
    except (ValueError, RecursionError) as e:
        error = e
    for i, t in enumerate(texts):
        try:
            None if t is None else json.loads(t)
        except (ValueError, RecursionError):
            row = i if rows is None else int(rows[i])
            break
    from tokshard.errors import ShardError
    raise ShardError(shard, f"row {row}: its metadata is not JSON: {type(error).__name__}: {error}"[:300])


def _labels(values: Iterable[int | None]) -> np.ndarray:
    return np.array([-1 if v is None else int(v) for v in values], dtype=np.int64)



class ShardFormat(abc.ABC):
    """How one format stores a shard of encoded samples."""

    name: ClassVar[str]         # as recorded in the manifest ("parquet", "wds")
    extension: ClassVar[str]    # of the shard file

    @abc.abstractmethod
    def write(self, samples: list[EncodedSample], codec_name: str, grid: tuple[int, ...],
              token_dtype: np.dtype, file_meta: dict, *, text_tokens: bool = False,
              variable_grid: bool = False) -> tuple[bytes, list[int]]:
        """(file bytes, per-sample byte offset of the tokens in the file; -1 where rows are
        addressed by index). `text_tokens`: store each sample's text_tokens too (the dataset
        has a text tokenizer; said once, so a shard of no samples has the column as well).
        `variable_grid`: each sample's tokens are its own (h, w) grid (`grid` is then ()),
        stored with the sample."""

    @abc.abstractmethod
    def parse(self, data: bytes, codec: str, n_tokens: int, dtype: np.dtype,
              columns: Sequence[str] = (), rows: np.ndarray | None = None) -> ShardColumns:
        """The shard's key, label and tokens columns (`n_tokens` 0: a variable-grid dataset's, whose
        samples hold their own grids: "grid" is then an (n, 2) int64 column of them, and raw tokens an
        object array of 1-D arrays), and the EXTRA_COLUMNS and OPTIONAL_COLUMNS named in `columns`;
        with `rows` (sorted, unique row numbers), only those rows, `total` set to the shard's
        row count (a loader worker converts only the rows it delivers); any exception means a
        damaged file."""

    @abc.abstractmethod
    def keys(self, data: bytes, codec: str) -> list[str]:
        """The shard's sample keys in order, without its tokens (what an index row is checked
        against); any exception means a damaged file."""
