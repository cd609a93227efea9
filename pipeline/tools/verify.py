"""`tokshard verify`: does the dataset hold exactly what its manifest says?

`--quick` checks files: every shard the manifest lists exists with its size and
sha256, and so does its sample-index file; the label table, the codec state and
the tokenizer copy match the digests the record holds (schema 1.3); no shard or
index file lies in the dataset that the manifest does not list. The full check
(the default) also reads every shard: it parses, holds the number of samples the
manifest says, and every payload decodes; each index row names its own shard,
the right row and that row's key and label; the label table's counts are the
shards' own.

`--repair` re-converts the shards that fail, from the sources, and rewrites
the label table with the manifest. Repair re-runs the dataset's own job (its job
spec) with the tokenizer copy stored in the dataset, after forgetting the bad
shards' receipts: the convert job's exactly-once machinery redoes only those, and
the manifest it rewrites is byte-identical when the sources are unchanged. A codec
state that fails is removed and fitted again (the fit is deterministic); a tokenizer
copy that fails cannot be rebuilt from the sources.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from tokshard.errors import ManifestError, TokshardError, UsageError
from tokshard.pipeline.format.integrity import check_tree, file_problem, read_checked
from tokshard.pipeline.format.layout import INDEX_DIR, JOB_SPEC, MANIFEST, SHARDS_DIR, DatasetLayout
from tokshard.pipeline.format.manifest import check_record_paths, check_shards, read_record
from tokshard.pipeline.format.work import forget_receipt, read_job_spec
from tokshard.pipeline.storage import read_parquet_bytes, redact_url
from tokshard.schemas.records import FileDigest

if TYPE_CHECKING:
    from tokshard.pipeline.stream.dataset import TokenDataset
    from tokshard.schemas.records import DatasetRecord

# Problem.unit for a dataset-wide file: -1 is rewritten with the manifest by --repair
# (or removed, when the manifest does not list it); -2 cannot be rebuilt from the sources.
DATASET_FILE = -1
NOT_REPAIRABLE = -2
# The label table and codec state are small (readers cap them lower); verify reads them whole.
MAX_DATASET_FILE_BYTES = 2**30


@dataclass
class Problem:
    shard: str      # the shard it belongs to, or "-" for a dataset-wide file
    path: str
    unit: int       # the shard's unit; DATASET_FILE or NOT_REPAIRABLE for a dataset-wide file
    what: str


def verify(url: str, storage_options: dict | None = None, *, quick: bool = False) -> tuple[int, list[Problem]]:
    """(shards checked, problems found). `quick`: files only (sizes and sha256s)."""
    layout = DatasetLayout.at(url, storage_options)
    # The store as it is now, not as this process last listed it (fsspec caches listings and
    # object versions: a file replaced since would read as expired).
    layout.fs.invalidate_cache()
    table, record, _ = read_record(layout, url)
    problems: list[Problem] = []
    cols = ["shard", "path", "unit", "stored_bytes", "sha256"]
    cols += [c for c in ("index_bytes", "index_sha256") if c in table.column_names]
    rows = table.select(cols).to_pylist()
    whole = [row for row in rows if not _check_files(layout, row, problems)]
    _check_manifest(layout, table, record, url, problems)
    _check_dataset_files(layout, record, rows, problems)
    if not quick and not any(p.path == record.codec_state for p in problems):
        # (With a codec state that fails, nothing can be decoded: its repair comes first.)
        _check_contents(url, storage_options, {row["shard"] for row in whole}, problems)
    for name, fld in sorted((record.fields or {}).items()):
        if any(p.path.startswith(fld.path + "/") for p in problems):
            continue            # (its manifest is not the one the record pins: reported above)
        # A token field is a dataset of its own: checked as one. Its shards are rebuilt by
        # add-tokens (which redoes the units whose shards fail), not by this repair.
        _, found = verify(url.rstrip("/") + "/" + fld.path, storage_options, quick=quick)
        problems += [Problem(p.shard, f"{fld.path}/{p.path}", NOT_REPAIRABLE,
                             f"token field {name!r}: {p.what} (tokshard add-tokens ... --as {name} rebuilds it)")
                     for p in found]
    return len(rows), problems


def _check_files(layout: DatasetLayout, row: dict[str, Any], problems: list[Problem]) -> bool:
    """Shard `row`'s file and index file against the manifest; True if a problem was found."""
    name, unit = row["shard"], row["unit"]
    found = len(problems)
    where = f"manifest shard {name!r:.40}"
    index = layout.index_rel(name) if isinstance(name, str) else str(name)
    try:
        path = layout.resolve(row["path"], f"{where}: path")
        index_path = layout.resolve(index, f"{where}: name")
    except ManifestError as e:
        # Never followed, never described: the re-convert writes the shard where it belongs.
        problems.append(Problem(str(name), str(row["path"]), unit, str(e)))
        return True
    what = file_problem(layout, path, FileDigest(row["stored_bytes"], row["sha256"]))
    if what:
        problems.append(Problem(name, row["path"], unit, what))
    want = row.get("index_sha256")
    # A raw row (verify reports what open would refuse): a size of another type reads as a mismatch.
    index_digest = None if want is None else FileDigest(cast(int, row.get("index_bytes")), want)
    what = file_problem(layout, index_path, index_digest)
    if what:
        problems.append(Problem(name, index, unit, ("sample index " if what == "missing" else "sample index: ")
                                + what))
    return len(problems) > found


