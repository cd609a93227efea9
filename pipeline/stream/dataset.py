"""`tokshard.open(URL)`: a converted dataset as the manifest describes it.

The manifest is the only thing trusted: the shard list, sizes and sha256s, the
codec (rebuilt from its recorded description and state) and the token grid. A
shard is read whole, checked against its sha256 and parsed; remote shards go
through a local, size-bounded cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from pyarrow import ArrowException

from tokshard.errors import CodecError, ManifestError, ShardError, TokenizerError, TokshardError, UsageError
from tokshard.pipeline.format.codecs import codec_from_description
from tokshard.pipeline.format.integrity import check_tree, read_checked
from tokshard.pipeline.format.layout import MANIFEST, DatasetLayout
from tokshard.pipeline.format.manifest import check_record_paths, check_shards, read_record
from tokshard.pipeline.format.shards import ShardColumns, parse_keys, parse_shard
from tokshard.pipeline.storage import read_parquet_bytes, sha256
from tokshard.pipeline.stream.shard_cache import ShardCache
from tokshard.schemas.records import FileDigest

if TYPE_CHECKING:
    import torch

    from tokshard.pipeline.stream.access import MapDataset, SampleCache, TokenSubset
    from tokshard.pipeline.stream.loader import EpochStream, TokenIterable, TokenLoader
    from tokshard.tokenizers.base import Tokenizer

DEFAULT_CACHE_BYTES = 20 * 2**30
# A codec state is a model of a few KB to a few MB (rans-ctx: ~93 KB at 1024 codes).
MAX_CODEC_STATE_BYTES = 256 * 2**20
# A shard's sample index: ~100 bytes a sample; a shard of a million samples stays far below.
MAX_INDEX_BYTES = 2**30


def default_cache_dir() -> str:
    base = os.environ.get("TOKSHARD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tokshard")
    return os.path.join(base, "shards")


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def check_tokenizer_trust(cls: type[Tokenizer], url: str, trusted: bool) -> None:
    """Refuse to load a dataset's tokenizer copy whose format runs code, unless `trusted`."""
    if cls.runs_code and not trusted:
        raise TokenizerError(
            f"the tokenizer stored with {url} ({cls.name}) is a format that runs code when it is "
            "loaded; load it only if you trust whoever made this dataset: "
            "tokshard.open(..., trust_tokenizer_code=True), or --trust-tokenizer-code on the command line")


