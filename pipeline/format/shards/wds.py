"""WebDataset token shards: a tar with KEY.tokens.CODEC (or KEY.tokens.npy for
raw), KEY.json, KEY.txt and KEY.cls members (and KEY.text_tokens.npy with a text
tokenizer), readable by `webdataset` itself."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from tokshard.pipeline.format.shards.base import EncodedSample, ShardColumns, ShardFormat, _labels, _meta_json
from tokshard.pipeline.format.shards.registry import register_format

# numpy reads a .npy header with ast.literal_eval; CPython 3.11 keeps the AST converter's
# recursion depth per interpreter, not per thread, so two threads parsing headers at once
# (the loader's prefetch thread and its reader) can fail with "SystemError: AST constructor
# recursion depth mismatch". One header at a time.
_NPY_LOCK = threading.Lock()
# A sample's text token ids: a 1-D little-endian uint32 .npy (webdataset decodes it by its
# extension), in every sample of a dataset with a text tokenizer (empty without a caption).
# Every member of a tar takes whole 512-byte blocks, so a narrower type would rarely save any.
TEXT_TOKENS_MEMBER = "text_tokens.npy"


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _load_npy(raw: bytes) -> np.ndarray:
    with _NPY_LOCK:
        return np.load(io.BytesIO(raw), allow_pickle=False)


@register_format
class WebDatasetFormat(ShardFormat):
    name: ClassVar[str] = "wds"
    extension: ClassVar[str] = "tar"

    @staticmethod
    def token_member(codec_name: str) -> str:
        """The extension of a sample's tokens member."""
        return "tokens.npy" if codec_name == "raw" else f"tokens.{codec_name}"

    def write(self, samples: list[EncodedSample], codec_name: str, grid: tuple[int, ...],
              token_dtype: np.dtype, file_meta: dict, *, text_tokens: bool = False,
              variable_grid: bool = False) -> tuple[bytes, list[int]]:
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
                shape = tuple(s.tokens.shape) if variable_grid else grid   # (a variable grid: the sample's own)
                if codec_name == "raw":
                    npy = io.BytesIO()
                    np.save(npy, s.tokens.reshape(shape).astype(token_dtype).astype(token_dtype.newbyteorder("<")),
                            allow_pickle=False)
                    add(f"{s.key}.{self.token_member(codec_name)}", npy.getvalue())
                else:
                    add(f"{s.key}.{self.token_member(codec_name)}", s.payload)
                info = {"width": s.width, "height": s.height, "source": s.source, "grid": list(shape),
                        "codec": codec_name, "meta": s.meta, **file_meta}
                add(f"{s.key}.json", json.dumps(info, sort_keys=True, ensure_ascii=False, default=str).encode())
                if s.caption is not None:
                    add(f"{s.key}.txt", s.caption.encode())
                if s.label is not None:
                    add(f"{s.key}.cls", str(s.label).encode())
                if text_tokens:
                    ids = s.text_tokens if s.text_tokens is not None else np.empty(0)
                    add(f"{s.key}.{TEXT_TOKENS_MEMBER}", _npy(ids.astype("<u4")))
        return buf.getvalue(), offsets

    def keys(self, data: bytes, codec: str) -> list[str]:
        ext = self.token_member(codec)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            return [key for member in tar if member.isfile()
                    for key, _, suffix in [member.name.partition(".")] if suffix == ext]

    def parse(self, data: bytes, codec: str, n_tokens: int, dtype: np.dtype,
              columns: Sequence[str] = (), rows: np.ndarray | None = None) -> ShardColumns:
        ext = self.token_member(codec)
        keys, labels = [], {}
        tokens: list[np.ndarray | bytes] = []   # id rows (raw) or coded payloads
        captions: dict[str, str] = {}
        text: dict[str, np.ndarray] = {}
        infos: dict[str, dict] = {}
        variable = n_tokens == 0     # a variable-grid dataset: each sample's grid is in its JSON
        want_info = variable or any(c not in ("caption", "text_tokens") for c in columns)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, suffix = member.name.partition(".")
                if suffix == ext:
                    fobj = tar.extractfile(member)
                    assert fobj is not None   # a regular file (isfile() above) always has one
                    raw = fobj.read()
                    if codec == "raw" and variable:
                        arr = _load_npy(raw)
                        if arr.ndim != 2 or arr.dtype.kind != "u":
                            raise ValueError(f"member {member.name}: {arr.dtype}{arr.shape}, "
                                             "expected a 2-D grid of unsigned tokens")
                        tokens.append(arr)
                    elif codec == "raw":
                        arr = _load_npy(raw)
                        if arr.size != n_tokens or arr.dtype.kind != "u":
                            raise ValueError(f"member {member.name}: {arr.dtype}{arr.shape}, "
                                             f"expected {n_tokens} unsigned tokens")
                        tokens.append(arr.reshape(-1).astype(dtype))
                    else:
                        tokens.append(raw)
                    keys.append(key)
                elif suffix == "cls":
                    fobj = tar.extractfile(member)
                    assert fobj is not None
                    labels[key] = int(fobj.read().decode().strip())
                elif suffix == TEXT_TOKENS_MEMBER and "text_tokens" in columns:
                    fobj = tar.extractfile(member)
                    assert fobj is not None
                    text[key] = _text_ids(_load_npy(fobj.read()), member.name)
                elif suffix == "txt" and "caption" in columns:
                    fobj = tar.extractfile(member)
                    assert fobj is not None
                    captions[key] = fobj.read().decode()
                elif suffix == "json" and want_info:
                    fobj = tar.extractfile(member)
                    assert fobj is not None
                    info = json.loads(fobj.read())
                    if not isinstance(info, dict):
                        raise ValueError(f"member {member.name} is not a JSON object")
                    infos[key] = info
        grid = _grids(infos, keys) if variable else None
        if codec == "raw" and variable:
            assert grid is not None
            arr = np.empty(len(tokens), dtype=object)
            for i, t in enumerate(tokens):
                if not isinstance(t, np.ndarray) or t.shape != tuple(grid[i]):
                    raise ValueError(f"sample {keys[i]!r:.60}: tokens of shape {np.shape(t)}, its JSON says "
                                     f"grid {grid[i].tolist()}")
                arr[i] = t.reshape(-1).astype(dtype)
        elif codec == "raw":
            arr = np.stack(tokens) if tokens else np.empty((0, n_tokens), dtype)
        else:
            arr = np.empty(len(tokens), dtype=object)
            arr[:] = tokens
        out = ShardColumns(tokens=arr, label=_labels(labels.get(k) for k in keys), key=np.array(keys, dtype=object))
        if grid is not None:
            out["grid"] = grid
        for name in columns:
            if name in ("width", "height"):
                out[name] = np.array([int(infos.get(k, {}).get(name, -1)) for k in keys], dtype=np.int64)
                continue
            values = np.empty(len(keys), dtype=object)
            if name == "text_tokens":
                missing = [k for k in keys if k not in text]
                if missing:
                    raise ValueError(f"sample {missing[0]!r:.60} has no {TEXT_TOKENS_MEMBER} member")
                for i, k in enumerate(keys):     # (one by one: equal lengths would make one 2-D array)
                    values[i] = text[k]
            elif name == "caption":
                values[:] = [captions.get(k) for k in keys]
            elif name == "meta":   # as Parquet stores it: the JSON text
                values[:] = [None if infos.get(k, {}).get("meta") is None else _meta_json(infos[k]["meta"])
                             for k in keys]
            else:
                values[:] = [infos.get(k, {}).get(name) for k in keys]
            out[name] = values
        return out.take(rows)   # a tar is read whole anyway


def _grids(infos: dict[str, dict], keys: list[str]) -> np.ndarray:
    """Each sample's grid from its JSON member ([h, w], positive ints) as an (n, 2) int64 array."""
    out = np.empty((len(keys), 2), np.int64)
    for i, k in enumerate(keys):
        g = infos.get(k, {}).get("grid")
        if not (isinstance(g, list) and len(g) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in g)):
            raise ValueError(f"sample {k!r:.60}: its JSON gives grid {g!r:.40}, expected [h, w] of positive ints")
        out[i] = g
    return out


def _text_ids(arr: np.ndarray, member: str) -> np.ndarray:
    """A text_tokens member's array, held to what the writer writes: 1-D unsigned ids."""
    if arr.ndim != 1 or arr.dtype.kind != "u" or arr.dtype.itemsize > 4:
        raise ValueError(f"member {member}: {arr.dtype}{arr.shape}, expected 1-D uint32 text token ids")
    return arr.astype(np.uint32, copy=False)
