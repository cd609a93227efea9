"""`tokshard add-tokens DEST --tokenizer NAME --as FIELD`: a second tokenizer's codes for the
same samples, beside the dataset's own, without rewriting a shard of it (issue 17).

The field is a token dataset of its own at `DEST/fields/FIELD/`, made by the convert job
itself from the dataset's job spec (the same sources, selection, views and shard plan; only
the tokenizer, its resolution and the codec differ): so it is planned, resumed, retried and
verified as any dataset is, and its shards are the dataset's shards, unit for unit. Once it
is complete, every shard's keys are checked against the dataset's, row for row; only then
does the dataset's record name the field (its tokenizer's identity, grid and codec) and pin
its manifest's sha256, which is the one change to the dataset: its manifest is rewritten with
the same shard rows and the record extended.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from tokshard.errors import JobError, TokshardError, UsageError
from tokshard.pipeline.format.layout import MANIFEST, DatasetLayout
from tokshard.pipeline.format.manifest import read_record, write_manifest
from tokshard.pipeline.format.work import read_job_spec
from tokshard.pipeline.storage import redact_url
from tokshard.schemas.records import FIELD_NAME, FieldRecord, FileDigest, ShardEntry


def check_field_name(name: str) -> str:
    """`name`, if a token field may take it: the loader delivers a field under its name, so
    not one of the keys a batch already carries (`loader.BATCH_KEYS`)."""
    from tokshard.pipeline.stream.loader import BATCH_KEYS
    if not isinstance(name, str) or not FIELD_NAME.fullmatch(name) or name in BATCH_KEYS:
        raise UsageError(f"--as {name!r:.40}: a field name is [a-z][a-z0-9_]{{0,31}} and not one of the batch's "
                         f"own keys ({', '.join(sorted(BATCH_KEYS))})")
    return name


def add_tokens(url: str, field: str, tokenizer: str, tokenizer_options: dict | None = None, *,
               codec: str = "zstd", codec_params: dict | None = None, resolution: int | None = None,
               storage_options: dict | None = None, sources: list[str] | None = None,
               decode_workers: int | None = None, engine: str = "local", quiet: bool = True,
               announce: Callable[[list[str]], None] | None = None) -> dict:
    """Add `tokenizer`'s codes of the dataset at `url`'s samples as field `field`; returns
    {"field": the field dataset's convert result, "record": the dataset's new record}.

    The sources are those the job spec names (`announce` is called with them first), or
    `sources`: the same URLs as you can read them (presigned anew, with credentials)."""
    from tokshard.pipeline.convert.config import ConvertConfig, default
    from tokshard.pipeline.convert.job import convert
    check_field_name(field)
    layout = DatasetLayout.at(url, storage_options)
    _, record, _ = read_record(layout, url)     # a dataset, and one this version reads
    if record.variable_grid is not None:
        # Another tokenizer's patch makes other grids, and a shard's samples come in the order of
        # its by-size batches: the field's rows would not line up with the dataset's.
        raise UsageError(f"{url} has variable grids (--resize-mode area): token fields apply to datasets of one grid")
    found = read_job_spec(layout)
    if found is None:
        raise UsageError(f"{url} has no readable job spec: cannot tell how it was converted, so no field can "
                         "be made for its samples")
    job = dict(found[0].config)
    if sources is not None and [redact_url(s) for s in sources] != job.get("sources"):
        raise UsageError("--sources must be the dataset's own sources, as you can read them: the job spec names "
                         + ", ".join(map(str, job.get("sources") or [])))
    if sources is None and announce is not None:
        announce(list(job.get("sources") or []))
    rel = DatasetLayout.field_rel(field)
    layout.resolve(rel, "--as")                     # (a name cannot leave the root; a link there cannot either)
    out = url.rstrip("/") + "/" + rel
    # The dataset's job, with the new tokenizer: its own resolution unless given, its codec,
    # no text tokens (the dataset has them already, if any).
    job.pop("max_text_tokens", None)
    cfg = ConvertConfig(**{**job, "out": out, "storage_options": storage_options,
                           **({"sources": list(sources)} if sources is not None else {}),
                           "tokenizer": tokenizer, "tokenizer_options": dict(tokenizer_options or {}),
                           "resolution": resolution, "codec": codec, "codec_params": dict(codec_params or {}),
                           "decode_workers": default("decode_workers") if decode_workers is None else decode_workers,
                           "engine": engine})
    _forget_damaged(out, storage_options)
    try:
        result = convert(cfg, quiet=quiet)
    except UsageError as e:
        if field in (record.fields or {}) and "use a new --out" in str(e):
            raise UsageError(f"the dataset already has a field {field!r}, made with another tokenizer or settings "
                             f"({e}); add this one under another --as") from None
        raise
    _check_aligned(url, out, storage_options, field)
    return {"field": result, "record": _register(layout, url, field, rel, storage_options).to_dict()}


def _forget_damaged(out: str, storage_options: dict | None) -> None:
    """A field made before: the shards whose files no longer match its manifest are forgotten,
    so the convert job redoes them (it trusts a receipt whose shard has the recorded size)."""
    from tokshard.pipeline.tools.verify import forget, verify
    sub = DatasetLayout.at(out, storage_options)
    if not sub.fs.exists(sub.manifest):
        return
    try:
        _, problems = verify(out, storage_options, quick=True)
    except TokshardError:
        return                  # no readable manifest: the job rewrites it
    forget(sub, [p for p in problems if p.unit >= 0])


def _check_aligned(url: str, out: str, storage_options: dict | None, field: str) -> None:
    """The field's shards are the dataset's, row for row: same names, counts and keys."""
    from tokshard.pipeline.stream.access import all_keys
    from tokshard.pipeline.stream.dataset import TokenDataset
    ds, fld = TokenDataset(url, storage_options=storage_options), TokenDataset(out, storage_options=storage_options)
    if ds.shard_names != fld.shard_names or list(ds.shard_sizes) != list(fld.shard_sizes):
        raise JobError(f"field {field!r}: its shards ({fld.num_shards}, {len(fld):,} samples) are not the dataset's "
                       f"({ds.num_shards}, {len(ds):,}): the sources changed since the dataset was converted; "
                       "the field is not added")
    mine, theirs = all_keys(ds), all_keys(fld)
    if mine != theirs:
        at = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        raise JobError(f"field {field!r}: sample {at} is {theirs[at]!r:.60} in the field, {mine[at]!r:.60} in the "
                       "dataset: the sources changed since the dataset was converted; the field is not added")


def _register(layout: DatasetLayout, url: str, field: str, rel: str, storage_options: dict | None) -> Any:
    """The dataset's manifest again, its shard rows as they were (read now, not before the
    field's conversion), the record naming the field and pinning its manifest."""
    table, record, _ = read_record(layout, url)
    sub_url = url.rstrip("/") + "/" + rel
    sub = DatasetLayout.at(sub_url, storage_options)
    _, sub_record, _ = read_record(sub, sub_url)
    data = sub.fs.cat_file(sub.manifest)
    entry = FieldRecord(path=rel, tokenizer=sub_record.tokenizer, grid=list(sub_record.grid),
                        codec=str(sub_record.codec.get("name")))
    new = dataclasses.replace(record, fields={**(record.fields or {}), field: entry},
                              files={**record.files, f"{rel}/{MANIFEST}": FileDigest.of(data)})
    where = f"{url}/{MANIFEST}"
    rows = [ShardEntry.from_dict(r, where) for r in table.to_pylist()]
    write_manifest(layout, rows, new)
    return new
