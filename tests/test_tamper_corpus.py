"""A table-driven corpus of tampered datasets, crossed with every entry point a reader has.

One small real dataset (Parquet shards, the rans-ctx codec so there is a codec state,
labels so labels.parquet is not empty, three shards) is converted once. Each tamper is
applied to a fresh copy of it, which sits next to an `outside/` folder of canaries: copies
of a shard, an index file, the label table, the codec state, the tokenizer and the
sources, plus random bytes. Tampers that point out of the root point at those copies,
so a read through them would be seen.

Every entry point (`tokshard.open`, iterating, the loader with 0 and 2 workers,
`ds.tokenizer()`, `info`, `verify`, `query`, `lookup`, `where=`, `report`, `preview`)
then either raises a typed error (`tokshard.errors.TokshardError`) or returns exactly
what it returns on the untampered dataset; `verify` must report a problem instead, and
`report` may also leave out the reconstructions when it says why (docs/security.md).
Around each call:

- no file outside the root is opened: an audit hook on `open` (this process) and
  inotify on the canary folders (any process: DataLoader workers, DuckDB's and Arrow's
  own file reads, which the audit hook cannot see);
- no file outside the root is written: the canaries keep their bytes, and nothing
  is created, changed or removed next to the root;
- memory stays bounded: the call's peak RSS (the kernel's high-water mark, reset before
  each call; a DataLoader worker's peak too) stays within a cap over the RSS before it.

A test collects every failing entry point of its tamper before it fails, one line each.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import io
import json
import math
import os
import resource
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import convert_config, rewrite_manifest

import tokshard
from tokshard.errors import TokshardError

SHARD_SIZE = 7                      # 19 photos -> shards of 7, 7 and 5
RSS_GROWTH_CAP = 256 * 2**20        # peak RSS of one call (or of its workers) over the RSS before it
PREVIEW_N = 4
LOADER = dict(shuffle=False, rank=0, world_size=1)

pytestmark = pytest.mark.xdist_group("tamper")     # one worker converts the dataset and computes the oracle


# -- watching what is opened ------------------------------------------------------------------

class Opened:
    """(event, path) of files this process opens, renames or removes while active.
    sys.addaudithook cannot be removed: it is installed once and switched on and off."""
    active: list[tuple[str, str]] | None = None
    EVENTS = ("open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.truncate",
              "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.link", "os.chmod", "os.utime")

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.active is None or event not in cls.EVENTS or not args:
            return
        for arg in args[:2] if event in ("os.rename", "os.symlink", "os.link", "shutil.copyfile",
                                         "shutil.move") else args[:1]:
            if isinstance(arg, (str, bytes, os.PathLike)):
                try:
                    cls.active.append((event, os.fsdecode(arg)))
                except (TypeError, ValueError):
                    pass


sys.addaudithook(Opened.hook)

IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x1, 0x2, 0x4, 0x8
IN_OPEN, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x20, 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_ISDIR = 0x400, 0x800, 0x40000000
WRITES = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE \
    | IN_DELETE_SELF | IN_MOVE_SELF
READS = IN_ACCESS | IN_OPEN


class Inotify:
    """Linux inotify through ctypes: file events on watched folders from any process."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.watches: dict[int, Path] = {}

    def watch(self, folder: Path, mask: int) -> None:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
        self.watches[wd] = folder

    def events(self) -> list[tuple[Path, str, int]]:
        out: list[tuple[Path, str, int]] = []
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out
            i = 0
            while i + 16 <= len(buf):
                wd, mask, _, size = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16:i + 16 + size].rstrip(b"\0").decode(errors="replace")
                out.append((self.watches.get(wd, Path("?")), name, mask))
                i += 16 + size

    def close(self) -> None:
        os.close(self.fd)


# -- the dataset and its surroundings ---------------------------------------------------------

@dataclass
class World:
    """A tampered copy of the dataset (`root`) and the canaries next to it (`outside`)."""
    base: Path
    root: Path
    outside: Path
    out: Path            # where report writes its page: outside the root, and allowed

    @property
    def url(self) -> str:
        return str(self.root)


