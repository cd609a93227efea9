"""The WebDataset tar reader on what real producers and damaged files give it (issue 15):
composite extensions and --image-column, .tar.gz, per-sample isolation of bad sidecars and
names, and nothing lost without a count (links, duplicates, unknown members, corrupt headers).

Well-formed inputs are written with webdataset's own TarWriter; malformed ones with tarfile."""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from tokshard.pipeline.convert.sources import WorkUnit, read_unit
from tokshard.pipeline.convert.sources.records import Record, clean_json, parse_json


@pytest.fixture(scope="module")
def jpgs(photo_jpegs):
    """Three different real JPEGs."""
    return [data for _, data, _ in photo_jpegs[:3]]


def write_wds(path: Path, samples: list[dict], **kw) -> Path:
    with wds.TarWriter(str(path), mtime=0, **kw) as sink:
        for s in samples:
            sink.write(s)
    return path


def write_tar(path: Path, members: list[tuple]) -> Path:
    """members: (name, bytes) regular files, or (name, "sym"|"hard"|"dir", target)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for m in members:
            info = tarfile.TarInfo(m[0])
            if isinstance(m[1], bytes):
                info.size = len(m[1])
                t.addfile(info, io.BytesIO(m[1]))
                continue
            info.type = {"sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "dir": tarfile.DIRTYPE}[m[1]]
            info.linkname = m[2] if len(m) > 2 else ""
            t.addfile(info)
    return path


def read(path: Path, **columns) -> list[Record]:
    return list(read_unit(WorkUnit(0, "wds", str(path)), **columns))


def skips(records) -> Counter:
    return Counter(r.skip for r in records if r.skip)


def drops(records) -> Counter:
    return Counter(d for r in records for d in r.dropped)


# ---------------------------------------------------------------- webdataset's rules

def test_composite_extensions_and_image_column(tmp_path, jpgs):
    """Pair datasets (`KEY.input.jpg` + `KEY.target.jpg`): the first media member in member
    order is the image and the other is counted; --image-column picks one by extension."""
    path = write_wds(tmp_path / "pairs.tar", [
        {"__key__": f"s{i}", "input.jpg": jpgs[i], "target.jpg": jpgs[i + 1], "txt": f"cap {i}",
         "json": {"i": i}, "cls": i} for i in range(2)])
    plain = read(path)
    assert [(r.key, r.image, r.caption, r.label, r.meta, r.dropped, r.skip) for r in plain] == [
        (f"s{i}", jpgs[i], f"cap {i}", i, {"i": i}, ["extra_media"], None) for i in range(2)]
    target = read(path, image_column="target.jpg")
    assert [(r.key, r.image, r.dropped) for r in target] == [(f"s{i}", jpgs[i + 1], ["extra_media"]) for i in range(2)]
    missing = read(path, image_column="output.jpg")
    assert skips(missing) == {"no_image": 2} and drops(missing) == {"extra_media": 4}


def test_caption_and_label_members_can_be_chosen(tmp_path, jpgs):
    """--caption-column/--label-column name the member that is the caption or the label
    (`caption.txt`, `label.cls`); the `txt`/`cls` members they displace are carried as text."""
    path = write_tar(tmp_path / "cols.tar", [
        m for i in range(2) for m in ((f"s{i}.jpg", jpgs[i]), (f"s{i}.txt", f"short {i}".encode()),
                                      (f"s{i}.caption.txt", f"long caption {i}".encode()),
                                      (f"s{i}.cls", str(i).encode()), (f"s{i}.label.cls", str(10 + i).encode()))])
    default = read(path)
    assert [(r.caption, r.label, r.meta, r.dropped) for r in default] == [
        (f"short {i}", i, {"caption.txt": f"long caption {i}", "label.cls": str(10 + i)}, []) for i in range(2)]
    chosen = read(path, caption_column="caption.txt", label_column="LABEL.cls")
    assert [(r.caption, r.label, r.meta, r.dropped) for r in chosen] == [
        (f"long caption {i}", 10 + i, {"txt": f"short {i}", "cls": str(i)}, []) for i in range(2)]
    missing = read(path, caption_column="prompt.txt")   # no such member: no caption, nothing lost
    assert [(r.caption, sorted(r.meta)) for r in missing] == [(None, ["caption.txt", "label.cls", "txt"])] * 2


@pytest.mark.parametrize("json_first", [True, False])
def test_a_text_member_that_replaces_a_json_field_is_counted(tmp_path, jpgs, json_first):
    """`KEY.url` and a `url` field in `KEY.json`: the member wins in either member order, and
    the JSON field it replaced is counted (duplicate_member), not lost silently."""
    members = [("a.json", b'{"url": "json-url", "w": 1}'), ("a.url", b"member-url")]
    path = write_tar(tmp_path / "a.tar", [("a.jpg", jpgs[0]), *(members if json_first else members[::-1])])
    (rec,) = read(path)
    assert (rec.meta, rec.dropped, rec.skip) == ({"url": "member-url", "w": 1}, ["duplicate_member"], None)


def test_tar_gz_and_tgz_read_like_tar(tmp_path, jpgs):
    samples = [{"__key__": f"k{i}", "jpg": jpgs[i], "txt": f"c{i}", "cls": i} for i in range(3)]
    plain = read(write_wds(tmp_path / "a.tar", samples))
    for name in ("a.tar.gz", "a.tgz"):
        path = write_wds(tmp_path / name, samples, compress=True)
        assert path.read_bytes()[:2] == b"\x1f\x8b"
        got = read(path)
        assert [(r.key, r.image, r.caption, r.label, r.skip) for r in got] == \
            [(r.key, r.image, r.caption, r.label, r.skip) for r in plain] == \
            [(f"k{i}", jpgs[i], f"c{i}", i, None) for i in range(3)]


# ---------------------------------------------------------------- one bad sample costs one field

def test_bad_sidecars_cost_their_field_not_the_sample(tmp_path, jpgs):
    deep = b"[" * 100_000 + b"]" * 100_000
    nested = b"[" * 80 + b"1" + b"]" * 80          # parses, but deeper than JSON_MAX_DEPTH
    weird = b'{"a": NaN, "b": [Infinity, -Infinity, 1e999999, 1.5], "c": {"d": "x\\udc80y"}, "e": 7}'
    cases = {
        "deep": {"json": deep},
        "nested": {"json": nested},
        "invalid": {"json": b"{not json\xff"},
        "nonfinite": {"json": weird},
        "array": {"json": b"[1, 2]"},
        "big_label": {"cls": b"9223372036854775808"},
        "min_label": {"cls": b"-9223372036854775808\n"},
        "text_label": {"cls": b"cat"},
        "float_label": {"cls": b"3.5"},
        "latin1_caption": {"txt": b"caf\xe9 ok"},
    }
    path = write_wds(tmp_path / "bad.tar", [{"__key__": k, "jpg": jpgs[0], **v} for k, v in cases.items()])
    got = {r.key: r for r in read(path)}
    assert set(got) == set(cases) and all(r.skip is None and r.image == jpgs[0] for r in got.values())
    want = {   # key: (meta, label, caption, dropped)
        "deep": (None, None, None, ["deep_metadata"]),
        "nested": (None, None, None, ["deep_metadata"]),
        "invalid": (None, None, None, ["invalid_metadata"]),
        "nonfinite": ({"a": None, "b": [None, None, None, 1.5], "c": {"d": "x\ufffdy"}, "e": 7}, None, None,
                      ["nonfinite_number"] * 4 + ["non_utf8_text"]),
        "array": ({"value": [1, 2]}, None, None, []),
        "big_label": (None, None, None, ["bad_label"]),
        "min_label": (None, -(2 ** 63), None, []),
        "text_label": (None, None, None, ["bad_label"]),
        "float_label": (None, None, None, ["bad_label"]),
        "latin1_caption": (None, None, "caf\ufffd ok", ["non_utf8_text"]),
    }
    assert {k: (r.meta, r.label, r.caption, sorted(r.dropped)) for k, r in got.items()} == \
        {k: (m, lab, c, sorted(d)) for k, (m, lab, c, d) in want.items()}
    # What is stored is strict JSON.
    strict = json.dumps(got["nonfinite"].meta, allow_nan=False)
    assert json.loads(strict)["b"][3] == 1.5


def test_clean_json_is_bounded_and_counts(tmp_path):
    rec = Record("k", None, "src")
    value = {"x": [math.nan, {"y": math.inf}], 3: "ok", "z": ("a", -math.inf)}
    assert clean_json(value, rec) == {"x": [None, {"y": None}], "3": "ok", "z": ["a", None]}
    assert rec.dropped == ["nonfinite_number"] * 3
    deep: list = []
    for _ in range(200):
        deep = [deep]
    rec = Record("k", None, "src")
    assert clean_json({"a": deep, "b": math.nan}, rec) is None and rec.dropped == ["deep_metadata"]
    rec = Record("k", None, "src")
    assert parse_json("1e999999", rec) is None and rec.dropped == ["nonfinite_number"]


def test_non_utf8_member_names_make_valid_keys(tmp_path, jpgs):
    """TarWriter stores a surrogate-escaped key as raw bytes (PAX hdrcharset=BINARY)."""
    path = write_wds(tmp_path / "names.tar", [
        {"__key__": "caf\udce9", "jpg": jpgs[0], "txt": "c"}, {"__key__": "plain", "jpg": jpgs[1]}])
    got = read(path)
    assert [(r.key, r.caption, r.skip, r.dropped) for r in got] == [
        ("caf\ufffd", "c", None, ["non_utf8_text", "non_utf8_text"]), ("plain", None, None, [])]
    got[0].key.encode("utf-8")


# ---------------------------------------------------------------- nothing lost silently

def test_links_duplicates_and_unknown_members_are_counted(tmp_path, jpgs):
    big_text = b"x" * (64 * 1024 + 1)
    path = write_tar(tmp_path / "odd.tar", [
        ("d", "dir"),
        ("a.jpg", jpgs[0]),
        ("a.jpg", jpgs[1]),                       # same key and extension: the first is kept
        ("a.caption2.txt", "zweite Beschriftung ü".encode()),
        ("a.meta.json", b'{"x": 1, "y": NaN}'),
        ("a.json", b'{"url": "http://example.com/a", "meta.json": "shadowed"}'),
        ("a.npy", b"\x93NUMPY\x01\x00" + bytes(range(40))),
        ("a.nul", b"text\0with nul"),
        ("a.big", big_text),
        ("a.extra", "sym", "a.jpg"),
        ("b.jpg", "hard", "a.jpg"),               # a sample made of a link only
        ("c.jpg", jpgs[2]),
        ("README", b"a member without an extension"),
        ("e.mp4", jpgs[0]),                       # a video sample (the decoder judges the bytes)
    ])
    got = read(path)
    assert [(r.key, r.skip) for r in got] == [("a", None), ("b", "no_image"), ("c", None), ("README", "no_image"),
                                              ("e", None)]
    a = got[0]
    assert a.image == jpgs[0] and a.meta == {
        "url": "http://example.com/a", "caption2.txt": "zweite Beschriftung ü", "meta.json": {"x": 1, "y": None}}
    # Two duplicate_member: the second `.jpg`, and the JSON `meta.json` field the member replaced.
    assert sorted(a.dropped) == sorted(["duplicate_member", "duplicate_member", "nonfinite_number",
                                        "unknown_member", "unknown_member", "unknown_member", "link_member"])
    assert got[1].dropped == ["link_member"] and got[3].dropped == ["unknown_member"]
    assert got[4].media == "video" and got[2].dropped == got[4].dropped == []


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as t:
        return t.getmembers()


def test_corrupt_header_in_the_middle_is_one_counted_loss(tmp_path, jpgs):
    samples = [{"__key__": f"k{i}", "jpg": jpgs[i % 3], "txt": f"c{i}"} for i in range(6)]
    path = write_wds(tmp_path / "corrupt.tar", samples)
    # tarfile (and so webdataset) stops silently at a bad header past the first one.
    header = next(m for m in _members(path) if m.name == "k3.jpg").offset
    data = bytearray(path.read_bytes())
    data[header:header + 100] = b"\xa5" * 100          # name field garbage: the checksum fails
    path.write_bytes(bytes(data))
    got = read(path)
    assert [(r.key, r.skip) for r in got if r.skip is None] == [("k0", None), ("k1", None), ("k2", None)]
    lost = [r for r in got if r.skip]
    assert len(lost) == 1 and lost[0].skip == "unreadable_source"
    assert f"bad header at offset {header}" in lost[0].detail
    assert f"{len(data) - header} bytes after offset {header} not read" in lost[0].detail


def test_corrupt_first_header_and_garbage(tmp_path, jpgs):
    path = write_wds(tmp_path / "first.tar", [{"__key__": "k", "jpg": jpgs[0]}])
    data = bytearray(path.read_bytes())
    data[:100] = b"\xa5" * 100
    path.write_bytes(bytes(data))
    got = read(path)
    assert [r.skip for r in got] == ["unreadable_source"]
    assert f"{len(data)} bytes after offset 0 not read" in got[0].detail
    (tmp_path / "empty.tar").write_bytes(b"")
    assert [r.skip for r in read(tmp_path / "empty.tar")] == ["unreadable_source"]


def test_data_after_an_early_end_of_archive_is_counted(tmp_path, jpgs):
    """`cat a.tar b.tar`: tarfile stops at a's end-of-archive blocks; b is counted, not lost."""
    a = write_wds(tmp_path / "a.tar", [{"__key__": "a", "jpg": jpgs[0]}]).read_bytes()
    b = write_wds(tmp_path / "b.tar", [{"__key__": "b", "jpg": jpgs[1]}]).read_bytes()
    path = tmp_path / "cat.tar"
    path.write_bytes(a + b)
    got = read(path)
    assert [(r.key, r.skip) for r in got][0] == ("a", None)
    assert [r.skip for r in got[1:]] == ["unreadable_source"]
    assert "data after the end-of-archive block" in got[1].detail
    assert read(tmp_path / "a.tar")[-1].skip is None      # a plain tar's zero padding is no loss