def _check_manifest(layout: DatasetLayout, table: Any, record: DatasetRecord, url: str,
                    problems: list[Problem]) -> None:
    """What every reader checks before it trusts the manifest (`read_valid`): record paths,
    counts, totals, token counts. A shard path already reported above is not repeated."""
    try:
        check_record_paths(layout, record)
    except ManifestError as e:
        # The record names where the tokenizer copy is: the sources cannot say where it went.
        unit = NOT_REPAIRABLE if "record.tokenizer.path" in str(e) else DATASET_FILE
        problems.append(Problem("-", MANIFEST, unit, str(e)))
    try:
        check_shards(layout, table, record, url)
    except ManifestError as e:
        if not any(p.what == str(e) for p in problems):
            problems.append(Problem("-", MANIFEST, DATASET_FILE, str(e)))


def _check_dataset_files(layout: DatasetLayout, record: DatasetRecord, rows: list[dict[str, Any]],
                         problems: list[Problem]) -> None:
    """The label table, codec state and tokenizer copy against the record; files in shards/
    and samples/ that the manifest does not list."""
    for rel, field in ((record.labels, "record.labels"), (record.codec_state, "record.codec_state")):
        if not rel:
            continue
        try:
            data = read_checked(layout, rel, field, record.files.get(rel), limit=MAX_DATASET_FILE_BYTES)
            if rel == record.labels:
                read_parquet_bytes(data)
        except FileNotFoundError:
            problems.append(Problem("-", rel, DATASET_FILE, "missing"))
        except ManifestError as e:
            problems.append(Problem("-", rel, DATASET_FILE, str(e)))
        except Exception as e:          # an unparsable label table
            problems.append(Problem("-", rel, DATASET_FILE, f"unreadable ({type(e).__name__})"))
    _check_text_tokenizer(layout, record, problems)
    try:
        for what in check_tree(layout, record.tokenizer.path, record.files):
            problems.append(Problem("-", record.tokenizer.path, NOT_REPAIRABLE, f"tokenizer copy: {what}"))
    except ManifestError as e:
        if not any(p.what == str(e) for p in problems):     # (a path already reported above)
            problems.append(Problem("-", str(record.tokenizer.path), NOT_REPAIRABLE, str(e)))
    listed = {str(row["path"]) for row in rows} | {layout.index_rel(row["shard"]) for row in rows
                                                   if isinstance(row["shard"], str)}
    for folder in (SHARDS_DIR, INDEX_DIR):
        for rel in _files_under(layout, folder):
            if rel not in listed:
                problems.append(Problem("-", rel, DATASET_FILE, "not listed in the manifest (a stray or "
                                        "orphaned file; --repair removes it)"))


