"""Token shard formats: one `ShardFormat` object per format writes a shard,
parses it and names its members.

- `base`: the contract, `EncodedSample` (what is written) and `ShardColumns` (what is read);
- `registry`: formats by name, and `parse_shard` / `parse_keys`, the one reading rule;
- `parquet`, `wds`: the built-in formats (they register on import).
"""

# Importing the built-in modules registers their classes, in import order.
from tokshard.pipeline.format.shards.base import EncodedSample, ShardColumns, ShardFormat
from tokshard.pipeline.format.shards.parquet import ParquetFormat
from tokshard.pipeline.format.shards.registry import SHARD_FORMATS, get_format, parse_keys, parse_shard, register_format
from tokshard.pipeline.format.shards.wds import WebDatasetFormat

FORMATS: tuple[str, ...] = tuple(SHARD_FORMATS)

__all__ = ["FORMATS", "SHARD_FORMATS", "EncodedSample", "ParquetFormat", "ShardColumns", "ShardFormat",
           "WebDatasetFormat", "get_format", "parse_keys", "parse_shard", "register_format"]