def make_world(base: Path, pristine: Path, src: Path) -> World:
    root, outside, out = base / "ds", base / "outside", base.parent / f"{base.name}-out"
    shutil.copytree(pristine, root, symlinks=True)
    outside.mkdir()
    out.mkdir()
    shutil.copy(root / "shards" / "000000.parquet", outside / "shard.parquet")
    shutil.copy(root / "samples" / "000000.parquet", outside / "index.parquet")
    shutil.copy(root / "labels.parquet", outside / "labels.parquet")
    shutil.copy(root / "codec" / "state.bin", outside / "state.bin")
    shutil.copytree(root / "tokenizer", outside / "tok")
    shutil.copytree(src, outside / "src")
    (outside / "canary.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    return World(base, root, outside, out)


def canary_digests(world: World) -> dict[str, str]:
    return {str(p.relative_to(world.outside)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(world.outside.rglob("*")) if p.is_file()}


# -- entry points: each returns a value comparable across copies of the dataset ------------------

def norm(x: Any, root: str) -> Any:
    """`x` made comparable: arrays to (dtype, shape, bytes), the root's path to <ROOT>."""
    import torch
    if isinstance(x, torch.Tensor):
        x = x.numpy()
    if isinstance(x, np.ndarray):
        return (str(x.dtype), x.shape, x.tobytes()) if x.dtype != object else tuple(norm(v, root) for v in x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return tuple(sorted((str(k), norm(v, root)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(norm(v, root) for v in x)
    if isinstance(x, str):
        return x.replace(root, "<ROOT>")
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return x


def e_open(w: World) -> Any:
    ds = tokshard.open(w.url)
    return (len(ds), ds.num_shards, ds.shard_names, ds.grid, ds.vocab_size, ds.codec.name, ds.shard_sizes)


def e_iterate(w: World) -> Any:
    return [(i, key, tokens, label) for i, key, tokens, label in tokshard.open(w.url)]


def _epoch(loader: Any) -> list:
    batches = iter(loader)
    try:
        rows = [(int(i), k, t.numpy(), int(lab)) for b in batches
                for i, k, t, lab in zip(b["id"], b["key"], b["tokens"], b["label"])]
    finally:
        batches.close()         # a failed epoch shuts its DataLoader's workers down now, in this process
    return sorted(rows, key=lambda r: r[0])


def e_loader0(w: World) -> Any:
    return _epoch(tokshard.open(w.url).loader(4, num_workers=0, **LOADER))


def e_loader2(w: World) -> Any:
    try:
        return _epoch(tokshard.open(w.url).loader(4, num_workers=2, multiprocessing_context="fork", **LOADER))
    finally:
        gc.collect()            # no DataLoader of this call is left for a later fork's worker to collect


def e_tokenizer(w: World) -> Any:
    tok = tokshard.open(w.url).tokenizer()
    codes = (np.arange(2 * 64).reshape(2, 8, 8) * 7) % 64
    return (type(tok).__name__, tok.decode(codes), tok.codebook())


def _cli(argv: list[str]) -> Any:
    from tokshard.jobs.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    if rc == 2 and err.getvalue().startswith("tokshard: error:"):
        raise CliError(err.getvalue().strip())         # the CLI's word for a TokshardError
    return rc, out.getvalue()


class CliError(TokshardError):
    """A typed error the CLI caught and printed (exit status 2)."""


def e_info(w: World) -> Any:
    return _cli(["info", w.url])


def e_info_json(w: World) -> Any:
    return _cli(["info", "--json", w.url])


def e_verify(w: World) -> Any:
    from tokshard.pipeline.tools.verify import verify
    checked, problems = verify(w.url)
    return checked, [(p.shard, p.path, p.unit, p.what) for p in problems]


def _query(sql: str) -> Callable[[World], Any]:
    def run(w: World) -> Any:
        from tokshard.pipeline.tools.query import run
        return run(w.url, sql)
    return run


def _lookup(which: int) -> Callable[[World], Any]:
    def run(w: World) -> Any:
        from tokshard.pipeline.tools.query import lookup
        return lookup(w.url, KEYS[which])
    return run


def _plain(sample: dict) -> dict:
    return {**sample, "tokens": sample["tokens"].tolist()}


def _get(which: int) -> Callable[[World], Any]:
    def run(w: World) -> Any:
        return _plain(tokshard.open(w.url).get(KEYS[which]))
    return run


def e_random_access(w: World) -> Any:
    ds = tokshard.open(w.url)
    return [_plain(ds[i]) for i in range(len(ds))]


def e_split(w: World) -> Any:
    part, rest = tokshard.open(w.url).split(0.5, seed=1)
    return part.keys, rest.keys


def e_where_label(w: World) -> Any:
    return _epoch(tokshard.open(w.url).loader(4, where="label IN (1, 2)", **LOADER))


def e_where_scan(w: World) -> Any:
    from tokshard.pipeline.tools.query import select_rows
    return select_rows(w.url, "key IS NOT NULL")


PREVIEW_SECTION = '<h2 id="preview">'
REFUSED_PREVIEW = PREVIEW_SECTION + "Reconstructions</h2><p>not shown: "


def e_report(w: World) -> Any:
    """(the page up to its reconstructions, the reconstructions: the section, or REFUSED when the
    page says why there are none, the file written holds the page). A report whose tokenizer
    copy is refused has every section but the reconstructions, and says why (docs/security.md)."""
    from tokshard.pipeline.tools.report import write_report
    out = w.out / "report.html"
    page = write_report(w.url, str(out), PREVIEW_N)
    head, found, tail = page.partition(PREVIEW_SECTION)
    preview = "REFUSED" if (found + tail).startswith(REFUSED_PREVIEW) else found + tail
    return head, preview, out.read_text(encoding="utf-8") == page


def report_as_it_was_or_without_reconstructions(got: Any, oracle: Any) -> bool:
    return got == oracle or (got[0] == oracle[0] and got[1] == "REFUSED" and got[2])


def e_preview(w: World) -> Any:
    from tokshard.pipeline.tools.preview import reconstruct
    return reconstruct(tokshard.open(w.url), PREVIEW_N)


KEYS: list[str] = []     # a key of each shard, set by the fixture: first of 0, middle of 1, last of 2

ENTRY_POINTS: dict[str, Callable[[World], Any]] = {
    "open": e_open, "iterate": e_iterate, "loader-nw0": e_loader0, "loader-nw2": e_loader2,
    "tokenizer": e_tokenizer, "info": e_info, "info-json": e_info_json, "verify": e_verify,
    "query-shards": _query("SELECT * FROM shards ORDER BY shard"),
    "query-samples": _query("SELECT * FROM samples ORDER BY shard, row, key"),
    "query-labels": _query("SELECT shard, label, count FROM labels ORDER BY shard, label, count"),
    "query-dataset": _query("SELECT * FROM dataset"),
    "lookup-0": _lookup(0), "lookup-1": _lookup(1), "lookup-2": _lookup(2),
    "get-0": _get(0), "get-1": _get(1), "get-2": _get(2), "random-access": e_random_access, "split": e_split,
    "where-label": e_where_label, "where-scan": e_where_scan, "report": e_report, "preview": e_preview,
}


# -- running one entry point under watch --------------------------------------------------------

@dataclass
class Outcome:
    value: Any = None
    error: str | None = None       # "Type: message" of what it raised (never the exception: see run)
    typed: bool = False             # what it raised is a TokshardError
    opened_outside: list[str] | None = None
    touched: list[str] | None = None
    canaries_changed: list[str] | None = None
    rss_growth: int = 0


def _real(p: str) -> str:
    return os.path.realpath(p)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _children_peak() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


class Peak:
    """How far one call's peak RSS rose over the RSS before it: the kernel's high-water mark
    is reset first (/proc/self/clear_refs), so this is the call's own peak, C allocations
    (Arrow, DuckDB) included; a worker it forked and reaped counts by its own peak RSS
    (which starts at this process's, shared pages and all)."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass                                    # the lifetime peak then: a new one still shows
        self.rss, self.hwm, self.children = _status("VmRSS"), _status("VmHWM"), _children_peak()

    def growth(self) -> int:
        hwm, children = _status("VmHWM"), _children_peak()
        mine = hwm - self.rss if hwm > self.hwm else 0     # no new peak: never above the RSS before
        return max(mine, children - self.rss if children > self.children else 0)


class Watcher:
    """Runs entry points on `world`, recording what each opened or wrote outside the root."""

    def __init__(self, world: World, tmp_base: Path):
        self.world = world
        self.root = _real(str(world.root))
        self.out = _real(str(world.out))
        self.tmp_base = _real(str(tmp_base))        # pytest's base temp: the pristine copy, sources, tokenizer
        self.canaries = canary_digests(world)
        self.inotify: Inotify | None
        try:
            self.inotify = Inotify()
            for folder in [world.outside, *(p for p in world.outside.rglob("*") if p.is_dir())]:
                self.inotify.watch(folder, READS | WRITES)
            self.inotify.watch(world.base, READS | WRITES)
        except OSError:
            self.inotify = None                     # no inotify here: the audit hook and the canaries remain

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()

    def _outside_root(self, path: str) -> bool:
        real = _real(path)
        if _inside(real, self.root) or _inside(real, self.out):
            return False
        # Anything of the test's own (the canaries, the pristine dataset, its sources and tokenizer)
        # that is not the root is outside; so is any other file a tamper could name.
        return _inside(real, self.tmp_base) or not any(_inside(real, p) for p in ALLOWED)

    def run(self, fn: Callable[[World], Any]) -> Outcome:
        got = Outcome()
        if self.inotify is not None:
            self.inotify.events()                   # drop anything from before
        peak = Peak()
        Opened.active = []
        try:
            got.value = norm(fn(self.world), str(self.world.root))
        except Exception as e:                      # judged below: typed or not
            # Kept as text: the exception's traceback would keep a failed DataLoader alive in a
            # reference cycle, to be collected later inside a forked worker of the next loader.
            got.error, got.typed = f"{type(e).__name__}: {e}", isinstance(e, TokshardError)
        finally:
            opened, Opened.active = Opened.active, None
        got.rss_growth = peak.growth()
        got.opened_outside = sorted({f"{event} {p}" for event, p in opened if self._outside_root(p)})
        touched = []
        if self.inotify is not None:
            for folder, name, mask in self.inotify.events():
                if folder == self.world.base and name in ("ds", "") and not mask & WRITES:
                    continue                        # the root itself listed or opened
                kind = "write" if mask & WRITES else "read"
                touched.append(f"{kind} {folder / name} (mask {mask:#x})")
        got.touched = sorted(set(touched))
        now = canary_digests(self.world)
        got.canaries_changed = sorted(k for k in set(now) | set(self.canaries) if now.get(k) != self.canaries.get(k))
        if self.inotify is not None:
            self.inotify.events()                   # our own reads of the canaries
        return got


ALLOWED = sorted({_real(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                     str(Path(tokshard.__file__).resolve().parent.parent),
                                     str(Path(__file__).resolve().parent),
                                     "/proc", "/sys", "/dev", "/usr", "/lib", "/lib64")}
                | {_real(p) for p in sys.path if p and os.path.isdir(p)})


def summary(x: Any, limit: int = 160) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[:limit] + "..."


def first_difference(a: Any, b: Any, path: str = "") -> str:
    """Where two normalised results first differ, in a few words."""
    if type(a) is not type(b):
        return f"{path or 'value'}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, tuple):
        if len(a) != len(b):
            return f"{path or 'value'}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
    if isinstance(a, str) and isinstance(b, str):
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        a, b = a[max(0, at - 30):at + 50], b[max(0, at - 30):at + 50]
    return f"{path or 'value'}: {summary(a, 90)} vs {summary(b, 90)}"


def judge(entry: str, got: Outcome, oracle: Any, must_flag: bool) -> list[str]:
    """What is wrong with `got` for a tampered dataset (`must_flag`: verify must see it)."""
    bad = []
    if got.error is not None and not got.typed:
        bad.append(f"untyped {summary(got.error, 240)}")
    elif got.error is None:
        if entry == "verify" and must_flag:
            if not got.value[1]:
                bad.append("verify reports no problem")
        elif got.value != oracle and not (entry == "report" and
                                          report_as_it_was_or_without_reconstructions(got.value, oracle)):
            bad.append(f"a different result, not an error ({first_difference(got.value, oracle)})")
    if got.opened_outside:
        bad.append(f"opened outside the root: {', '.join(got.opened_outside)[:300]}")
    if got.touched:
        bad.append(f"touched outside the root: {', '.join(got.touched)[:300]}")
    if got.canaries_changed:
        bad.append(f"canaries changed: {got.canaries_changed}")
    if got.rss_growth > RSS_GROWTH_CAP:
        bad.append(f"peak RSS grew {got.rss_growth / 2**20:.0f} MiB")
    return bad


# -- the untampered dataset and its results -----------------------------------------------------

@dataclass
class Pristine:
    root: Path
    src: Path
    tmp_base: Path
    oracle: dict[str, Any]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tokenizer_dir, photo_jpegs) -> Pristine:
    from tokshard.pipeline.convert.job import convert
    base = tmp_path_factory.mktemp("tamper")
    src = base / "src"
    src.mkdir()
    pq.write_table(pa.table({"key": [k for k, _, _ in photo_jpegs], "jpg": [d for _, d, _ in photo_jpegs],
                             "label": [lab for _, _, lab in photo_jpegs]}), src / "photos.parquet")
    root = base / "pristine"
    convert(convert_config([src], root, tokenizer_dir, format="parquet", codec="rans-ctx", shard_size=SHARD_SIZE),
            quiet=True)
    ds = tokshard.open(str(root))
    assert ds.num_shards == 3 and (root / "codec" / "state.bin").exists() and len(ds) == len(photo_jpegs)
    keys = [ds.shard(i)["key"] for i in range(3)]
    KEYS[:] = [keys[0][0], keys[1][len(keys[1]) // 2], keys[2][-1]]
    tmp_base = tmp_path_factory.getbasetemp()
    world = make_world(base / "oracle", root, src)
    watcher = Watcher(world, tmp_base)
    oracle = {}
    try:
        for name, fn in ENTRY_POINTS.items():
            got = watcher.run(fn)
            assert got.error is None, f"{name} on the untampered dataset: {got.error}"
            assert not (got.opened_outside or got.touched or got.canaries_changed), (name, got)
            assert got.rss_growth <= RSS_GROWTH_CAP, (name, got.rss_growth)
            oracle[name] = got.value
    finally:
        watcher.close()
    assert oracle["verify"] == (3, ())
    assert oracle["report"][1] != "REFUSED" and oracle["report"][2]
    assert oracle["loader-nw0"] == oracle["loader-nw2"]
    assert len(oracle["where-label"]) == sum(lab in (1, 2) for _, _, lab in photo_jpegs) > 0
    return Pristine(root, src, tmp_base, oracle)


# -- the tampers ----------------------------------------------------------------------------------

def flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def link_out(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def rewrite_index(path: Path, edit: Callable[[dict], None]) -> None:
    table = pq.read_table(path)
    cols = table.to_pydict()
    edit(cols)
    pq.write_table(pa.Table.from_pydict(cols, schema=table.schema), path)


def rotate(values: list) -> list:
    return values[1:] + values[:1]


def set_job_sources(w: World, sources: list[str]) -> None:
    spec = w.root / "_work" / "job.json"
    doc = json.loads(spec.read_text())
    doc["config"]["sources"] = sources
    spec.write_text(json.dumps(doc, indent=2, sort_keys=True))


def shard_rows(edit: Callable[[list[dict]], None], record: Callable[[dict], None] | None = None,
               ) -> Callable[[World], None]:
    return lambda w: rewrite_manifest(w.root, rows=edit, record=record)


def record(edit: Callable[[dict], None]) -> Callable[[World], None]:
    return lambda w: rewrite_manifest(w.root, record=edit)


def add_samples(rows: list[dict], i: int, n: int) -> None:
    rows[i]["samples"] += n


def add_total(n: int) -> Callable[[dict], None]:
    return lambda rec: rec["totals"].update(samples=rec["totals"]["samples"] + n)


def overflow(rows: list[dict]) -> None:
    rows[0]["samples"] = 2**62


def labels_counts(w: World) -> None:
    path = w.root / "labels.parquet"
    table = pq.read_table(path)
    counts = table.column("count").to_pylist()
    counts[0] += 5
    pq.write_table(table.set_column(table.schema.get_field_index("count"), "count", pa.array(counts, pa.int64())),
                   path)


def garbage(rel: str, size: int = 4096) -> Callable[[World], None]:
    return lambda w: (w.root / rel).write_bytes(np.random.default_rng(1).bytes(size))


def orphan_index(rename: bool) -> Callable[[World], None]:
    def apply(w: World) -> None:
        shutil.copy(w.root / "samples" / "000000.parquet", w.root / "samples" / "999999.parquet")
        if rename:
            rewrite_index(w.root / "samples" / "999999.parquet",
                          lambda c: c.update(shard=["999999"] * len(c["shard"])))
    return apply


def tokenizer_weights_flipped(w: World) -> None:
    flip(w.root / "tokenizer" / "model.safetensors", 0.9)      # in the weights: it still loads


@dataclass(frozen=True)
class Tamper:
    id: str
    apply: Callable[[World], None]
    verify_must_flag: bool = True      # False: nothing the dataset's digests cover changed


TAMPERS = [
    # shards
    Tamper("shard-path-dotdot", shard_rows(lambda r: r[0].update(path="../outside/shard.parquet"))),
    Tamper("shard-path-absolute", lambda w: rewrite_manifest(
        w.root, rows=lambda r: r[0].update(path=str(w.outside / "shard.parquet")))),
    Tamper("shard-path-s3", shard_rows(lambda r: r[0].update(path="s3://other-bucket/shards/000000.parquet"))),
    Tamper("shard-symlink-outside", lambda w: link_out(w.root / "shards" / "000000.parquet",
                                                       w.outside / "shard.parquet")),
    Tamper("shard-bytes-flipped", lambda w: flip(w.root / "shards" / "000001.parquet")),
    Tamper("shard-truncated", lambda w: (w.root / "shards" / "000001.parquet").write_bytes(
        (w.root / "shards" / "000001.parquet").read_bytes()[:1000])),
    # the manifest's counts
    Tamper("samples-plus-one", shard_rows(lambda r: add_samples(r, 0, 1), add_total(1))),
    Tamper("samples-minus-one", shard_rows(lambda r: add_samples(r, 1, -1), add_total(-1))),
    Tamper("totals-mismatch", record(add_total(1))),
    Tamper("samples-overflow", shard_rows(overflow, add_total(2**62 - SHARD_SIZE))),
    # the record's types
    Tamper("grid-as-string", record(lambda r: r.update(grid="8x8"))),
    Tamper("vocab-size-as-string", record(lambda r: r["tokenizer"].update(vocab_size="64"))),
    Tamper("codec-as-list", record(lambda r: r.update(codec=["rans-ctx"]))),
    # a JSON escape that spells a lone surrogate: text no printer or writer can encode
    Tamper("record-lone-surrogate", record(lambda r: r.update(skipped_by_reason={"decode_error\udc80": 1}))),
    # the codec state
    Tamper("codec-state-flipped", lambda w: flip(w.root / "codec" / "state.bin")),
    Tamper("codec-state-truncated", lambda w: (w.root / "codec" / "state.bin").write_bytes(
        (w.root / "codec" / "state.bin").read_bytes()[:-64])),
    Tamper("codec-state-grown", lambda w: (w.root / "codec" / "state.bin").write_bytes(
        (w.root / "codec" / "state.bin").read_bytes() + bytes(64))),
    Tamper("codec-state-path-outside", record(lambda r: r.update(codec_state="../outside/state.bin"))),
    Tamper("codec-state-symlink-outside", lambda w: link_out(w.root / "codec" / "state.bin",
                                                             w.outside / "state.bin")),
    # the label table
    Tamper("labels-counts-changed", labels_counts),
    Tamper("labels-garbage", garbage("labels.parquet")),
    Tamper("labels-symlink-outside", lambda w: link_out(w.root / "labels.parquet", w.outside / "labels.parquet")),
    Tamper("labels-path-dotdot", record(lambda r: r.update(labels="../outside/labels.parquet"))),
    # the sample index
    Tamper("index-keys-rotated", lambda w: rewrite_index(w.root / "samples" / "000000.parquet",
                                                         lambda c: c.update(key=rotate(c["key"])))),
    Tamper("index-unknown-shard", lambda w: rewrite_index(w.root / "samples" / "000000.parquet",
                                                          lambda c: c["shard"].__setitem__(0, "000099"))),
    Tamper("index-row-out-of-range", lambda w: rewrite_index(w.root / "samples" / "000000.parquet",
                                                             lambda c: c["row"].__setitem__(0, 10_000))),
    Tamper("index-deleted", lambda w: (w.root / "samples" / "000001.parquet").unlink()),
    Tamper("index-garbage", garbage("samples/000000.parquet")),
    Tamper("index-orphan-copy", orphan_index(rename=False)),
    Tamper("index-orphan-renamed", orphan_index(rename=True)),
    Tamper("index-symlink-outside", lambda w: link_out(w.root / "samples" / "000000.parquet",
                                                       w.outside / "index.parquet")),
    # the tokenizer copy
    Tamper("tokenizer-weights-flipped", tokenizer_weights_flipped),
    Tamper("tokenizer-file-symlink-outside", lambda w: link_out(w.root / "tokenizer" / "model.safetensors",
                                                                w.outside / "tok" / "model.safetensors")),
    Tamper("tokenizer-path-outside", record(lambda r: r["tokenizer"].update(path="../outside/tok"))),
    # the job spec: its sources are outside the root by nature; no reader may read them by default
    Tamper("job-sources-outside", lambda w: set_job_sources(w, [str(w.outside / "src")]),
           verify_must_flag=False),
    Tamper("job-sources-dotdot", lambda w: set_job_sources(w, ["../outside/src"]), verify_must_flag=False),
]


# -- the tests ------------------------------------------------------------------------------------

def run_all(world: World, p: Pristine, must_flag: bool) -> list[str]:
    watcher = Watcher(world, p.tmp_base)
    failures = []
    try:
        for name, fn in ENTRY_POINTS.items():
            got = watcher.run(fn)
            bad = judge(name, got, p.oracle[name], must_flag)
            failures += [f"{name}: {b}" for b in bad]
    finally:
        watcher.close()
    return failures


def test_the_untampered_dataset_reads_the_same_from_every_copy(pristine, tmp_path):
    world = make_world(tmp_path / "world", pristine.root, pristine.src)
    failures = run_all(world, pristine, must_flag=False)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("tamper", TAMPERS, ids=lambda t: t.id)
def test_a_tampered_dataset_is_refused_or_read_as_it_was(pristine, tamper, tmp_path):
    world = make_world(tmp_path / "world", pristine.root, pristine.src)
    tamper.apply(world)
    failures = run_all(world, pristine, tamper.verify_must_flag)
    assert not failures, f"{tamper.id}:\n" + "\n".join(failures)


def test_the_watch_sees_what_it_must(pristine, tmp_path):
    """The harness itself: a read outside the root from Python, from C++ (Arrow) and from a
    forked process, a write next to the root, and a large allocation are all seen."""
    world = make_world(tmp_path / "world", pristine.root, pristine.src)

    def python_read(w: World) -> Any:
        return (w.outside / "canary.bin").read_bytes()[:1]

    def arrow_read(w: World) -> Any:
        import pyarrow.fs
        local = pyarrow.fs.LocalFileSystem()
        with local.open_input_stream(str(w.outside / "labels.parquet")) as f:
            return f.read(4)

    def forked_read(w: World) -> Any:
        pid = os.fork()
        if pid == 0:
            try:
                with open(w.outside / "state.bin", "rb") as f:
                    f.read(1)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)

    def write_beside(w: World) -> Any:
        (w.base / "beside.txt").write_text("x")

    def allocate(w: World) -> Any:
        return int(np.ones(RSS_GROWTH_CAP // 8 + 2**24).sum())

    watcher = Watcher(world, pristine.tmp_base)
    try:
        got = {fn.__name__: watcher.run(fn) for fn in (python_read, arrow_read, forked_read, write_beside, allocate)}
    finally:
        watcher.close()
    assert got["python_read"].opened_outside and got["python_read"].touched
    assert got["arrow_read"].touched and not got["arrow_read"].opened_outside     # C++: inotify only
    assert got["forked_read"].touched
    assert any(t.startswith("write") for t in got["write_beside"].touched)
    assert got["allocate"].rss_growth > RSS_GROWTH_CAP
    assert all(g.error is None for g in got.values()), {k: g.error for k, g in got.items()}