def test_cut_member_and_cut_gzip(tmp_path, jpgs):
    samples = [{"__key__": f"k{i}", "jpg": jpgs[i % 3]} for i in range(4)]
    path = write_wds(tmp_path / "cut.tar", samples)
    m = next(m for m in _members(path) if m.name == "k2.jpg")
    path.write_bytes(path.read_bytes()[:m.offset_data + 100])
    got = read(path)
    assert [(r.key, r.skip) for r in got] == [("k0", None), ("k1", None), ("k2", "unreadable_source")]
    gz = write_wds(tmp_path / "cut.tar.gz", samples, compress=True)
    whole = gz.read_bytes()
    gz.write_bytes(whole[: len(whole) * 2 // 3])
    got = read(gz)
    assert skips(got) == {"unreadable_source": 1} and got[0].skip is None


# ---------------------------------------------------------------- end to end

def test_convert_counts_by_reason_and_keeps_the_shard(tmp_path, jpgs, tokenizer_dir):
    from conftest import convert_config

    from tokshard.pipeline.convert.job import convert
    from tokshard.pipeline.format.manifest import read_manifest

    src = tmp_path / "src"
    src.mkdir()
    write_wds(src / "00000.tar", [
        {"__key__": "pair", "input.jpg": jpgs[0], "target.jpg": jpgs[1], "json": b'{"s": NaN}'},
        {"__key__": "deep", "jpg": jpgs[1], "json": b"[" * 50_000 + b"]" * 50_000, "cls": b"99999999999999999999"},
        {"__key__": "ok", "jpg": jpgs[2], "txt": "fine", "cls": 3}])
    bad = write_wds(src / "00001.tar", [{"__key__": f"k{i}", "jpg": jpgs[i % 3]} for i in range(4)])
    header = next(m for m in _members(bad) if m.name == "k2.jpg").offset
    data = bytearray(bad.read_bytes())
    data[header:header + 100] = b"\xa5" * 100
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    result = convert(convert_config([src / "00000.tar", src / "00001.tar"], out, tokenizer_dir), quiet=True)
    record = result["dataset"]
    assert record["totals"]["samples"] == 5
    assert record["skipped_by_reason"] == {"unreadable_source": 1}
    assert record["dropped_by_reason"] == {"bad_label": 1, "deep_metadata": 1, "extra_media": 1,
                                           "nonfinite_number": 1}
    table, _ = read_manifest(out)
    rows = sorted(table.to_pylist(), key=lambda r: r["unit"])
    assert [r["samples"] for r in rows] == [3, 2]
    assert rows[1]["skipped_by_reason"] == [{"reason": "unreadable_source", "count": 1}]
    assert rows[0]["dropped_by_reason"] == [{"reason": r, "count": 1} for r in
                                            ("bad_label", "deep_metadata", "extra_media", "nonfinite_number")]
    import pyarrow.parquet as pq
    stored = {r["key"]: r for p in sorted((out / "shards").glob("*.parquet"))
              for r in pq.read_table(p, columns=["key", "meta", "label"]).to_pylist()}
    assert json.loads(stored["pair"]["meta"], parse_constant=lambda c: pytest.fail(c)) == {"s": None}
    assert stored["deep"]["meta"] is None and stored["deep"]["label"] is None and stored["ok"]["label"] == 3


# ---------------------------------------------------------------- the folder reader's sidecars

def test_folder_sidecars_and_names(tmp_path, jpgs):
    """The folder reader shares the sidecar rules, and a file name that is not UTF-8 (as
    Linux lists it: surrogate-escaped) makes a valid key; an unreadable sidecar costs its sample."""
    root = tmp_path / "folder"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpgs[0])
    (root / "a.cls").write_bytes(b"99999999999999999999")
    (root / "a.json").write_bytes(b'{"x": Infinity, "y": [1, "two"]}')
    (root / "b.jpg").write_bytes(jpgs[1])
    (root / "b.txt").write_bytes(b"\xff caption")
    (root / "b.json").write_bytes(b"{broken")
    with open(bytes(root) + b"/caf\xe9.jpg", "wb") as f:
        f.write(jpgs[2])
    (root / "c.jpg").write_bytes(jpgs[0])
    (root / "c.txt").mkdir()                       # a sidecar that cannot be read
    members = ("a.jpg", "b.jpg", "caf\udce9.jpg", "c.jpg")
    got = list(read_unit(WorkUnit(0, "folder", str(root), members=members)))
    assert [(r.key, r.skip, r.label, r.caption, r.meta, r.dropped) for r in got] == [
        ("a", None, None, None, {"x": None, "y": [1, "two"]}, ["nonfinite_number", "bad_label"]),
        ("b", None, None, "\ufffd caption", None, ["non_utf8_text", "invalid_metadata"]),
        ("caf\ufffd", None, None, None, None, ["non_utf8_text"]),
        ("c", "unreadable_source", None, None, None, []),
    ]
    assert got[2].image == jpgs[2] and got[3].image is None