def _check_text_tokenizer(layout: DatasetLayout, record: DatasetRecord, problems: list[Problem]) -> None:
    """The text tokenizer copy against the record: its digest, and the sha256 the record names.
    Like the tokenizer copy, the sources cannot rebuild it."""
    from tokshard.tokenizers.text import MAX_TEXT_TOKENIZER_BYTES
    text = record.text_tokenizer
    if text is None:
        return
    try:
        data = read_checked(layout, text.path, "record.text_tokenizer.path", record.files.get(text.path),
                            limit=MAX_TEXT_TOKENIZER_BYTES)
        if hashlib.sha256(data).hexdigest() != text.sha256:
            problems.append(Problem("-", text.path, NOT_REPAIRABLE, "text tokenizer copy: not the one the record "
                                    f"names (sha256 {text.sha256[:16]}...)"))
    except FileNotFoundError:
        problems.append(Problem("-", text.path, NOT_REPAIRABLE, "text tokenizer copy missing"))
    except ManifestError as e:
        if not any(p.what == str(e) for p in problems):     # (a path already reported above)
            problems.append(Problem("-", text.path, NOT_REPAIRABLE, str(e)))


def _files_under(layout: DatasetLayout, folder: str) -> list[str]:
    """Dataset-relative paths of the files in `folder` (not recursing: shards and indexes are flat)."""
    path = layout.resolve(folder, folder)
    try:
        found = layout.fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in found)
    return [f"{folder}/{n}" for n in names if not n.startswith(".")]


def _check_contents(url: str, storage_options: dict | None, whole: set[str], problems: list[Problem]) -> None:
    """Parse and decode every shard whose files are whole; compare each index with its shard."""
    from tokshard.pipeline.stream.dataset import TokenDataset
    try:
        ds = TokenDataset(url, storage_options=storage_options, verify=True)
    except TokshardError as e:
        # A manifest that does not open as a dataset (counts that lie, a path found above):
        # --repair rewrites it from the receipts of the units it keeps or redoes.
        if not any(p.what == str(e) for p in problems):
            problems.append(Problem("-", MANIFEST, DATASET_FILE, f"does not open: {e}"))
        return
    counts: dict[str, Counter[int]] = {}
    for i, name in enumerate(ds.shard_names):
        if name not in whole:
            continue
        unit = int(ds.manifest.column("unit")[i].as_py())
        what = _check_shard(ds, i, counts)
        if what:
            problems.append(Problem(name, ds.shard_paths[i], unit, what))
    if ds.info.labels and not any(p.path == ds.info.labels for p in problems):
        _check_labels(ds, whole, counts, problems)


