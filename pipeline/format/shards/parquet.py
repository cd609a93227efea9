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
from tokshard.schemas.v1 import SCHEMA_VERSION, TEXT_TOKENS_TYPE, shard_schema


@register_format
class ParquetFormat(ShardFormat):
    name: ClassVar[str] = "parquet"
    extension: ClassVar[str] = "parquet"

    def write(self, samples: list[EncodedSample], codec_name: str, grid: tuple[int, ...],
              token_dtype: np.dtype, file_meta: dict, *, text_tokens: bool = False,
              variable_grid: bool = False) -> tuple[bytes, list[int]]:
        """Returns (file bytes, per-sample offsets (-1: rows are addressed by index))."""
        n_tokens = int(np.prod(grid))
        if codec_name == "raw" and variable_grid:
            # A list per sample (its own grid's length), still natively readable.
            value_type = pa.uint16() if token_dtype == np.uint16 else pa.uint32()
            token_type = pa.list_(value_type)
            tokens = _id_lists([s.tokens.reshape(-1) for s in samples], token_dtype, value_type)
        elif codec_name == "raw":
            # Natively readable by any Arrow/Parquet tool, no tokshard needed.
            value_type = pa.uint16() if token_dtype == np.uint16 else pa.uint32()
            token_type = pa.list_(value_type, n_tokens)
            flat = np.concatenate([s.tokens.reshape(-1).astype(token_dtype) for s in samples]) \
                if samples else np.empty(0, token_dtype)
            tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), n_tokens)
        else:
            token_type = pa.binary()
            tokens = pa.array([s.payload for s in samples], type=pa.binary())
        schema = shard_schema(token_type, text_tokens, variable_grid).with_metadata({
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
            *([_text_tokens_array(samples)] if text_tokens else []),
            *([pa.array([s.tokens.shape[0] for s in samples], pa.int32()),
               pa.array([s.tokens.shape[1] for s in samples], pa.int32())] if variable_grid else []),
        ], schema=schema)
        buf = io.BytesIO()
        # Coded payloads are already compact, so Parquet leaves them alone. The raw
        # column is stored the Parquet-native way (dictionary + zstd pages): uint16
        # has no 16-bit physical type and would otherwise cost 4 bytes a token.
        # Row groups of 1024 keep random access cheap.
        compression = {c: "zstd" for c in table.column_names if c not in ("tokens", "text_tokens")}
        if text_tokens:
            # Plain INT32 pages under zstd: on Zipf-distributed ids of 32k-256k vocabularies,
            # as small as dictionary encoding (~1.6-1.9 B/id), with nothing to tune.
            compression["text_tokens.list.element"] = "zstd"
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
        variable = n_tokens == 0
        table = read_parquet_bytes(data, columns=["key", "tokens", "label", *columns,
                                                  *(("grid_h", "grid_w") if variable else ())])
        total = table.num_rows
        if rows is not None and not (len(rows) and rows[-1] >= total):   # (else the count check fails it)
            # In Arrow, before any row becomes a Python object: a loader worker pays the
            # conversion for its own rows only, not for the whole shard.
            table = table.take(pa.array(rows, pa.int64()))
        col = table.column("tokens").combine_chunks()
        grid = _grid_columns(table) if variable else None
        if codec == "raw" and variable:
            assert grid is not None
            if not pa.types.is_list(col.type) or not pa.types.is_unsigned_integer(col.type.value_type):
                raise ValueError(f"tokens column is {col.type}, expected a list of unsigned ids")
            if col.null_count:
                raise ValueError("null token rows")
            if not np.array_equal(np.diff(col.offsets.to_numpy()), grid[:, 0] * grid[:, 1]):
                raise ValueError("a row's token count is not its grid's size")
            tokens = _list_arrays(col, dtype)
        elif codec == "raw":
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
        if grid is not None:
            out["grid"] = grid
        for name in columns:
            col = table.column(name)
            if name == "text_tokens":
                out[name] = _text_tokens_column(col)
            elif name in ("width", "height"):
                out[name] = col.fill_null(-1).to_numpy().astype(np.int64)
            else:
                if not (pa.types.is_string(col.type) or pa.types.is_null(col.type)):
                    raise ValueError(f"{name} column is {col.type}, expected string")
                values = np.empty(len(col), dtype=object)
                values[:] = col.to_pylist()
                out[name] = values
        out.total = total
        return out


def _text_tokens_array(samples: list[EncodedSample]) -> pa.ListArray:
    """The samples' text token ids as one list<uint32> array, built from one flat buffer."""
    ids = [s.text_tokens if s.text_tokens is not None else np.empty(0, np.uint32) for s in samples]
    return _id_lists(ids, np.dtype(np.uint32), TEXT_TOKENS_TYPE.value_type)


def _id_lists(ids: list[np.ndarray], dtype: np.dtype, value_type: pa.DataType) -> pa.ListArray:
    """Arrays of ids as one list<value_type> array, built from one flat buffer."""
    offsets = np.zeros(len(ids) + 1, np.int32)
    np.cumsum([len(a) for a in ids], out=offsets[1:])
    flat = np.concatenate(ids).astype(dtype, copy=False) if ids else np.empty(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, value_type),
                                    type=pa.list_(value_type))


def _grid_columns(table: pa.Table) -> np.ndarray:
    """A variable-grid shard's grid_h and grid_w columns as one (n, 2) int64 array."""
    out = []
    for name in ("grid_h", "grid_w"):
        col = table.column(name)
        if not pa.types.is_integer(col.type) or col.null_count:
            raise ValueError(f"{name} column is {col.type} with {col.null_count} nulls, expected int32")
        out.append(col.to_numpy().astype(np.int64))
    return np.stack(out, axis=1) if out[0].size else np.empty((0, 2), np.int64)


def _text_tokens_column(col: pa.ChunkedArray) -> np.ndarray:
    """A text_tokens column as an object array of 1-D uint32 arrays (views of one buffer)."""
    col = col.combine_chunks()
    if not (pa.types.is_list(col.type) and pa.types.is_uint32(col.type.value_type)):
        raise ValueError(f"text_tokens column is {col.type}, expected {TEXT_TOKENS_TYPE}")
    if col.null_count:
        raise ValueError("null text_tokens rows")
    return _list_arrays(col)


def _list_arrays(col: pa.ListArray, dtype: np.dtype | None = None) -> np.ndarray:
    """A list column (checked by the caller) as an object array of 1-D arrays: views of one
    buffer (of `dtype`, if given)."""
    offsets = col.offsets.to_numpy()
    # `values` is the whole child array (a sliced or taken column starts past 0): cut at the offsets.
    flat = col.values.to_numpy(zero_copy_only=False)
    if dtype is not None:
        flat = flat.astype(dtype, copy=False)
    out = np.empty(len(col), dtype=object)
    for i in range(len(col)):   # (one by one: numpy would make equal-length lists one 2-D array)
        out[i] = flat[offsets[i]:offsets[i + 1]]
    return out
