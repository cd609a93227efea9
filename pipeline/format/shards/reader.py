"""Parse one token shard (Parquet or WebDataset tar) into per-sample columns.

Reading trusts nothing in the file beyond what the manifest promises: the
sample count must match and every token member must have the manifest's
shape; anything else is a `ShardError` naming the shard. Tar members are read
as bytes and numpy arrays are loaded with `allow_pickle=False`: shard content
is never unpickled.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokshard.errors import ShardError


class ShardColumns(dict):
    """{"tokens": (n, T) array of token ids, or an object array of coded payloads;
    "label": int64 (-1 unlabelled); "key": object array of str}."""

    def __len__(self) -> int:  # number of samples, not of columns
        return len(self["key"])


def parse_shard(data: bytes, *, shard: str, fmt: str, codec: str, n_tokens: int,
                dtype: np.dtype, samples: int) -> ShardColumns:
    try:
        cols = _parse_parquet(data, codec, n_tokens, dtype) if fmt == "parquet" else \
            _parse_tar(data, codec, n_tokens, dtype)
    except ShardError:
        raise
    except Exception as e:  # a damaged file can fail anywhere inside the parser
        raise ShardError(shard, f"unreadable {fmt} shard: {type(e).__name__}: {e}") from None
    if len(cols) != samples:
        raise ShardError(shard, f"holds {len(cols)} samples, the manifest says {samples}")
    return cols


def _labels(values) -> np.ndarray:
    return np.array([-1 if v is None else int(v) for v in values], dtype=np.int64)


def _parse_parquet(data: bytes, codec: str, n_tokens: int, dtype: np.dtype) -> ShardColumns:
    table = pq.read_table(pa.BufferReader(data), columns=["key", "tokens", "label"])
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
    return ShardColumns(tokens=tokens, label=label,
                        key=table.column("key").to_numpy(zero_copy_only=False))


def _parse_tar(data: bytes, codec: str, n_tokens: int, dtype: np.dtype) -> ShardColumns:
    ext = "tokens.npy" if codec == "raw" else f"tokens.{codec}"
    keys, tokens, labels = [], [], {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, suffix = member.name.partition(".")
            if suffix == ext:
                raw = tar.extractfile(member).read()
                if codec == "raw":
                    arr = np.load(io.BytesIO(raw), allow_pickle=False)
                    if arr.size != n_tokens or arr.dtype.kind != "u":
                        raise ValueError(f"member {member.name}: {arr.dtype}{arr.shape}, "
                                         f"expected {n_tokens} unsigned tokens")
                    tokens.append(arr.reshape(-1).astype(dtype))
                else:
                    tokens.append(raw)
                keys.append(key)
            elif suffix == "cls":
                labels[key] = int(tar.extractfile(member).read().decode().strip())
    if codec == "raw":
        arr = np.stack(tokens) if tokens else np.empty((0, n_tokens), dtype)
    else:
        arr = np.empty(len(tokens), dtype=object)
        arr[:] = tokens
    return ShardColumns(tokens=arr, label=_labels(labels.get(k) for k in keys),
                        key=np.array(keys, dtype=object))