def _check_shard(ds: TokenDataset, i: int, counts: dict[str, Counter[int]]) -> str | None:
    """What is wrong with shard `i`'s contents or its index, or None; counts its labels."""
    from tokshard.schemas.v1 import GRID_COLUMNS, SAMPLES
    name = ds.shard_names[i]
    try:
        cols = ds.read_shard(i)
        ds.decode_tokens(cols["tokens"], cols["id"], cols.get("grid"))
        index = ds.read_index(i)
    except TokshardError as e:
        return str(e)
    missing = [c for c in ("key", "shard", "row", "label") if c not in index.column_names]
    if missing:
        return f"sample index lacks columns {missing}"
    index_columns = index.column_names
    index_grid = {c: index.column(c) for c in GRID_COLUMNS if c in index_columns}
    try:
        index = index.select(SAMPLES.names).cast(SAMPLES)
    except Exception as e:
        return f"sample index has columns of the wrong type ({type(e).__name__})"
    n = len(cols)
    if index.num_rows != n:
        return f"sample index has {index.num_rows} rows, the shard holds {n} samples"
    shard_col = index.column("shard").to_pylist()
    bad = next((r for r, s in enumerate(shard_col) if s != name), None)
    if bad is not None:
        return f"sample index row {bad} names shard {shard_col[bad]!r:.40}"
    rows = index.column("row").fill_null(-1).to_numpy()
    if not np.array_equal(rows, np.arange(n)):
        bad = int(np.flatnonzero(rows != np.arange(n))[0])
        return f"sample index row {bad} points at row {int(rows[bad])}"
    keys = index.column("key").to_pylist()
    bad = next((r for r in range(n) if keys[r] != cols["key"][r]), None)
    if bad is not None:
        return f"sample index row {bad} says key {keys[bad]!r:.60}, the shard holds {cols['key'][bad]!r:.60}"
    labels = index.column("label").to_pylist()
    bad = next((r for r in range(n) if (-1 if labels[r] is None else labels[r]) != int(cols["label"][r])), None)
    if bad is not None:
        return f"sample index row {bad} says label {labels[bad]}, the shard holds {int(cols['label'][bad])}"
    if "grid" in cols:     # a variable-grid dataset: the index's grids are what the loader plans with
        if not all(c in index_columns for c in GRID_COLUMNS):
            return "sample index lacks the grid columns"
        grid = np.stack([index_grid[c].fill_null(0).to_numpy() for c in GRID_COLUMNS], axis=1)
        bad = next((r for r in range(n) if tuple(grid[r]) != tuple(cols["grid"][r])), None)
        if bad is not None:
            return (f"sample index row {bad} says grid {grid[bad].tolist()}, the shard holds "
                    f"{cols['grid'][bad].tolist()}")
    counts[name] = Counter(v for v in labels if v is not None)
    return None


def _check_labels(ds: TokenDataset, whole: set[str], counts: dict[str, Counter[int]],
                  problems: list[Problem]) -> None:
    """The label table holds each shard's label counts, as the shards themselves do."""
    from tokshard.pipeline.tools.query import _labels
    rel = str(ds.info.labels)
    try:
        table = _labels(ds.layout, ds.info, ds.url)
    except TokshardError as e:
        problems.append(Problem("-", rel, DATASET_FILE, str(e)))
        return
    stored: dict[str, Counter[int]] = {}
    for shard, label, count in zip(*(table.column(c).to_pylist() for c in ("shard", "label", "count"))):
        stored.setdefault(shard, Counter())[label] += count
    unknown = sorted(set(stored) - set(ds.shard_names), key=str)
    if unknown:
        problems.append(Problem("-", rel, DATASET_FILE, f"names shard {unknown[0]!r:.40}, which the manifest "
                                "does not list"))
        return
    for name in sorted(counts):       # shards checked above (whole, index matching)
        if stored.get(name, Counter()) != counts[name]:
            problems.append(Problem("-", rel, DATASET_FILE, f"its counts for shard {name} are not the "
                                    "shard's own labels"))
            return


