"""The convert job: plan units, fit the codec if it needs it, run the units on
an engine, and commit the manifest last.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np

from tokshard import __version__
from tokshard.errors import CodecError, JobError, ManifestError, TokenizerError, UsageError
from tokshard.pipeline.convert.config import CHOICES, DEFAULT_TOKENIZER, ConvertConfig
from tokshard.pipeline.convert.decode import DecodeConfig
from tokshard.pipeline.convert.default_tokenizer import default_artifact
from tokshard.pipeline.convert.engines import engine_class
from tokshard.pipeline.convert.engines.base import EngineJob
from tokshard.pipeline.convert.engines.retry import RetryPolicy, UnitFailure
from tokshard.pipeline.convert.select import check_predicate, referenced_columns
from tokshard.pipeline.convert.sources import WorkUnit
from tokshard.pipeline.convert.sources.arrow import arrow_schema_of
from tokshard.pipeline.convert.sources.parquet import class_names_of
from tokshard.pipeline.convert.sources.parquet import schema_of as parquet_schema_of
from tokshard.pipeline.convert.sources.plan import plan_sources
from tokshard.pipeline.convert.stages import TokenizerInfo, UnitContext, load_receipt, tokenize_unit
from tokshard.pipeline.convert.video import ClipConfig
from tokshard.pipeline.convert.views import decode_resolution, view_names
from tokshard.pipeline.format.codecs import get_codec, token_dtype
from tokshard.pipeline.format.layout import CODEC_STATE, LABELS, TEXT_TOKENIZER, TOKENIZER_DIR, DatasetLayout
from tokshard.pipeline.format.manifest import write_labels, write_manifest, write_timings
from tokshard.pipeline.format.work import read_job_spec, write_job_spec
from tokshard.pipeline.storage import atomic_write, clean_temporaries, redact_text, redact_url, storage_access
from tokshard.schemas.records import (
    DatasetRecord,
    FileDigest,
    JobSpec,
    Receipt,
    TextTokenizerRecord,
    TokenizerRecord,
)
from tokshard.schemas.v1 import SCHEMA_VERSION
from tokshard.tokenizers.base import ClipTokenizer, Tokenizer, artifact_files, canonical_json, sha256_hex
from tokshard.tokenizers.registry import load_tokenizer
from tokshard.tokenizers.text import TEXT_TOKEN_DTYPE, TextTokenizer

RECEIPT_READERS = 16
DESTINATION_UNUSABLE = "cannot use the destination"


class _Progress:
    """A live bar: shards done/failed, images/s, skips by reason; and the totals."""

    def __init__(self, total: int, done: int, quiet: bool):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=done, unit="shard", disable=quiet, file=sys.stderr,
                        dynamic_ncols=True)
        self.receipts: list[Receipt] = []
        self.failures: list[tuple[WorkUnit, UnitFailure]] = []
        self.samples, self.skips, self.started = 0, Counter[str](), time.perf_counter()

    def receipt(self, r: Receipt) -> None:
        self.receipts.append(r)
        # Running totals: summing all receipts per update is quadratic at 100k+ shards.
        self.samples += r.shard.samples
        for item in r.shard.skipped_by_reason:
            self.skips[item["reason"]] += item["count"]
        self._update()

    def failure(self, unit: WorkUnit, failure: UnitFailure) -> None:
        self.failures.append((unit, failure))
        self._update()

    def _update(self) -> None:
        rate = self.samples / max(time.perf_counter() - self.started, 1e-9)
        post = {"img/s": f"{rate:.0f}", "failed": len(self.failures)}
        post.update(self.skips.most_common(3))
        self.bar.update(1)
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        self.bar.close()


def _check_config(cfg: ConvertConfig) -> None:
    for name in ("format", "engine"):
        if getattr(cfg, name) not in CHOICES[name]:
            raise UsageError(f"unknown {name} {getattr(cfg, name)!r} (one of {', '.join(CHOICES[name])})")
    if cfg.shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    n = cfg.max_text_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"--max-text-tokens must be a positive integer, got {n!r:.40}")


def _load_text_tokenizer(cfg: ConvertConfig) -> TextTokenizer | None:
    """The job's text tokenizer (--text-tokenizer), read and parsed before any work starts: a
    missing or unparsable file is one UsageError naming it and the cause."""
    if cfg.text_tokenizer is None:
        return None
    try:
        return TextTokenizer.load(cfg.text_tokenizer, cfg.max_text_tokens)
    except TokenizerError as e:
        raise UsageError(f"--text-tokenizer: {e}") from None


def convert(cfg: ConvertConfig, quiet: bool = False) -> dict:
    """Run the convert job `cfg`; returns {"dataset": the record, "elapsed_s", "units_reused"}."""
    _check_config(cfg)
    started = time.perf_counter()
    text = _load_text_tokenizer(cfg)
    opts = dict(cfg.tokenizer_options)
    if cfg.resolution:
        opts["resolution"] = cfg.resolution
    tok = load_job_tokenizer(cfg.tokenizer, opts)
    views = view_names(cfg.views)
    clip = _clip_config(cfg)
    if cfg.where:
        check_predicate(cfg.where)
    max_area, patch = _area_options(cfg, tok, clip)
    try:
        decode = DecodeConfig(resolution=decode_resolution(cfg.views, tok.resolution), resize_mode=cfg.resize_mode,
                              max_pixels=cfg.max_pixels, min_image_size=cfg.min_image_size, max_area=max_area,
                              patch=patch)
    except ValueError as e:
        raise UsageError(str(e)) from None
    codec = get_codec(cfg.codec, tok.vocab_size, **cfg.codec_params)
    plan = plan_sources(cfg.sources, cfg.shard_size, cfg.input_format, cfg.storage_options, split=cfg.split,
                        image_column=(cfg.columns or {}).get("image_column"))
    units = plan.units
    if not units:
        raise UsageError("no input found in " + " ".join(redact_url(s) for s in cfg.sources))
    schemas, all_tables = _table_schemas(units, cfg.storage_options)
    class_names = _class_names(schemas)
    _check_columns(cfg.columns or {}, units, schemas)
    if cfg.where and all_tables:
        _check_where_columns(cfg.where, schemas, marked_splits=any(u.split for u in units))
    layout = DatasetLayout.at(cfg.out, cfg.storage_options)
    identity = tok.identity()
    spec = JobSpec(tokshard=__version__, config=cfg.job_identity(), tokenizer_id=identity.tokenizer_id,
                   tokenizer_config_hash=identity.config_hash, codebook_hash=identity.codebook_hash,
                   text_tokenizer_sha256=None if text is None else text.sha256)
    job_hash = sha256_hex(canonical_json(spec.identity()))
    # The first reads and writes of the destination: a bucket that does not exist, denied
    # access or an endpoint that does not answer is one UsageError naming --out.
    with storage_access(cfg.out, DESTINATION_UNUSABLE, UsageError):
        _claim_destination(layout, spec, job_hash)
        clean_temporaries(layout.fs, layout.root)

    ctx = UnitContext(layout=layout, format=cfg.format, tokenizer=TokenizerInfo.of(tok), codec=codec,
                      decode=decode,
                      job_hash=job_hash, decode_workers=cfg.decode_workers,
                      storage_options=cfg.storage_options, columns=cfg.columns, views=cfg.views, clip=clip,
                      where=cfg.where,
                      clip_shape=_clip_shape(tok, clip), text=text)
    if codec.needs_fit:
        _fit_codec(ctx, tok, units, cfg.codec_fit_samples)
    with storage_access(cfg.out, DESTINATION_UNUSABLE, UsageError):  # first write of a resumed job
        files = _save_tokenizer(tok, layout)
        if text is not None:
            # A copy beside the shards: the ids decode with exactly this tokenizer, and repair finds it.
            atomic_write(layout.fs, layout.text_tokenizer, text.data)
            files[TEXT_TOKENIZER] = FileDigest.of(text.data)

    committed: dict[int, Receipt] = {}
    todo = []
    # Receipts are small objects, one per shard: on an object store, reading 100k+ of them
    # one after the other takes minutes, so they are read concurrently.
    with ThreadPoolExecutor(RECEIPT_READERS) as pool:
        found = list(pool.map(lambda u: load_receipt(u, ctx), units))
    for unit, receipt in zip(units, found):
        if receipt is None:
            todo.append(unit)
        else:
            committed[unit.index] = receipt
    progress = _Progress(len(units), len(committed), quiet)
    engine = engine_class(cfg.engine).from_config(cfg)
    job = EngineJob(ctx=ctx, tokenizer=tok, tokenizer_name=cfg.tokenizer,
                    tokenizer_options={k: v for k, v in opts.items() if k != "path"},
                    retry=RetryPolicy(cfg.retries))
    try:
        engine.run(todo, job, on_receipt=progress.receipt, on_failure=progress.failure)
    finally:
        progress.close()
    if progress.failures:
        raise JobError(_failure_message(progress.failures, len(units), len(committed) + len(progress.receipts)))
    for r in progress.receipts:
        committed[r.shard.unit] = r
    receipts = [committed[u.index] for u in units]
    done_before = len(units) - len(progress.receipts)

    rows = [r.shard for r in receipts]
    totals = {k: int(sum(getattr(r, k) for r in rows)) for k in
              ("samples", "tokens", "raw_bytes", "payload_bytes", "stored_bytes", "source_bytes", "skipped")}
    if text is not None:   # (keys only then: the totals of jobs without text tokens are unchanged)
        totals.update({k: int(sum(getattr(r, k) or 0 for r in rows)) for k in ("text_tokens", "no_caption")})
    skips: dict[str, int] = {}
    for row in rows:
        for item in row.skipped_by_reason:
            skips[item["reason"]] = skips.get(item["reason"], 0) + item["count"]
    if totals["samples"] == 0:
        # Never an empty dataset that looks fine: no manifest, and the reasons.
        why = ", ".join(f"{k}={v}" for k, v in sorted(skips.items())) or "the inputs hold no samples"
        ignored = Counter(reason for _, reason in plan.ignored)
        raise JobError(redact_text(
            f"converted nothing from {len(units)} unit(s): skipped {why}"
            + (f"; input files not read: {', '.join(f'{k}={v}' for k, v in sorted(ignored.items()))}"
               if ignored else "")
            + (f"; no sample had the --image-column {cfg.columns['image_column']!r} member"
               if (cfg.columns or {}).get("image_column") and skips.get("no_image") else "")
            + "; no manifest was written"))
    state = codec.state()
    if state is not None:
        files[CODEC_STATE] = FileDigest.of(state)
    files[LABELS] = FileDigest.of(write_labels(layout, receipts))
    record = DatasetRecord(
        schema_version=SCHEMA_VERSION, tokshard_version=__version__, format=cfg.format, codec=codec.describe(),
        tokenizer=TokenizerRecord(name=tok.name, tokenizer_id=identity.tokenizer_id,
                                  tokenizer_config_hash=identity.config_hash, codebook_hash=identity.codebook_hash,
                                  config=tok.config(), vocab_size=tok.vocab_size, path=TOKENIZER_DIR),
        grid=[] if ctx.variable_grid else list(tok.grid_shape), views=list(views),
        sample_shape=list(ctx.sample_shape),
        variable_grid=None if not ctx.variable_grid else {
            "resize_mode": "area", "max_pixels": decode.max_area, "patch": decode.patch,
            "max_tokens": decode.max_area // decode.patch ** 2},
        video=None if clip is None else {**asdict(clip), "tokenized": "per_clip" if ctx.clip_shape else "per_frame"},
        token_dtype=token_dtype(tok.vocab_size).name,
        decode=decode.to_dict(), sources=[redact_url(s) for s in cfg.sources], job_hash=job_hash,
        shards=len(rows), totals=totals, skipped_by_reason=dict(sorted(skips.items())),
        dropped_by_reason=_sum_reasons(row.dropped_by_reason or [] for row in rows),
        codec_state=CODEC_STATE if state is not None else None,
        codec_state_bytes=len(state or b""),
        labels=LABELS, files=dict(sorted(files.items())), class_names=class_names,
        ignored_inputs=dict(sorted(Counter(reason for _, reason in plan.ignored).items())) or None,
        text_tokenizer=None if text is None else TextTokenizerRecord(
            name=text.name, model=text.model, vocab_size=text.vocab_size, sha256=text.sha256,
            max_tokens=text.max_tokens, path=TEXT_TOKENIZER, dtype=TEXT_TOKEN_DTYPE.name),
    )
    write_manifest(layout, rows, record)
    write_timings(layout, receipts)
    elapsed = time.perf_counter() - started
    return {"dataset": record.to_dict(), "elapsed_s": elapsed, "units_reused": done_before,
            "ignored": [list(item) for item in plan.ignored]}


def _table_schemas(units: list[WorkUnit], storage_options: dict | None) -> tuple[dict[str, Any], bool]:
    """({url: Arrow schema} of the Parquet and Arrow sources: footers or schema messages, read
    once per file, concurrently; whether every unit is such a table, without a sidecar join:
    then the schemas say every field its samples can hold)."""
    readers = {"parquet": parquet_schema_of, "arrow": arrow_schema_of}
    files = list(dict.fromkeys((u.url, u.kind) for u in units if u.kind in readers))
    found = []
    if files:
        with ThreadPoolExecutor(RECEIPT_READERS) as pool:
            found = list(pool.map(lambda item: readers[item[1]](item[0], storage_options), files))
    all_tables = all(u.kind in readers and not u.metadata for u in units if u.kind != "unreadable")
    return {url: schema for (url, _), schema in zip(files, found)}, all_tables


# The unit kinds each column option applies to: a table's column, or (tars) the extension of
# the member that holds the image, caption or label. A folder's sidecars go by file name.
_COLUMN_KINDS = {"image_column": ("parquet", "arrow", "wds"), "caption_column": ("parquet", "arrow", "wds"),
                 "label_column": ("parquet", "arrow", "wds"), "key_column": ("parquet", "arrow")}


def _check_columns(columns: dict[str, str], units: list[WorkUnit], schemas: dict[str, Any]) -> None:
    """A column option that no input can apply (`--key-column` with only tars), or that names a
    column some table source lacks (a typo would otherwise read every caption as missing, or
    fail unit after unit), fails now, once, naming the file and the columns it has."""
    kinds = {u.kind for u in units if u.kind != "unreadable"}
    for option, name in sorted(columns.items()):
        if not name:
            continue
        flag = "--" + option.replace("_", "-")
        applies = _COLUMN_KINDS.get(option, ())
        if kinds and not kinds & set(applies):
            what = "Parquet or Arrow" if "wds" not in applies else "Parquet, Arrow or tar"
            raise UsageError(f"{flag} applies to {what} inputs; these inputs are "
                             f"{', '.join(sorted(kinds)).replace('wds', 'tars').replace('folder', 'folders')}")
        for url, schema in schemas.items():
            if name not in schema.names:
                raise UsageError(redact_text(f"{flag} {name!r}: {url} has no such column (columns: "
                                             f"{', '.join(schema.names)})")[:600])
    image, caption, label = (columns.get(f"{c}_column") for c in ("image", "caption", "label"))
    named = [n for n in (image, caption, label) if n]
    if len({n.lower() for n in named}) < len(named):
        raise UsageError("--image-column, --caption-column and --label-column name the same column")


def _check_where_columns(where: str, schemas: dict[str, Any], marked_splits: bool) -> None:
    """A --where that names a column none of the (table) sources has fails now, once, with the
    columns there are; not later, unit by unit."""
    named = referenced_columns(where)
    if not named:
        return
    known = {"key", "caption", "label"} | ({"split"} if marked_splits else set())
    for schema in schemas.values():
        known |= {name.lower() for name in schema.names}
    unknown = sorted(named - known)
    if unknown:
        raise UsageError(f"--where names {', '.join(repr(u) for u in unknown)}, which no source has "
                         f"(columns: {', '.join(sorted(known))})"[:600])


def _class_names(schemas: dict[str, Any]) -> dict[str, list[str]] | None:
    """{column: names} of the Hugging Face ClassLabel columns of the Parquet and Arrow sources;
    None when there are none. Two files that name one column's classes differently are
    refused: their labels would not mean the same."""
    names: dict[str, list[str]] = {}
    first: dict[str, str] = {}
    for url, schema in schemas.items():
        for column, values in class_names_of(schema).items():
            if column not in names:
                names[column], first[column] = values, url
            elif names[column] != values:
                raise UsageError(redact_text(
                    f"the sources disagree on the class names of column {column!r}: {first[column]} has "
                    f"{names[column]!r:.200}, {url} has {values!r:.200}; convert them separately"))
    return dict(sorted(names.items())) or None


def _sum_reasons(per_shard: Any) -> dict[str, int]:
    """{reason: count} over shards' [{"reason", "count"}] lists, reasons sorted."""
    out: Counter[str] = Counter()
    for items in per_shard:
        for item in items:
            out[item["reason"]] += item["count"]
    return dict(sorted(out.items()))


