"""Shard formats by name, and the one reading rule every format goes through."""

from __future__ import annotations

import numpy as np

from tokshard.errors import ShardError
from tokshard.pipeline.format.shards.base import ShardColumns, ShardFormat

SHARD_FORMATS: dict[str, ShardFormat] = {}


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
                dtype: np.dtype, samples: int) -> ShardColumns:
    try:
        cols = get_format(fmt).parse(data, codec, n_tokens, dtype)
    except ShardError:
        raise
    except Exception as e:  # a damaged file can fail anywhere inside the parser
        raise ShardError(shard, f"unreadable {fmt} shard: {type(e).__name__}: {e}") from None
    if len(cols) != samples:
        raise ShardError(shard, f"holds {len(cols)} samples, the manifest says {samples}")
    return cols
