"""Serialise a batch of encoded samples as a Parquet or WebDataset shard (bytes)."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokshard.schemas.v1 import SCHEMA_VERSION, shard_schema

FORMATS = ("parquet", "wds")
EXTENSIONS = {"parquet": "parquet", "wds": "tar"}


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


def _meta_json(meta: dict | None) -> str | None:
    return None if meta is None else json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)


def write_parquet(samples: list[EncodedSample], codec_name: str, grid: tuple[int, ...],
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


def token_member_ext(codec_name: str) -> str:
    return "tokens.npy" if codec_name == "raw" else f"tokens.{codec_name}"


def write_wds(samples: list[EncodedSample], codec_name: str, grid: tuple[int, ...],
              token_dtype: np.dtype, file_meta: dict) -> tuple[bytes, list[int]]:
    """Returns (tar bytes, byte offset of each sample's tokens member header)."""
    buf = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))

        for s in samples:
            offsets.append(buf.tell())
            if codec_name == "raw":
                npy = io.BytesIO()
                np.save(npy, s.tokens.reshape(grid).astype(token_dtype).astype(token_dtype.newbyteorder("<")),
                        allow_pickle=False)
                add(f"{s.key}.{token_member_ext(codec_name)}", npy.getvalue())
            else:
                add(f"{s.key}.{token_member_ext(codec_name)}", s.payload)
            info = {"width": s.width, "height": s.height, "source": s.source, "grid": list(grid),
                    "codec": codec_name, "meta": s.meta, **file_meta}
            add(f"{s.key}.json", json.dumps(info, sort_keys=True, ensure_ascii=False, default=str).encode())
            if s.caption is not None:
                add(f"{s.key}.txt", s.caption.encode())
            if s.label is not None:
                add(f"{s.key}.cls", str(s.label).encode())
    return buf.getvalue(), offsets


WRITERS = {"parquet": write_parquet, "wds": write_wds}