def _failure_message(failures: list[tuple[WorkUnit, UnitFailure]], units: int, committed: int) -> str:
    """The JobError's text; it names a source URL, so it goes through redaction."""
    return redact_text(_failure_text(failures, units, committed))


def _failure_text(failures: list[tuple[WorkUnit, UnitFailure]], units: int, committed: int) -> str:
    unit, first = failures[0]
    kept = (f"{committed} are committed and kept; the manifest is written when every shard is committed")
    if first.transient:
        return (f"{len(failures)} of {units} shards failed after {first.attempts} attempts (first: shard "
                f"{unit.index:06d} from {unit.url}: {first.error}); {kept}. Re-run the same command to "
                "retry the failed ones")
    return (f"{len(failures)} of {units} shards failed (first: shard {unit.index:06d} from {unit.url}: "
            f"{first.error}); not retried: the same input and config fail the same way. {kept}. Fix the "
            "cause, then re-run the same command")


def load_job_tokenizer(name: str, options: dict) -> Tokenizer:
    """The job's tokenizer; the default one without a `path` is the one fitted on the
    bundled photos (fitted on first use, then cached)."""
    if name == DEFAULT_TOKENIZER and not options.get("path"):
        options = {**options, "path": str(default_artifact())}
    return load_tokenizer(name, options)


