"""Shard formats by name, and the one reading rule every format goes through."""

from __future__ import annotations

from collections.abc import Callable, Sequence, Sized
from typing import TypeVar

import numpy as np

from tokshard.errors import ShardError
from tokshard.pipeline.format.shards.base import EXTRA_COLUMNS, OPTIONAL_COLUMNS, ShardColumns, ShardFormat

SHARD_FORMATS: dict[str, ShardFormat] = {}
_Parsed = TypeVar("_Parsed", bound=Sized)


def register_format(cls: type[ShardFormat]) -> type[ShardFormat]:
    """Class decorator: make the format available under its `name`."""
    if cls.name in SHARD_FORMATS and type(SHARD_FORMATS[cls.name]) is not cls:
        raise ValueError(f"shard format {cls.name!r} is already registered")
    SHARD_FORMATS[cls.name] = cls()
    return cls


def get_format(name: str) -> ShardFormat:
    try:
        return SHARD_FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown shard format {name!r} (one of {', '.join(SHARD_FORMATS)})") from None


def parse_shard(data: bytes, *, shard: str, fmt: str, codec: str, n_tokens: int,
                dtype: np.dtype, samples: int, columns: Sequence[str] = (),
                rows: np.ndarray | None = None) -> ShardColumns:
    """Shard `shard`'s columns (`ShardFormat.parse`; `columns`: which of EXTRA_COLUMNS and
    OPTIONAL_COLUMNS too; `rows`: only those rows), held to the manifest's sample count."""
    unknown = [c for c in columns if c not in EXTRA_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise ValueError(f"unknown shard columns {unknown} (stored: {', '.join(EXTRA_COLUMNS + OPTIONAL_COLUMNS)})")
    if rows is not None:
        rows = np.asarray(rows, np.int64)
        if len(rows) and not (rows[0] >= 0 and rows[-1] < samples and bool(np.all(rows[1:] > rows[:-1]))):
            raise ValueError(f"rows must be sorted, unique row numbers below {samples}")
    return _held(lambda: get_format(fmt).parse(data, codec, n_tokens, dtype, tuple(columns), rows),
                 shard, fmt, samples)


def parse_keys(data: bytes, *, shard: str, fmt: str, codec: str, samples: int) -> list[str]:
    """Shard `shard`'s keys (`ShardFormat.keys`), held to the manifest's sample count."""
    return _held(lambda: get_format(fmt).keys(data, codec), shard, fmt, samples)


def _held(parse: Callable[[], _Parsed], shard: str, fmt: str, samples: int) -> _Parsed:
    """The one reading rule: any failure inside a parser is a ShardError naming the shard, and
    the shard holds exactly the samples the manifest says."""
    try:
        parsed = parse()
    except ShardError:
        raise
    except Exception as e:  # a damaged file can fail anywhere inside the parser
        raise ShardError(shard, f"unreadable {fmt} shard: {type(e).__name__}: {e}") from None
    held = parsed.rows_in_shard if isinstance(parsed, ShardColumns) else len(parsed)
    if held != samples:
        raise ShardError(shard, f"holds {held} samples, the manifest says {samples}")
    return parsed
