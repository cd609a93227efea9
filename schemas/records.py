"""The JSON records of a dataset, typed: what the manifest's metadata, the job
spec and a unit's receipt hold.

Each record is read (`from_dict`, which validates every field it uses and
raises `ManifestError` naming the first bad one) and written (`to_dict`) here
and nowhere else; `pipeline/format` decides where they are stored. Field names
and JSON shapes are those of schema 1.x, so datasets written before these
classes existed read back unchanged, and new ones are byte-identical.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tokshard.errors import ManifestError


def _check(value: Any, types: type | tuple[type, ...], where: str, name: str, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    # bool is an int to Python, never to a record.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ManifestError(f"{where}: field {name!r} is {value!r}, expected {_names(types)}")
    if not isinstance(value, types):
        raise ManifestError(f"{where}: field {name!r} is {type(value).__name__} {value!r:.80}, "
                            f"expected {_names(types)}")
    return value


def _names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def _ints(value: Any, where: str, name: str, *, optional: bool = False) -> list[int] | None:
    if value is None and optional:
        return None
    _check(value, list, where, name)
    for v in value:
        _check(v, int, where, name)
    return list(value)


def _file_map(value: Any, where: str, name: str) -> dict[str, FileDigest]:
    _check(value, dict, where, name)
    return {k: FileDigest.from_dict(v, where, f"{name}[{k!r:.80}]") for k, v in value.items()}


def _count_map(value: Any, where: str, name: str) -> dict[str, int]:
    _check(value, dict, where, name)
    for k, v in value.items():
        _check(v, int, where, f"{name}.{k}")
    return dict(value)


def _class_names(value: Any, where: str) -> dict[str, list[str]] | None:
    if value is None:
        return None
    _check(value, dict, where, "class_names")
    out = {}
    for column, names in value.items():
        _check(names, list, where, f"class_names.{column}")
        for n in names:
            _check(n, str, where, f"class_names.{column}")
        out[str(column)] = list(names)
    return out


@dataclass(frozen=True)
class FileDigest:
    """What a reader checks a file against before it trusts its bytes (schema 1.3): its
    size, known before the read (so the read is bounded), then its sha256."""
    size: int                   # stored as "bytes"
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.size, "sha256": self.sha256}

    @classmethod
    def of(cls, data: bytes) -> FileDigest:
        import hashlib
        return cls(len(data), hashlib.sha256(data).hexdigest())

    @classmethod
    def from_dict(cls, d: Any, where: str, name: str) -> FileDigest:
        _check(d, dict, where, name)
        size = _check(d.get("bytes"), int, where, f"{name}.bytes")
        digest = _check(d.get("sha256"), str, where, f"{name}.sha256")
        if size < 0 or len(digest) != 64:
            raise ManifestError(f"{where}: field {name!r} is not a file digest ({size} bytes, sha256 {digest!r:.70})")
        return cls(size, digest)


@dataclass(frozen=True)
class TokenizerRecord:
    """Which tokenizer wrote the codes, and where the dataset keeps its copy."""
    name: str
    tokenizer_id: str
    tokenizer_config_hash: str
    codebook_hash: str
    config: dict[str, Any]
    vocab_size: int
    path: str                   # the tokenizer copy, relative to the dataset root

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TokenizerRecord:
        _check(d, dict, where, "tokenizer")
        strings = {k: _check(d.get(k), str, where, f"tokenizer.{k}")
                   for k in ("name", "tokenizer_id", "tokenizer_config_hash", "codebook_hash", "path")}
        return cls(**strings, config=_check(d.get("config", {}), dict, where, "tokenizer.config"),
                   vocab_size=_check(d.get("vocab_size"), int, where, "tokenizer.vocab_size"))


@dataclass(frozen=True)
class TextTokenizerRecord:
    """The Hugging Face tokenizer that wrote the `text_tokens` column, and where the dataset
    keeps its copy (a dataset converted with --text-tokenizer; absent otherwise)."""
    name: str                   # "<folder>/<file>" it was read from (for people)
    model: str                  # the tokenizer model's type: BPE, Unigram, WordPiece, WordLevel
    vocab_size: int             # every id is below it
    sha256: str                 # of the tokenizer.json bytes: the identity
    max_tokens: int             # ids kept per caption (--max-text-tokens); longer ones are cut and counted
    path: str                   # the copy, relative to the dataset root
    dtype: str = "uint32"       # the stored ids' type

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TextTokenizerRecord:
        _check(d, dict, where, "text_tokenizer")
        strings = {k: _check(d.get(k), str, where, f"text_tokenizer.{k}")
                   for k in ("name", "model", "sha256", "path", "dtype")}
        ints = {k: _check(d.get(k), int, where, f"text_tokenizer.{k}") for k in ("vocab_size", "max_tokens")}
        if strings["dtype"] not in ("uint16", "uint32"):
            raise ManifestError(f"{where}: field 'text_tokenizer.dtype' is {strings['dtype']!r:.40}, "
                                "expected uint32")
        if ints["max_tokens"] < 1 or ints["vocab_size"] < 0:
            raise ManifestError(f"{where}: field 'text_tokenizer' has max_tokens {ints['max_tokens']}, "
                                f"vocab_size {ints['vocab_size']}")
        return cls(**strings, **ints)


# A token field's name (`tokshard add-tokens --as NAME`): the loader's batch key for it.
FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True)
class FieldRecord:
    """A second tokenizer's codes for the same samples (`tokshard add-tokens DEST --as NAME`):
    a token dataset of its own under `path` (its manifest pinned in the record's `files`),
    shard for shard and row for row aligned with this one."""
    path: str                   # the field's dataset root, relative to this one: fields/NAME
    tokenizer: TokenizerRecord  # its tokenizer's identity
    grid: list[int]
    codec: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "tokenizer": asdict(self.tokenizer), "grid": list(self.grid),
                "codec": self.codec}

    @classmethod
    def from_dict(cls, d: Any, where: str, name: str) -> FieldRecord:
        _check(d, dict, where, f"fields.{name}")
        return cls(path=_check(d.get("path"), str, where, f"fields.{name}.path"),
                   tokenizer=TokenizerRecord.from_dict(d.get("tokenizer"), where),
                   grid=_ints(d.get("grid"), where, f"fields.{name}.grid") or [],
                   codec=_check(d.get("codec"), str, where, f"fields.{name}.codec"))


def _fields(d: Any, where: str) -> dict[str, FieldRecord] | None:
    if d is None:
        return None
    _check(d, dict, where, "fields")
    out = {}
    for name, value in d.items():
        if not isinstance(name, str) or not FIELD_NAME.fullmatch(name):
            raise ManifestError(f"{where}: field name {name!r:.40} in 'fields' is not [a-z][a-z0-9_]{{0,31}}")
        out[name] = FieldRecord.from_dict(value, where, name)
    return out


def _variable_grid(d: Any, where: str) -> dict[str, Any] | None:
    """The record's variable_grid, held to its keys and bounds (it bounds what a reader allocates
    per sample: max_tokens ids)."""
    if d is None:
        return None
    _check(d, dict, where, "variable_grid")
    if d.get("resize_mode") != "area":
        raise ManifestError(f"{where}: field 'variable_grid.resize_mode' is {d.get('resize_mode')!r:.40}, "
                            "expected 'area'")
    out: dict[str, Any] = {"resize_mode": "area"}
    for k in ("max_pixels", "patch", "max_tokens"):
        v = _check(d.get(k), int, where, f"variable_grid.{k}")
        if not 1 <= v <= 2**31:
            raise ManifestError(f"{where}: field 'variable_grid.{k}' is {v}, outside 1..2^31")
        out[k] = v
    if out["max_tokens"] > MAX_GRID_TOKENS:
        raise ManifestError(f"{where}: field 'variable_grid.max_tokens' is {out['max_tokens']}, above the "
                            f"{MAX_GRID_TOKENS} tokens a sample may hold")
    return out


# The most tokens one sample of a variable-grid dataset may hold (what a reader allocates for it):
# 2^20 is a 16,384 x 16,384-pixel image in 16-pixel patches.
MAX_GRID_TOKENS = 1 << 20


@dataclass(frozen=True)
class DatasetRecord:
    """The manifest's key-value metadata: everything a reader needs besides the shard rows."""
    tokshard_version: str
    format: str
    codec: dict[str, Any]               # the codec's own description (codecs.codec_from_description)
    tokenizer: TokenizerRecord
    grid: list[int]
    token_dtype: str
    job_hash: str
    shards: int
    totals: dict[str, int]
    skipped_by_reason: dict[str, int]
    views: list[str] = field(default_factory=lambda: ["orig"])
    dropped_by_reason: dict[str, int] | None = None     # schema 1.4: parts of kept samples, by reason
    # Files in the input folders that no reader took, by reason (plan.IGNORE_REASONS; 1.4).
    ignored_inputs: dict[str, int] | None = None
    sample_shape: list[int] | None = None   # None (before it was recorded): grid, with a view axis
    video: dict[str, Any] | None = None
    decode: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    codec_state: str | None = None      # relative to the dataset root
    codec_state_bytes: int = 0
    labels: str | None = None           # relative to the dataset root (schema 1.2)
    schema_version: str = "1.0"
    # Every dataset-wide file a reader trusts (codec state, label table, tokenizer copy),
    # by its path relative to the root (schema 1.3; empty before: nothing to check).
    files: dict[str, FileDigest] = field(default_factory=dict)
    # The Hugging Face ClassLabel names of the sources' columns, {column: names}; None
    # (not written) when no source has any, so records without them are unchanged.
    class_names: dict[str, list[str]] | None = None
    # The text tokenizer of the `text_tokens` column; None (not written) without one, so
    # records of datasets without text tokens are unchanged.
    text_tokenizer: TextTokenizerRecord | None = None
    # Token fields added by `tokshard add-tokens` ({name: FieldRecord}); None (not written) without any.
    fields: dict[str, FieldRecord] | None = None
    # Variable grids (--resize-mode area): {"resize_mode": "area", "max_pixels", "patch", "max_tokens"};
    # each sample holds its own (h, w) grid (shards and sample index), `grid` and `sample_shape` are
    # then empty. None (not written) for a dataset of one grid, so those records are unchanged.
    variable_grid: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> DatasetRecord:
        _check(d, dict, where, "record")
        views = d.get("views") or ["orig"]
        _check(views, list, where, "views")
        for v in views:
            _check(v, str, where, "views")
        sources = _check(d.get("sources", []), list, where, "sources")
        for s in sources:
            _check(s, str, where, "sources")
        return cls(
            tokshard_version=str(_check(d.get("tokshard_version", ""), str, where, "tokshard_version")),
            format=_check(d.get("format"), str, where, "format"),
            codec=_check(d.get("codec"), dict, where, "codec"),
            tokenizer=TokenizerRecord.from_dict(d.get("tokenizer"), where),
            grid=_ints(d.get("grid"), where, "grid") or [],
            token_dtype=_check(d.get("token_dtype"), str, where, "token_dtype"),
            job_hash=_check(d.get("job_hash", ""), str, where, "job_hash"),
            shards=_check(d.get("shards", 0), int, where, "shards"),
            totals=_count_map(d.get("totals", {}), where, "totals"),
            skipped_by_reason=_count_map(d.get("skipped_by_reason", {}), where, "skipped_by_reason"),
            dropped_by_reason=(None if d.get("dropped_by_reason") is None
                               else _count_map(d.get("dropped_by_reason"), where, "dropped_by_reason")),
            ignored_inputs=(None if d.get("ignored_inputs") is None
                            else _count_map(d.get("ignored_inputs"), where, "ignored_inputs")),
            views=list(views),
            sample_shape=_ints(d.get("sample_shape"), where, "sample_shape", optional=True) or None,
            video=_check(d.get("video"), dict, where, "video", optional=True),
            decode=_check(d.get("decode", {}), dict, where, "decode"),
            sources=list(sources),
            codec_state=_check(d.get("codec_state"), str, where, "codec_state", optional=True) or None,
            codec_state_bytes=_check(d.get("codec_state_bytes", 0), int, where, "codec_state_bytes"),
            labels=_check(d.get("labels"), str, where, "labels", optional=True) or None,
            schema_version=str(d.get("schema_version", "1.0")),
            files=_file_map(d.get("files", {}), where, "files"),
            class_names=_class_names(d.get("class_names"), where),
            text_tokenizer=(None if d.get("text_tokenizer") is None
                            else TextTokenizerRecord.from_dict(d.get("text_tokenizer"), where)),
            fields=_fields(d.get("fields"), where),
            variable_grid=_variable_grid(d.get("variable_grid"), where),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = {rel: digest.to_dict() for rel, digest in self.files.items()}
        if not self.files:          # a record before schema 1.3 reads back and writes as it was
            del d["files"]
        for name in ("dropped_by_reason", "ignored_inputs"):   # (absent before 1.4, or when none)
            if d[name] is None:
                del d[name]
        for name in ("class_names", "text_tokenizer", "fields", "variable_grid"):
            if d[name] is None:
                del d[name]
        if self.fields is not None:
            d["fields"] = {k: f.to_dict() for k, f in sorted(self.fields.items())}
        return d

    def text_summary(self) -> str:
        """The text tokenizer's identity and the text token counts on one line ("" without one):
        what `info` and the report show."""
        text = self.text_tokenizer
        if text is None:
            return ""
        n = max(1, int(self.totals.get("samples", 0)))
        stored = int(self.totals.get("text_tokens", 0))
        cut = (self.dropped_by_reason or {}).get("text_truncated", 0)
        return (f"{text.name} ({text.model}, {text.vocab_size:,} ids, sha256 {text.sha256[:16]}); "
                f"{stored:,} {text.dtype} ids stored ({stored / n:,.1f}/sample); {cut:,} caption(s) cut at "
                f"{text.max_tokens} ids, {int(self.totals.get('no_caption', 0)):,} sample(s) without a caption")

    def model_cost(self) -> str:
        """A trained codec's model (its state) counted into the stored bytes ("" without one): what
        a dataset costs with the model it needs to decode, as `info`, the report and convert say."""
        if not self.codec_state_bytes:
            return ""
        n = max(1, int(self.totals.get("samples", 0)))
        total = int(self.totals.get("stored_bytes", 0)) + self.codec_state_bytes
        return (f"with the codec model ({self.codec_state_bytes:,} B): {total:,} B = {total / n:,.1f} B/sample")

    def stored_shape(self) -> tuple[int, ...]:
        """Codes per sample: the grid, with a leading view or time axis; () with variable grids."""
        if self.variable_grid is not None:
            return ()
        if self.sample_shape:
            return tuple(self.sample_shape)
        return tuple(self.grid) if len(self.views) == 1 else (len(self.views), *self.grid)


@dataclass(frozen=True)
class JobSpec:
    """`_work/job.json`: what a destination was claimed for. Its hash decides whether a
    re-run may reuse committed units; its config lets `verify --repair` and `preview`
    re-read the sources exactly as the job did."""
    tokshard: str                       # the version that claimed the destination
    config: dict[str, Any]              # ConvertConfig.job_identity()
    tokenizer_id: str
    tokenizer_config_hash: str
    codebook_hash: str
    # The text tokenizer's sha256 (--text-tokenizer); None (not written) without one, so the
    # specs and job hashes of jobs without text tokens are unchanged.
    text_tokenizer_sha256: str | None = None

    def identity(self) -> dict[str, Any]:
        """What the job hash is taken over (everything but the hash itself)."""
        d = asdict(self)
        if d["text_tokenizer_sha256"] is None:
            del d["text_tokenizer_sha256"]
        return d

    def to_json(self, job_hash: str) -> bytes:
        return json.dumps({"job_hash": job_hash, **self.identity()}, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> tuple[JobSpec, str]:
        """(spec, its recorded job hash)."""
        try:
            d = json.loads(data)
        except ValueError as e:
            raise ManifestError(f"{where} is not JSON: {e}") from None
        _check(d, dict, where, "job")
        spec = cls(tokshard=str(d.get("tokshard", "")), config=_check(d.get("config"), dict, where, "config"),
                   **{k: _check(d.get(k), str, where, k)
                      for k in ("tokenizer_id", "tokenizer_config_hash", "codebook_hash")},
                   text_tokenizer_sha256=_check(d.get("text_tokenizer_sha256"), str, where,
                                                "text_tokenizer_sha256", optional=True))
        return spec, _check(d.get("job_hash"), str, where, "job_hash")


@dataclass(frozen=True)
class ShardEntry:
    """One shard: a row of the manifest (schemas.v1.SHARDS), as its unit's receipt records it."""
    shard: str
    path: str                           # relative to the dataset root
    format: str
    codec: str
    codec_version: int
    samples: int
    tokens: int
    raw_bytes: int
    payload_bytes: int
    stored_bytes: int
    source_bytes: int
    sha256: str
    tokenizer_id: str
    tokenizer_config_hash: str
    codebook_hash: str
    grid: list[int]
    source_shards: list[str]
    unit: int
    skipped: int
    skipped_by_reason: list[dict[str, Any]]     # [{"reason", "count"}], reasons in sorted order
    key_min: str | None = None
    key_max: str | None = None
    index_bytes: int | None = None      # the shard's sample-index file (schema 1.3)
    index_sha256: str | None = None
    # Parts of kept samples dropped (a field stored as null, a member ignored), by reason (1.4).
    dropped_by_reason: list[dict[str, Any]] | None = None
    # With a text tokenizer: text token ids stored, and samples without a caption (so empty
    # ids). None (not written) without one. Receipts carry them (the manifest's shard table
    # does not), and the record's totals sum them.
    text_tokens: int | None = None
    no_caption: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("text_tokens", "no_caption"):
            if d[name] is None:
                del d[name]
        return d

    @property
    def index(self) -> FileDigest | None:
        """What the shard's sample-index file must be; None before schema 1.3."""
        if self.index_bytes is None or self.index_sha256 is None:
            return None
        return FileDigest(self.index_bytes, self.index_sha256)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ShardEntry:
        _check(d, dict, where, "shard")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(d) - {"key_min", "key_max", "index_bytes", "index_sha256", "dropped_by_reason",
                                           "text_tokens", "no_caption"})
        if missing:
            raise ManifestError(f"{where}: shard entry lacks {missing}")
        for name in ("shard", "path", "format", "codec", "sha256"):
            _check(d[name], str, where, name)
        for name in ("codec_version", "samples", "tokens", "raw_bytes", "payload_bytes", "stored_bytes",
                     "source_bytes", "unit", "skipped"):
            _check(d[name], int, where, name)
        _check(d.get("index_bytes"), int, where, "index_bytes", optional=True)
        _check(d.get("index_sha256"), str, where, "index_sha256", optional=True)
        for name in ("text_tokens", "no_caption"):
            _check(d.get(name), int, where, name, optional=True)
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Receipt:
    """`_work/units/NAME.json`, written last for a unit: its presence means the unit's
    shard and sample index are committed."""
    unit_hash: str
    shard: ShardEntry
    timings: dict[str, float]           # decode_s, encode_s, write_s (run statistics)
    labels: list[tuple[int, int]] | None  # (label, samples) sorted; None: written before schema 1.2

    def to_json(self) -> bytes:
        d: dict[str, Any] = {"unit_hash": self.unit_hash, "shard": self.shard.to_dict(), "timings": self.timings}
        if self.labels is not None:
            d["labels"] = [list(item) for item in self.labels]
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Receipt:
        try:
            d = json.loads(data)
        except ValueError as e:
            raise ManifestError(f"{where} is not JSON: {e}") from None
        _check(d, dict, where, "receipt")
        labels = d.get("labels")
        if labels is not None:
            _check(labels, list, where, "labels")
            for item in labels:
                if not (isinstance(item, list) and len(item) == 2):
                    raise ManifestError(f"{where}: field 'labels' holds {item!r}, expected [label, count]")
                _ints(item, where, "labels")
            labels = [(int(a), int(b)) for a, b in labels]
        return cls(unit_hash=_check(d.get("unit_hash"), str, where, "unit_hash"),
                   shard=ShardEntry.from_dict(d.get("shard"), where),
                   timings=_check(d.get("timings", {}), dict, where, "timings"), labels=labels)