def _clip_config(cfg: ConvertConfig) -> ClipConfig | None:
    if cfg.clip_frames is None:
        return None
    if cfg.views != "none":
        raise UsageError("--views applies to images; a video job stores clips")
    try:
        return ClipConfig(frames=cfg.clip_frames, fps=cfg.clip_fps, stride=cfg.clip_stride,
                          max_clips=cfg.max_clips)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _area_options(cfg: ConvertConfig, tok: Tokenizer, clip: ClipConfig | None) -> tuple[int, int]:
    """DecodeConfig's (max_area, patch) for --resize-mode area (variable grids), checked against
    the tokenizer and the other options; DecodeConfig's defaults for the other modes."""
    if cfg.resize_mode != "area":
        if cfg.max_area or cfg.patch is not None:
            raise UsageError("--max-pixels and --patch go with --resize-mode area (variable grids)")
        return _NO_AREA.max_area, _NO_AREA.patch
    if not cfg.max_area:
        raise UsageError("--resize-mode area needs --max-pixels P: the most pixels an image is resized to")
    patch = getattr(tok, "patch_size", None)
    if patch is None:
        raise UsageError(f"--resize-mode area: tokenizer {tok.name!r} encodes fixed {tuple(tok.grid_shape)} grids "
                         "only (it declares no patch_size; docs/tokenizers.md, variable grids)")
    if cfg.patch is not None and cfg.patch != patch:
        raise UsageError(f"--patch {cfg.patch}: tokenizer {tok.name!r} makes one token per {patch}x{patch} pixels")
    if cfg.resolution:
        raise UsageError("--resolution does not apply to --resize-mode area (--max-pixels sets the size)")
    if cfg.views != "none":
        raise UsageError("--views applies to fixed grids; --resize-mode area stores one view per image")
    if clip is not None:
        raise UsageError("--resize-mode area applies to images; a video job stores clips of one grid")
    return int(cfg.max_area), int(patch)