def repair(url: str, problems: list[Problem], storage_options: dict | None = None, quiet: bool = True,
           trust_tokenizer_code: bool = False, sources: list[str] | None = None,
           announce: Callable[[list[str]], None] | None = None) -> dict:
    """Re-convert the shards in `problems` from the dataset's sources, with the dataset's
    tokenizer copy (one whose format runs code only with `trust_tokenizer_code`).

    The sources are those the job spec names (`announce` is called with them first: they
    may be any file or URL, read with your credentials), or `sources`: the same URLs as
    you can read them (presigned anew, with the credentials the job spec's redacted copy
    lacks); other sources would be another job and are refused."""
    from tokshard.pipeline.convert.job import ConvertConfig, convert
    from tokshard.pipeline.stream.dataset import check_tokenizer_trust
    from tokshard.tokenizers.registry import tokenizer_class
    stuck = [p for p in problems if p.unit == NOT_REPAIRABLE]
    if stuck:
        raise UsageError(f"{url}: {stuck[0].path}: {stuck[0].what}; this cannot be rebuilt from the sources "
                         "(re-convert them into a new --out with the original tokenizer)")
    layout = DatasetLayout.at(url, storage_options)
    fs = layout.fs
    try:
        found = read_job_spec(layout)
    except ManifestError:
        found = None
    if found is None:
        raise UsageError(f"{url} has no readable {JOB_SPEC}: cannot tell how it was converted")
    job = found[0].config
    if sources is not None:
        if [redact_url(s) for s in sources] != job.get("sources"):
            raise UsageError("--sources must be the job's own sources, as you can read them (the same URLs, "
                             "presigned anew or with credentials): the job spec names "
                             + ", ".join(map(str, job.get("sources") or [])))
    elif announce is not None:
        announce(list(job.get("sources") or []))
    _, record, _ = read_record(layout, url)
    check_tokenizer_trust(tokenizer_class(record.tokenizer.name), url, trust_tokenizer_code)
    tokenizer_dir = layout.resolve_tree(record.tokenizer.path, "record.tokenizer.path")
    forget(layout, problems)
    with tempfile.TemporaryDirectory(prefix="tokshard-repair-") as tmp, \
            tempfile.TemporaryDirectory(prefix="tokshard-repair-text-") as text_tmp:
        # The dataset's own tokenizer copy: same weights, so the same job hash.
        fs.get(tokenizer_dir + "/", tmp + "/", recursive=True)
        text = {}
        if record.text_tokenizer is not None:
            # The dataset's own text tokenizer copy (verify checked it): the same sha256, so the same job.
            local = _text_copy_path(text_tmp, record.text_tokenizer.name)
            fs.get(layout.resolve(record.text_tokenizer.path, "record.text_tokenizer.path"), local)
            text = {"text_tokenizer": local}
        cfg = ConvertConfig(**{**job, "out": url, "storage_options": storage_options,
                               **({"sources": list(sources)} if sources is not None else {}),
                               "tokenizer_options": {**job.get("tokenizer_options", {}), "path": tmp}, **text})
        return convert(cfg, quiet=quiet)


def forget(layout: DatasetLayout, problems: list[Problem]) -> None:
    """Remove what `problems` name and their shards' receipts, so the convert job redoes those
    units: a shard's receipt goes with its files; a dataset-wide file (the label table) is
    rewritten from the receipts with the manifest. A path that leaves the root is not touched:
    the re-convert writes the shard where it belongs."""
    fs = layout.fs
    for p in problems:
        try:
            # The manifest is never removed: the re-convert replaces it atomically.
            path = layout.removable(p.path) if p.path != MANIFEST else None
        except ManifestError:
            path = None
        if path is not None and (fs.exists(path) or os.path.islink(path)):
            fs.rm_file(path)
        if p.unit >= 0:
            try:
                forget_receipt(layout, p.shard)
            except ManifestError:
                pass                # a shard name that leaves the root has no receipt of ours


def _text_copy_path(tmp: str, name: str) -> str:
    """Where repair puts the text tokenizer copy: at `tmp`/<folder>/<file> of the name the record
    gives (the name is taken from the path the job read), so the rewritten record is the same.
    A name that is not two plain path parts (a record may come from anyone) gets a plain one."""
    parts = name.split("/")
    plain = all(p and p not in (".", "..") and os.sep not in p and "\\" not in p and "\0" not in p for p in parts)
    if not plain or len(parts) > 2:
        parts = ["text", "tokenizer.json"]
    os.makedirs(os.path.join(tmp, *parts[:-1]), exist_ok=True)
    return os.path.join(tmp, *parts)