class TokenDataset:
    """A token dataset opened from its manifest.

    `verify=True` checks every shard's sha256 when it is read (cheap next to
    parsing); `cache_dir`/`cache_bytes` bound the local copies of remote shards.
    `trust_tokenizer_code=True` lets `tokenizer()` load a tokenizer copy whose
    format runs code when loaded (TorchScript): only for datasets whose author
    you trust (docs/security.md).
    """

    def __init__(self, url: str, *, storage_options: dict | None = None, verify: bool = True,
                 cache_dir: str | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 trust_tokenizer_code: bool = False, sample_cache_bytes: int = 256 * 2**20):
        self.url, self.storage_options, self.verify = url, storage_options, verify
        self.sample_cache_bytes = sample_cache_bytes
        self.trust_tokenizer_code = trust_tokenizer_code
        self._layout = DatasetLayout.at(url, storage_options)
        self.root = self._layout.root
        self._fs_pid = os.getpid()
        # `record`: the dataset record as stored (a dict); `info`: the same, typed and validated.
        self.manifest, self.info, self.record = read_record(self._layout, url)
        check_record_paths(self._layout, self.info)
        info = self.info
        self.grid = tuple(info.grid)
        self.vocab_size = info.tokenizer.vocab_size
        try:
            self.token_dtype = np.dtype(info.token_dtype)
        except TypeError as e:
            raise ManifestError(f"{url}: manifest lacks a valid dataset record ({e!r})") from None
        self.format = info.format
        state = None
        if info.codec_state:
            # Read no more than the record says the state holds (and never more than the cap):
            # the codec checks the rest of what it declares before it allocates.
            digest = info.files.get(info.codec_state)
            try:
                if digest is None and self.fs.size(self._layout.resolve(info.codec_state, "record.codec_state")) \
                        != info.codec_state_bytes:
                    raise ManifestError(f"{url}: codec state {info.codec_state} does not have the "
                                        f"{info.codec_state_bytes} bytes the record says")
                state = read_checked(self._layout, info.codec_state, "record.codec_state", digest,
                                     limit=min(info.codec_state_bytes, MAX_CODEC_STATE_BYTES))
            except FileNotFoundError:
                raise ManifestError(f"{url}: codec state {info.codec_state} is missing") from None
        self.codec = codec_from_description(info.codec, self.vocab_size, state)
        self.views = tuple(info.views)
        self.video = info.video
        # Stored codes per sample: the grid, with a leading view or time axis. A variable-grid
        # dataset (--resize-mode area): () and 0; each sample's grid is in `grids()`.
        self.variable_grid = info.variable_grid
        self.sample_shape = info.stored_shape()
        self.tokens_per_sample = 0 if self.variable_grid else int(np.prod(self.sample_shape))
        shards = check_shards(self._layout, self.manifest, info, url)
        self.shard_names, self.shard_paths, self.shard_sha256 = shards.names, shards.paths, shards.sha256
        self.shard_sizes, self.shard_bytes = shards.samples, shards.stored_bytes
        # Global sample id = offset of the shard in manifest order + row.
        self.shard_offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self._cache = None if _is_local(self.fs) else ShardCache(cache_dir or default_cache_dir(), cache_bytes)

    @property
    def layout(self) -> DatasetLayout:
        # Async filesystems (s3fs, gcsfs) are not fork-safe: a DataLoader worker
        # forked from this process builds its own.
        if self._fs_pid != os.getpid():
            self._layout = DatasetLayout.at(self.url, self.storage_options)
            self._fs_pid = os.getpid()
        return self._layout

    @property
    def fs(self) -> Any:
        return self.layout.fs

    def __len__(self) -> int:
        return int(self.shard_offsets[-1])

    @property
    def num_shards(self) -> int:
        return len(self.shard_names)

    @property
    def job_hash(self) -> str:
        return self.info.job_hash

    @property
    def class_names(self) -> dict[str, list[str]] | None:
        """The sources' class names, {column: names} (Hugging Face ClassLabel features): a
        label `y` read from column `c` is `class_names[c][y]`. None when the sources had none."""
        return self.info.class_names

    @property
    def label_names(self) -> list[str] | None:
        """The class names of this dataset's labels (`label_names[y]` is label y's name): the
        ClassLabel names of the column the labels came from, or None. The record keeps names
        per column, not which column was the label: the one the job spec's
        `columns.label_column` names, else the one convert takes by default ("label", then
        "cls"), else the only one there is."""
        names = self.class_names
        if not names:
            return None
        if not hasattr(self, "_label_names"):
            from tokshard.pipeline.format.work import read_job_spec
            try:
                found = read_job_spec(self.layout)
            except (TokshardError, OSError):
                found = None      # no readable job spec: the usual columns
            columns = found[0].config.get("columns") if found else None
            named = columns.get("label_column") if isinstance(columns, dict) else None
            if isinstance(named, str) and named:
                picked = names.get(named)
            else:
                picked = next((names[c] for c in ("label", "cls") if c in names),
                              next(iter(names.values())) if len(names) == 1 else None)
            self._label_names = picked
        return self._label_names

    @property
    def fields(self) -> tuple[str, ...]:
        """The token fields added by `tokshard add-tokens` (sorted names)."""
        return tuple(sorted(self.info.fields or {}))

    def field(self, name: str) -> TokenDataset:
        """Token field `name` as a dataset of its own, row for row this one: `ds.field(name)[i]`
        holds sample i's codes by that field's tokenizer, and `loader(..., tokens=name)`
        streams them. Its manifest is held to the digest this record pins; its shards, views
        and tokenizer to this dataset's record."""
        memo: dict[str, TokenDataset] = self.__dict__.setdefault("_fields", {})
        if name in memo:
            return memo[name]
        rec = (self.info.fields or {}).get(name) if isinstance(name, str) else None
        if rec is None:
            raise UsageError(f"{self.url} has no token field {name!r:.40} (fields: {', '.join(self.fields) or 'none'}; "
                             "tokshard add-tokens adds one)")
        rel = f"{rec.path}/{MANIFEST}"
        where = f"record.fields.{name}"
        digest = self.info.files.get(rel)
        if digest is None:
            raise ManifestError(f"{self.url}: {where}: the record pins no digest for the field's manifest {rel}")
        try:
            read_checked(self.layout, rel, where, digest, limit=digest.size)
        except FileNotFoundError:
            raise ManifestError(f"{self.url}: {where}: the field's manifest {rel} is missing") from None
        sub = TokenDataset(self.url.rstrip("/") + "/" + rec.path, storage_options=self.storage_options,
                           verify=self.verify, trust_tokenizer_code=self.trust_tokenizer_code,
                           sample_cache_bytes=self.sample_cache_bytes)
        if sub.shard_names != self.shard_names or not np.array_equal(sub.shard_sizes, self.shard_sizes) \
                or sub.views != self.views or sub.info.tokenizer != rec.tokenizer:
            raise ManifestError(f"{self.url}: {where}: the field's dataset is not the one the record names, shard "
                                "for shard (its shards, views or tokenizer differ)")
        memo[name] = sub
        return sub

    @property
    def text_tokenizer(self) -> dict[str, Any] | None:
        """The text tokenizer of the `text_tokens` column (name, model, vocab_size, sha256 of
        its tokenizer.json, max_tokens, dtype, path of the dataset's copy); None when the
        dataset was converted without --text-tokenizer."""
        text = self.info.text_tokenizer
        return None if text is None else text.to_dict()

    def text_lengths(self) -> np.ndarray:
        """Each sample's count of text token ids, by sample id (zeros without text tokens);
        read once from the sample index."""
        if getattr(self, "_text_lengths", None) is None:
            from tokshard.pipeline.stream.access import all_text_lengths
            self._text_lengths = all_text_lengths(self)
        return self._text_lengths

    def load_text_tokenizer(self) -> Any:
        """The Hugging Face `tokenizers.Tokenizer` stored with the dataset (to decode
        `text_tokens`), its bytes checked against the record first. It is data, never code."""
        from tokshard.tokenizers.text import MAX_TEXT_TOKENIZER_BYTES, parse_tokenizer_json
        text = self.info.text_tokenizer
        if text is None:
            raise UsageError(f"{self.url} has no text tokens (converted without --text-tokenizer)")
        field = "record.text_tokenizer.path"
        try:
            data = read_checked(self.layout, text.path, field, self.info.files.get(text.path),
                                limit=MAX_TEXT_TOKENIZER_BYTES)
        except FileNotFoundError:
            raise ManifestError(f"{self.url}: the text tokenizer copy {text.path} is missing") from None
        if sha256(data) != text.sha256:
            raise ManifestError(f"{self.url}: the text tokenizer copy {text.path} is not the one the record names "
                                f"(sha256 {sha256(data)[:16]}, record {text.sha256[:16]})")
        try:
            return parse_tokenizer_json(data, f"{self.url}: {text.path}")
        except TokenizerError as e:
            raise ManifestError(str(e)) from None

    def __repr__(self) -> str:
        views = f", views={len(self.views)}" if len(self.views) > 1 else ""
        return (f"TokenDataset({self.url!r}, samples={len(self)}, shards={self.num_shards}, "
                f"grid={self.grid}{views}, vocab={self.vocab_size}, codec={self.codec.name})")

    # -- reading ---------------------------------------------------------------
    def _shard_bytes(self, i: int) -> bytes:
        name, rel, want = self.shard_names[i], self.shard_paths[i], self.shard_sha256[i]
        ext = rel.rsplit(".", 1)[-1]
        if self._cache is not None:
            # A copy that checks, or None: a miss, a damaged copy, or a cache fault (counted and warned, not raised).
            cached = self._cache.lookup(want, ext)
            if cached is not None:
                return cached
        try:
            path = self.layout.resolve(rel, "path")
        except ManifestError as e:
            raise ShardError(name, str(e)) from None
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise ShardError(name, f"missing: {path} does not exist") from None
        except OSError as e:
            raise ShardError(name, f"cannot read {path}: {e}") from None
        if len(data) != int(self.shard_bytes[i]):
            raise ShardError(name, f"{rel} has {len(data)} bytes, the manifest says {int(self.shard_bytes[i])}")
        if self.verify or self._cache is not None:
            got = sha256(data)
            if got != want:
                raise ShardError(name, f"checksum mismatch for {rel}: sha256 {got}, manifest {want}")
        if self._cache is not None:
            self._cache.store(want, ext, data)  # a full or read-only cache is counted and warned; the shard is served
        return data

    def read_shard(self, i: int, columns: Sequence[str] = (), rows: np.ndarray | None = None) -> ShardColumns:
        """Shard `i` (manifest order) as columns (key, tokens, label, id, and the stored
        `columns` asked for: caption, width, height, source, meta, and text_tokens when the
        dataset has them: an object array of 1-D uint32 arrays); tokens stay coded unless raw.
        `rows` (sorted, unique): only those rows (the whole shard is still read and checked)."""
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard index {i} out of range [0, {self.num_shards})")
        if "text_tokens" in columns and self.info.text_tokenizer is None:
            raise UsageError(f"column 'text_tokens': {self.url} has no text tokens (converted without "
                             "--text-tokenizer)")
        cols = parse_shard(self._shard_bytes(i), shard=self.shard_names[i], fmt=self.format,
                           codec=self.codec.name, n_tokens=self.tokens_per_sample,
                           dtype=self.token_dtype, samples=int(self.shard_sizes[i]), columns=columns, rows=rows)
        if self.variable_grid is not None:
            self._check_grids(cols["grid"], i, "shard")
        ids = np.arange(self.shard_offsets[i], self.shard_offsets[i + 1], dtype=np.int64)
        cols["id"] = ids if rows is None else ids[rows]
        return cols

    def shard_numbers(self, names: set[str]) -> dict[str, int]:
        """{name: shard number in manifest order} of those of `names` the manifest lists,
        found by Arrow in the shard column: a lookup naming one shard of 200,000 does not
        build a dict of them all."""
        import pyarrow.compute as pc
        if not names:
            return {}
        column = self.manifest.column("shard")
        hits = pc.indices_nonzero(pc.is_in(column, value_set=pa.array(sorted(names), pa.string()))).to_pylist()
        return {self.shard_names[i]: i for i in hits}

    def shards_for_key(self, key: str) -> list[int]:
        """The shards (manifest order) whose key range can hold `key`: the manifest's
        key_min/key_max route a lookup to one or a few index files (every shard of a
        pre-1.1 manifest, which has no ranges)."""
        import pyarrow.compute as pc
        shards = self.manifest
        if "key_min" not in shards.column_names:
            return list(range(self.num_shards))
        lo, hi = shards.column("key_min"), shards.column("key_max")
        try:
            hit = pc.or_kleene(pc.and_kleene(pc.less_equal(lo, key), pc.greater_equal(hi, key)), pc.is_null(lo))
        except ArrowException as e:
            raise ManifestError(f"{self.url}: the manifest's key_min/key_max columns are damaged ({e})") from None
        return pc.indices_nonzero(pc.fill_null(hit, True)).to_pylist()

    def read_keys(self, i: int) -> list[str]:
        """Shard `i`'s sample keys in row order (the shard read and checked as `read_shard`
        reads it, only its keys parsed): what an index row is checked against."""
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard index {i} out of range [0, {self.num_shards})")
        return parse_keys(self._shard_bytes(i), shard=self.shard_names[i], fmt=self.format,
                          codec=self.codec.name, samples=int(self.shard_sizes[i]))

    @property
    def max_sample_tokens(self) -> int:
        """The most tokens a sample holds: tokens_per_sample, or a variable-grid dataset's bound."""
        return int(self.variable_grid["max_tokens"]) if self.variable_grid else self.tokens_per_sample

    def grids(self) -> np.ndarray:
        """Each sample's token grid (h, w) by sample id, an (n, 2) int64 array: a variable-grid
        dataset's from its sample index (read once; the loader groups and packs by it before any
        shard is read), else the one grid repeated."""
        if getattr(self, "_grids", None) is None:
            if self.variable_grid is None:
                if len(self.grid) != 2:
                    raise UsageError(f"{self.url}: samples of grid {self.grid} are not 2-D grids")
                self._grids = np.broadcast_to(np.asarray(self.grid, np.int64), (len(self), 2))
            else:
                from tokshard.pipeline.stream.access import all_grids
                self._grids = all_grids(self)
        return self._grids

    def _check_grids(self, grid: np.ndarray, shard: int, where: str) -> None:
        """Grids read from a shard or its index, held to the record's bound: a hostile grid would
        size what a reader allocates."""
        assert self.variable_grid is not None
        limit = int(self.variable_grid["max_tokens"])
        if len(grid) and (grid.min() < 1 or (grid[:, 0] * grid[:, 1]).max() > limit):
            raise ShardError(self.shard_names[shard], f"its {where} gives a sample a grid outside 1..{limit} "
                             "tokens (the record's variable_grid.max_tokens)")

    def decode_tokens(self, tokens: np.ndarray, ids: np.ndarray | None = None,
                      grids: np.ndarray | None = None, *, stack: bool = False) -> np.ndarray:
        """A tokens column (raw rows or coded payloads) -> (n, *sample_shape) token ids; with
        variable grids (`grids`: the samples' (h, w), as read_shard gives them) an object array
        of one (h, w) array per sample, or with `stack` (samples of one grid) one (n, h, w) array."""
        if self.variable_grid is not None:
            if stack:
                return self._decode_one_grid(tokens, ids, grids)
            return self._decode_grids(tokens, ids, grids)
        if tokens.dtype != object:
            return tokens.reshape(len(tokens), *self.sample_shape)
        try:
            rows = self.codec.decode_matrix(list(tokens), self.tokens_per_sample)
        except CodecError:
            self._name_the_culprit(ids, [partial(self.codec.decode, p, self.tokens_per_sample) for p in tokens])
            raise
        return rows.reshape(len(tokens), *self.sample_shape)

    def _name_the_culprit(self, ids: np.ndarray | None, decodes: Sequence[Callable[[], object]]) -> None:
        """After a batch failed to decode: decode its samples one by one (`decodes`), raising the
        first one's CodecError as a ShardError naming its shard and row."""
        for j, decode in enumerate(decodes):
            try:
                decode()
            except CodecError as e:
                raise self._sample_error(None if ids is None else int(ids[j]), e) from None

    def _decode_one_grid(self, tokens: np.ndarray, ids: np.ndarray | None, grids: np.ndarray | None) -> np.ndarray:
        """Samples of one grid (a loader batch grouped by grid) in one (n, h, w) array, decoded as
        one matrix: no array per sample."""
        if grids is None or len(grids) != len(tokens) or (len(grids) and (grids != grids[0]).any()):
            raise UsageError("stack=True decodes samples of one grid, given as `grids`")
        if not len(tokens):
            return np.empty((0, 1, 1), self.token_dtype)
        h, w = (int(v) for v in grids[0])
        if self.codec.name == "raw":
            return np.stack(list(tokens)).reshape(len(tokens), h, w)
        try:
            rows = self.codec.decode_matrix(list(tokens), h * w, widths=w)
        except CodecError:
            return np.stack(list(self._decode_grids(tokens, ids, grids)))   # (which names the culprit)
        return rows.reshape(len(tokens), h, w)

    def _decode_grids(self, tokens: np.ndarray, ids: np.ndarray | None, grids: np.ndarray | None) -> np.ndarray:
        if grids is None or len(grids) != len(tokens):
            raise UsageError("a variable-grid dataset's tokens decode with their grids (read_shard's 'grid')")
        out = np.empty(len(tokens), dtype=object)
        if self.codec.name == "raw":
            for j, (row, (h, w)) in enumerate(zip(tokens, grids.tolist())):
                out[j] = np.asarray(row).reshape(h, w)
            return out
        counts = (grids[:, 0] * grids[:, 1]).tolist()
        widths = grids[:, 1].tolist()
        try:
            rows = self.codec.decode_batch(list(tokens), counts, widths=widths)
        except CodecError:
            self._name_the_culprit(ids, [partial(self.codec.decode_batch, [p], [n], widths=[w])
                                         for p, n, w in zip(tokens, counts, widths)])
            raise
        for j, (row, (h, w)) in enumerate(zip(rows, grids.tolist())):
            out[j] = row.reshape(h, w)
        return out

    def _sample_error(self, sample_id: int | None, err: Exception) -> ShardError:
        if sample_id is None:
            return ShardError("?", str(err))
        k = int(np.searchsorted(self.shard_offsets, sample_id, side="right") - 1)
        return ShardError(self.shard_names[k], f"sample row {sample_id - int(self.shard_offsets[k])}: {err}")

    def shard(self, i: int) -> dict:
        """Shard `i` decoded: {"tokens": (n, *sample_shape), "label", "key", "id"}."""
        cols = self.read_shard(i)
        return {"tokens": self.decode_tokens(cols["tokens"], cols["id"], cols.get("grid")), "label": cols["label"],
                "key": list(cols["key"]), "id": cols["id"]}

    def __iter__(self) -> Iterator[tuple[int, str, np.ndarray, int]]:
        """Every sample once, in manifest order: (id, key, tokens, label)."""
        for i in range(self.num_shards):
            s = self.shard(i)
            yield from zip(s["id"].tolist(), s["key"], s["tokens"], s["label"].tolist())

    def index_digest(self, i: int) -> FileDigest | None:
        """What shard `i`'s sample-index file must be (None: not recorded, before schema 1.3).
        Read from the manifest's columns one scalar at a time: a lookup at 200,000 shards
        touches one row, not the whole column."""
        columns = self.manifest.column_names
        if "index_bytes" not in columns or "index_sha256" not in columns:
            return None
        name = self.shard_names[i]
        try:
            size = self.manifest.column("index_bytes")[i].as_py()
            digest = self.manifest.column("index_sha256")[i].as_py()
        except (ArrowException, ValueError) as e:
            raise ManifestError(f"{self.url}: the manifest's index_bytes/index_sha256 columns are damaged "
                                f"({type(e).__name__})") from None
        if size is None and digest is None:
            return None
        try:
            return FileDigest.from_dict({"bytes": size, "sha256": digest}, self.url,
                                        f"manifest shard {name!r:.40}: index")
        except ManifestError as e:
            raise ShardError(name, str(e)) from None

    def read_index(self, i: int, **options: Any) -> pa.Table:
        """Shard `i`'s sample index (`options` go to the Parquet reader: columns, filters),
        checked against the size and sha256 the manifest records. A missing, damaged or
        altered index is a ShardError naming the shard."""
        data = self.index_bytes(i)
        try:
            return read_parquet_bytes(data, **options)
        except ArrowException as e:
            raise ShardError(self.shard_names[i], f"its sample index {self._layout.index_rel(self.shard_names[i])} "
                             f"is unreadable ({type(e).__name__})") from None

    def index_bytes(self, i: int) -> bytes:
        """The bytes of shard `i`'s sample-index file, checked against the manifest's digest
        (a ShardError naming the shard if missing or different)."""
        name = self.shard_names[i]
        rel = self._layout.index_rel(name)
        try:
            return read_checked(self.layout, rel, f"manifest shard {name!r:.40}: index", self.index_digest(i),
                                limit=MAX_INDEX_BYTES)
        except FileNotFoundError:
            raise ShardError(name, f"its sample index {rel} is missing (tokshard verify --repair rebuilds "
                             "it)") from None
        except ManifestError as e:
            raise ShardError(name, f"its sample index does not match the manifest: {e}") from None

    # -- companions ---------------------------------------------------------------
    def tokenizer(self, **options: Any) -> Tokenizer:
        """The tokenizer stored with the dataset (for decoding tokens to pixels).

        A tokenizer whose artifact runs code when loaded (`Tokenizer.runs_code`) is
        refused unless the dataset was opened with `trust_tokenizer_code=True`."""
        from tokshard.tokenizers.registry import tokenizer_class
        tok = self.info.tokenizer
        if not _is_local(self.fs):
            raise UsageError("loading the tokenizer of a remote dataset: copy "
                             f"{self.url.rstrip('/')}/{tok.path} locally and load it from there")
        cls = tokenizer_class(tok.name)
        check_tokenizer_trust(cls, self.url, self.trust_tokenizer_code)
        path = self.layout.resolve_tree(tok.path, "record.tokenizer.path")
        problems = check_tree(self.layout, tok.path, self.info.files)
        if problems:
            raise ManifestError(f"{self.url}: the tokenizer copy does not match the manifest: {problems[0]}"
                                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        return cls.load(path, **options)

    def codebook(self) -> torch.Tensor | None:
        """(vocab_size, dim) float32 torch tensor of code embeddings, or None."""
        import torch
        book = self.tokenizer().codebook()
        return None if book is None else torch.as_tensor(np.asarray(book, np.float32))

    # -- random access and subsets ------------------------------------------------
    @property
    def samples(self) -> SampleCache:
        """The parsed shards `ds[i]` and `get` read from (an LRU bounded by `sample_cache_bytes`
        of stored shard bytes)."""
        from tokshard.pipeline.stream.access import SampleCache
        if getattr(self, "_samples", None) is None:
            self._samples = SampleCache(self, self.sample_cache_bytes)
        return self._samples

    def __getitem__(self, i: int) -> dict:
        """Sample `i` (global id; negative counts from the end) as a dict: id, key, tokens
        (`sample_shape`), label, caption, width, height, source, meta, and class_name when
        the dataset has class names. IndexError outside the dataset."""
        from tokshard.pipeline.stream.access import sample_index
        return self.samples.sample(sample_index(len(self), i))

    def get(self, key: str) -> dict:
        """The sample with this key (as `ds[i]`), found through the sample index; KeyError if none."""
        from tokshard.pipeline.stream.access import find_key
        sample_id = find_key(self, key)
        if sample_id is None:
            raise KeyError(key)
        return self[sample_id]

    @property
    def keys(self) -> list[str]:
        """Every sample's key in id order (read from the sample index once)."""
        if getattr(self, "_keys", None) is None:
            from tokshard.pipeline.stream.access import all_keys
            self._keys = all_keys(self)
        return self._keys

    def subset(self, fraction: float, seed: int = 0) -> TokenSubset:
        """The samples whose hash of (seed, key) falls in the first `fraction` of the hash range:
        deterministic, and the same for the same keys in any dataset."""
        from tokshard.pipeline.stream.access import TokenSubset, check_fraction, hash_fraction_ids
        f = check_fraction(fraction)
        ids = hash_fraction_ids(self.keys, np.arange(len(self), dtype=np.int64), f, seed)
        return TokenSubset(self, ids, f"subset({f}, seed={seed})")

    def split(self, fraction: float, seed: int = 0) -> tuple[TokenSubset, TokenSubset]:
        """(subset(fraction, seed), the rest): e.g. a held-out validation part."""
        from tokshard.pipeline.stream.access import TokenSubset
        part = self.subset(fraction, seed)
        rest = np.setdiff1d(np.arange(len(self), dtype=np.int64), part.ids, assume_unique=True)
        return part, TokenSubset(self, rest, f"rest of subset({float(fraction)}, seed={seed})")

    def map_dataset(self, columns: Sequence[str] = ()) -> MapDataset:
        """A map-style torch Dataset view (item i: tokens as a torch tensor, label, key, id, and
        the `columns` asked for), e.g. for a DataLoader with a sampler of your own."""
        from tokshard.pipeline.stream.access import MapDataset
        return MapDataset(self, columns)

    # -- training ---------------------------------------------------------------
    def epoch_stream(self, epoch: int, seed: int, shuffle: bool, on_error: str, prefetch: int,
                     columns: tuple[str, ...]) -> EpochStream:
        """The loader's view of an epoch: the shards in their (seed, epoch) order, positions -> rows."""
        from tokshard.pipeline.stream.loader import EpochStream
        from tokshard.pipeline.stream.order import shard_order
        return EpochStream(self, shard_order(self.num_shards, seed, epoch, shuffle), on_error, prefetch, columns)

    def epoch_ids(self, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
        """The sample id at each position of the epoch's stream (its shards in their order)."""
        from tokshard.pipeline.stream.order import shard_order
        order = shard_order(self.num_shards, seed, epoch, shuffle)
        sizes = self.shard_sizes[order].astype(np.int64)
        starts = np.repeat(self.shard_offsets[order].astype(np.int64) - np.concatenate([[0], np.cumsum(sizes)[:-1]]),
                           sizes)
        return starts + np.arange(int(sizes.sum()), dtype=np.int64)

    def iterable(self, batch_size: int = 256, **options: Any) -> TokenIterable:
        """A torch IterableDataset of ready batches (see `TokenIterable`)."""
        from tokshard.pipeline.stream.loader import TokenIterable
        return TokenIterable(self, batch_size=batch_size, **options)

    def loader(self, batch_size: int = 256, *, num_workers: int = 0, pin_memory: bool | None = None,
               prefetch_factor: int | None = None, multiprocessing_context: str | BaseContext | None = None,
               block: int | None = None, worker_affinity: bool = False, **options: Any) -> TokenLoader:
        """A resumable loader of batches for this rank (see `TokenLoader`)."""
        from tokshard.pipeline.stream.loader import TokenLoader
        return TokenLoader(self.iterable(batch_size, **options), num_workers=num_workers,
                           pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                           multiprocessing_context=multiprocessing_context, block=block,
                           worker_affinity=worker_affinity)


def open_dataset(url: str, **options: Any) -> TokenDataset:
    return TokenDataset(str(url), **options)