_NO_AREA = DecodeConfig()


def _clip_shape(tok: Tokenizer, clip: ClipConfig | None) -> tuple[int, ...] | None:
    """Codes of one clip from a clip (3-D) tokenizer; None: frame by frame."""
    if clip is None or not isinstance(tok, ClipTokenizer):
        return None
    try:
        return tuple(tok.clip_grid_shape(clip.frames))
    except ValueError as e:
        raise UsageError(f"tokenizer {tok.name}: {e}") from None


def _save_tokenizer(tok: Tokenizer, layout: DatasetLayout) -> dict[str, FileDigest]:
    """A copy of the tokenizer artifact inside the dataset, so it decodes on its own;
    returns the copy's files' digests, by dataset-relative path, for the record."""
    files = {}
    for rel, data in artifact_files(tok).items():
        atomic_write(layout.fs, layout.tokenizer_file(rel), data)
        files[f"{TOKENIZER_DIR}/{rel}"] = FileDigest.of(data)
    return files


def _claim_destination(layout: DatasetLayout, spec: JobSpec, job_hash: str) -> None:
    """Refuse to mix two different jobs in one destination."""
    try:
        found = read_job_spec(layout)
    except ManifestError as e:
        raise UsageError(redact_text(f"{layout.root} holds a damaged job spec ({e}); use a new --out "
                                     "(or delete it)")) from None
    if found is None:
        write_job_spec(layout, spec, job_hash)
        return
    previous, previous_hash = found
    if previous.codebook_hash != spec.codebook_hash:
        raise UsageError(f"{layout.root} holds tokens of a different tokenizer codebook "
                         f"({previous.tokenizer_id} {previous.codebook_hash[:12]}, now "
                         f"{spec.tokenizer_id} {spec.codebook_hash[:12]}): its codes would "
                         "not mean the same; use a new --out")
    if previous.text_tokenizer_sha256 != spec.text_tokenizer_sha256:
        raise UsageError(f"{layout.root} holds a dataset converted with "
                         f"{_text_side(previous.text_tokenizer_sha256)}, and this job has "
                         f"{_text_side(spec.text_tokenizer_sha256)}: its text token ids would not mean "
                         "the same; use a new --out")
    if previous_hash != job_hash:
        raise UsageError(f"{layout.root} holds a dataset made with a different config or tokenizer; "
                         "use a new --out (or delete it)")


def _text_side(sha256: str | None) -> str:
    return f"text tokenizer {sha256[:12]} (sha256)" if sha256 else "no --text-tokenizer"


def _fit_codec(ctx: UnitContext, tok: Tokenizer, units: list[WorkUnit], limit: int) -> None:
    """Train the codec's state on the first `limit` samples, once per destination."""
    layout = ctx.layout
    if layout.fs.exists(layout.codec_state):
        ctx.codec.load_state(layout.fs.cat_file(layout.codec_state))
        return
    samples: list[np.ndarray] = []
    dtype = token_dtype(ctx.tokenizer.vocab_size)
    for unit in units:
        batches, _ = tokenize_unit(unit, ctx, tok, limit=limit - len(samples))
        # Shaped (grid, views or frames): context-modelling codecs read the geometry from it.
        samples += [c.astype(dtype) for b in batches for c in b.codes]
        if len(samples) >= limit:
            break
    ctx.codec.fit(samples)
    state = ctx.codec.state()
    if state is None:  # fit() installs the state of every codec that needs one
        raise CodecError(f"codec {ctx.codec.name!r} has no state after fit")
    atomic_write(layout.fs, layout.codec_state, state)
