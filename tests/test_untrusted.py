"""A dataset from a hostile author: every path it names stays inside its root.

Each tamper is applied to a copy of a committed golden dataset (tests/golden),
next to a canary file outside the root whose bytes must not change and which
no reader may open (checked with an audit hook on `open`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import rewrite_manifest

import tokshard
from tokshard.errors import ManifestError, ShardError

GOLDEN = Path(__file__).parent / "golden" / "datasets"


class Opened:
    """Paths opened by this process while active (sys.addaudithook cannot be removed: it is
    installed once and switched on and off)."""
    active: list[str] | None = None

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.active is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            cls.active.append(os.fsdecode(args[0]))

    def __enter__(self) -> list[str]:
        Opened.active = []
        return Opened.active

    def __exit__(self, *exc: object) -> None:
        Opened.active = None


sys.addaudithook(Opened.hook)


@pytest.fixture()
def world(tmp_path):
    """(dataset copy, canary outside it holding a valid shard's bytes)."""
    ds = tmp_path / "root" / "ds"
    shutil.copytree(GOLDEN / "parquet-rans", ds)
    canary = tmp_path / "root" / "outside.parquet"
    canary.write_bytes((ds / "shards" / "000000.parquet").read_bytes())
    return ds, canary


def _check_untouched(canary: Path, before: bytes, opened: list[str]) -> None:
    assert canary.read_bytes() == before
    assert not [p for p in opened if os.path.realpath(p) == os.path.realpath(canary)]


@pytest.mark.parametrize("path", ["../outside.parquet", "/etc/hostname", "s3://other-bucket/x.parquet",
                                  "shards/../../outside.parquet", "shards\\..\\..\\outside.parquet", ""])
def test_a_shard_path_that_leaves_the_root_is_refused_at_open(world, path):
    ds, canary = world
    before = canary.read_bytes()
    rewrite_manifest(ds, rows=lambda rows: rows[0].update(path=path))
    with Opened() as opened, pytest.raises(ManifestError, match="manifest shard '000000': path"):
        tokshard.open(str(ds))
    _check_untouched(canary, before, opened)


def test_a_shard_name_that_leaves_the_root_is_refused(world):
    ds, canary = world
    rewrite_manifest(ds, rows=lambda rows: rows[0].update(shard="../../outside"))
    with pytest.raises(ManifestError, match="name"):
        tokshard.open(str(ds))


def test_a_symlinked_shard_is_refused_when_read_even_with_matching_bytes(world):
    ds, canary = world
    before = canary.read_bytes()
    shard = ds / "shards" / "000000.parquet"
    shard.unlink()
    shard.symlink_to(canary)                        # same bytes, same sha256: still outside
    d = tokshard.open(str(ds))
    with Opened() as opened, pytest.raises(ShardError, match="symbolic link") as e:
        d.shard(0)
    assert e.value.shard == "000000" and str(len(before)) not in str(e.value)
    _check_untouched(canary, before, opened)
    # The other shards still read; the loader can skip the bad one.
    assert len(d.shard(1)["key"]) > 0
    got = [k for b in d.loader(2, shuffle=False, rank=0, world_size=1, on_error="skip") for k in b["key"]]
    assert len(got) == len(d) - int(d.shard_sizes[0])


def test_a_symlinked_folder_inside_the_root_is_fine(world):
    ds, _ = world
    (ds / "shards").rename(ds / "real-shards")
    (ds / "shards").symlink_to(ds / "real-shards")
    d = tokshard.open(str(ds))
    assert sum(len(d.shard(i)["key"]) for i in range(d.num_shards)) == len(d)


@pytest.mark.parametrize("field,value", [("codec_state", "../outside.parquet"), ("codec_state", "/etc/hostname")])
def test_a_record_path_that_leaves_the_root_is_refused(world, field, value):
    ds, canary = world
    before = canary.read_bytes()
    rewrite_manifest(ds, record=lambda rec: rec.update({field: value}))
    with Opened() as opened, pytest.raises(ManifestError, match=f"record.{field}"):
        tokshard.open(str(ds))
    _check_untouched(canary, before, opened)


def test_a_tokenizer_path_that_leaves_the_root_is_refused(world, tmp_path):
    ds, canary = world
    outside = tmp_path / "root" / "tok"
    shutil.copytree(ds / "tokenizer", outside)
    rewrite_manifest(ds, record=lambda rec: rec["tokenizer"].update(path="../tok"))
    with Opened() as opened, pytest.raises(ManifestError, match="record.tokenizer.path"):
        tokshard.open(str(ds))      # every path in the record is checked at open
    assert not [p for p in opened if str(outside) in os.path.realpath(p)]


def test_wrong_types_in_the_record_are_one_typed_error(world):
    ds, _ = world
    for tamper in (lambda r: r.update(grid="16x16"), lambda r: r["tokenizer"].update(vocab_size="many"),
                   lambda r: r.update(totals={"samples": "8"}), lambda r: r.update(views=[1, 2]),
                   lambda r: r.update(codec=["zstd"]), lambda r: r.update(tokenizer=None)):
        shutil.copy(GOLDEN / "parquet-rans" / "manifest.parquet", ds / "manifest.parquet")
        rewrite_manifest(ds, record=tamper)
        with pytest.raises(ManifestError, match="field"):
            tokshard.open(str(ds))


@pytest.mark.xdist_group("golden")   # the golden sources live at one fixed path
def test_a_receipt_pointing_outside_is_redone_not_followed(world, tmp_path):
    """A tampered receipt makes its unit uncommitted: the re-run redoes it and writes the real shard."""
    sys.path.insert(0, str(Path(__file__).parent / "golden"))
    import make
    ds, canary = world
    before = canary.read_bytes()
    receipt = ds / "_work" / "units" / "000000.json"
    doc = json.loads(receipt.read_text())
    doc["shard"]["path"] = "../outside.parquet"
    doc["shard"]["stored_bytes"] = len(before)
    receipt.write_text(json.dumps(doc))
    _golden_sources()
    with Opened() as opened:
        result = make.convert_golden("parquet-rans", ds, Path(__file__).parent / "golden" / "tokenizer")
    assert result["units_reused"] == 2
    _check_untouched(canary, before, opened)
    assert (ds / "manifest.parquet").read_bytes() == (GOLDEN / "parquet-rans" / "manifest.parquet").read_bytes()



def test_a_codec_state_larger_than_the_record_says_is_refused_before_it_is_read(world):
    ds, _ = world
    state = ds / "codec" / "state.bin"
    with open(state, "ab") as f:
        f.truncate(64 * 2**20)                      # sparse: 64 MiB the record does not account for
    with Opened() as opened, pytest.raises(ManifestError, match="codec/state.bin has 67108864 bytes"):
        tokshard.open(str(ds))
    assert str(state) not in [os.path.realpath(p) for p in opened]    # sized, never read


def test_a_tokenizer_file_linked_outside_the_root_is_refused(world, tmp_path):
    ds, canary = world
    before = canary.read_bytes()
    weights = ds / "tokenizer" / "model.safetensors"
    weights.unlink()
    weights.symlink_to(canary)
    with Opened() as opened, pytest.raises(ManifestError, match=r"record.tokenizer.path \(model.safetensors\)"):
        tokshard.open(str(ds)).tokenizer()
    _check_untouched(canary, before, opened)


@pytest.mark.xdist_group("golden")   # repair re-reads the golden sources at their fixed path
def test_verify_reports_paths_that_leave_the_root_and_repair_writes_the_shard_where_it_belongs(world):
    from tokshard.pipeline.tools.verify import repair, verify
    ds, canary = world
    before = canary.read_bytes()
    shard = ds / "shards" / "000001.parquet"
    shard.unlink()
    shard.symlink_to(canary)
    rewrite_manifest(ds, rows=lambda rows: rows[2].update(path="../outside.parquet"))
    with Opened() as opened:
        checked, problems = verify(str(ds))
    assert checked == 3
    assert {(p.shard, "symbolic link" in p.what or "leaves the dataset root" in p.what) for p in problems} == \
        {("000001", True), ("000002", True), ("-", False)}   # and the real 000002 file, now unlisted
    _check_untouched(canary, before, opened)
    _golden_sources()
    with Opened() as opened:
        repair(str(ds), problems)
    _check_untouched(canary, before, opened)
    assert not (ds / "shards" / "000001.parquet").is_symlink()
    assert verify(str(ds)) == (3, [])
    assert (ds / "manifest.parquet").read_bytes() == (GOLDEN / "parquet-rans" / "manifest.parquet").read_bytes()


def _golden_sources() -> None:
    """The golden datasets' sources, at the fixed path their records name."""
    sys.path.insert(0, str(Path(__file__).parent / "golden"))
    import make
    if make.SOURCE_ROOT.exists():
        shutil.rmtree(make.SOURCE_ROOT)
    shutil.copytree(Path(__file__).parent / "golden" / "source", make.SOURCE_ROOT)
