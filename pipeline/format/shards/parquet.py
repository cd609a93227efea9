"""Parquet token shards: one row per sample; a raw-codec dataset is readable by
any Arrow/Parquet tool without tokshard."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokshard.pipeline.format.shards.base import EncodedSample, ShardColumns, ShardFormat, _meta_json
from tokshard.pipeline.format.shards.registry import register_format
from tokshard.pipeline.storage import read_parquet_bytes
from tokshard.schemas.v1 import SCHEMA_VERSION, shard_schema


@register_format
class ParquetFormat(ShardFormat):
    name: ClassVar[str] = "parquet"
    extension: ClassVar[str] = "parquet"

    def write(self, samples: list[EncodedSample], codec_name: str, grid: tuple[int, ...],
                      token_dtype: np.dtype, file_meta: dict) -> tuple[bytes, list[int]]:
        """Returns (file bytes, per-sample offsets (-1: rows are addressed by index))."""
        n_tokens = int(np.prod(grid))
        if codec_name == "raw":
            # Natively readable by any Arrow/Parquet tool, no tokshard needed.
            value_type = pa.uint16() if token_dtype == np.uint16 else pa.uint32()
            token_type = pa.list_(value_type, n_tokens)
            flat = np.concatenate([s.tokens.reshape(-1).astype(token_dtype) for s in samples]) \
                if samples else np.empty(0, token_dtype)
            tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), n_tokens)
        else:
            token_type = pa.binary()
            tokens = pa.array([s.payload for s in samples], type=pa.binary())
        schema = shard_schema(token_type).with_metadata({
            b"tokshard": json.dumps({"schema_version": SCHEMA_VERSION, **file_meta}, sort_keys=True).encode()})
        table = pa.Table.from_arrays([
            pa.array([s.key for s in samples], pa.string()),
            tokens,
            pa.array([s.caption for s in samples], pa.string()),
            pa.array([s.label for s in samples], pa.int64()),
            pa.array([s.width for s in samples], pa.int32()),
            pa.array([s.height for s in samples], pa.int32()),
            pa.array([s.source for s in samples], pa.string()),
            pa.array([_meta_json(s.meta) for s in samples], pa.string()),
        ], schema=schema)
        buf = io.BytesIO()
        # Coded payloads are already compact, so Parquet leaves them alone. The raw
        # column is stored the Parquet-native way (dictionary + zstd pages): uint16
        # has no 16-bit physical type and would otherwise cost 4 bytes a token.
        # Row groups of 1024 keep random access cheap.
        compression = {c: "zstd" for c in table.column_names if c != "tokens"}
        dictionary = ["source"]
        if codec_name == "raw":
            compression["tokens.list.element"] = "zstd"
            dictionary.append("tokens.list.element")
        else:
            compression["tokens"] = "none"
        pq.write_table(table, buf, compression=compression, row_group_size=1024,
                       use_dictionary=dictionary, write_statistics=["key", "label"])
        return buf.getvalue(), [-1] * len(samples)

    def keys(self, data: bytes, codec: str) -> list[str]:
        return read_parquet_bytes(data, columns=["key"]).column("key").to_pylist()

    def parse(self, data: bytes, codec: str, n_tokens: int, dtype: np.dtype,
              columns: Sequence[str] = (), rows: np.ndarray | None = None) -> ShardColumns:
        table = read_parquet_bytes(data, columns=["key", "tokens", "label", *columns])
        total = table.num_rows
        if rows is not None and not (len(rows) and rows[-1] >= total):   # (else the count check fails it)
            # In Arrow, before any row becomes a Python object: a loader worker pays the
            # conversion for its own rows only, not for the whole shard.
            table = table.take(pa.array(rows, pa.int64()))
        col = table.column("tokens").combine_chunks()
        if codec == "raw":
            if not pa.types.is_fixed_size_list(col.type) or col.type.list_size != n_tokens:
                raise ValueError(f"tokens column is {col.type}, expected fixed_size_list of {n_tokens}")
            if col.null_count:
                raise ValueError("null token rows")
            flat = col.values.to_numpy(zero_copy_only=False)
            if col.offset:
                flat = flat[col.offset * n_tokens:]
            tokens = flat[: len(col) * n_tokens].astype(dtype, copy=False).reshape(len(col), n_tokens)
        else:
            if not pa.types.is_binary(col.type) or col.null_count:
                raise ValueError(f"tokens column is {col.type} with {col.null_count} nulls, expected binary")
            tokens = col.to_numpy(zero_copy_only=False)
        label = table.column("label").fill_null(-1).to_numpy().astype(np.int64)
        out = ShardColumns(tokens=tokens, label=label, key=table.column("key").to_numpy(zero_copy_only=False))
        for name in columns:
            col = table.column(name)
            if name in ("width", "height"):
                out[name] = col.fill_null(-1).to_numpy().astype(np.int64)
            else:
                if not (pa.types.is_string(col.type) or pa.types.is_null(col.type)):
                    raise ValueError(f"{name} column is {col.type}, expected string")
                values = np.empty(len(col), dtype=object)
                values[:] = col.to_pylist()
                out[name] = values
        out.total = total
        return out
