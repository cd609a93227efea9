"""Producers' layouts, detected without flags: img2dataset (webdataset, parquet and files
outputs, with their metadata Parquet and `_stats.json` sidecars), Hugging Face `datasets`
(save_to_disk Arrow folders, the Hub's split layout), `.tar.gz` shards; and the files an
input folder holds that no unit reads, listed with a reason."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import convert_config

from tokshard.errors import UsageError
from tokshard.pipeline.convert.sources import plan_sources, plan_units, read_unit
from tokshard.pipeline.convert.sources.plan import split_of, unit_split

PER_SHARD = 5


def _meta_row(key: str, caption: str, ok: bool = True) -> dict:
    """A row of img2dataset's per-shard metadata Parquet (its column names)."""
    return {"key": key, "url": f"https://example.com/{key}.jpg", "caption": caption,
            "similarity": 0.25 + int(key) % 7 / 10, "status": "success" if ok else "failed_to_download",
            "error_message": None if ok else "404", "width": 64 if ok else None, "height": 48 if ok else None,
            "original_width": 640 if ok else None, "original_height": 480 if ok else None,
            "exif": None, "sha256": "ab" * 32 if ok else None}


def _stats(dest: Path, shard: str, n: int) -> None:
    (dest / f"{shard}_stats.json").write_text(json.dumps(
        {"count": n + 1, "successes": n, "failed_to_download": 1, "status_dict": {"success": n}}))


def _img2dataset_shards(photo_jpegs, n_shards: int = 2):
    """[(shard name, [(key, jpeg, caption)])]: img2dataset's keys (shard + 4-digit index)."""
    out = []
    for s in range(n_shards):
        part = photo_jpegs[s * PER_SHARD:(s + 1) * PER_SHARD]
        out.append((f"{s:05d}", [(f"{s:05d}{i:04d}", data, f"a photo: {k}") for i, (k, data, _) in enumerate(part)]))
    return out


def _metadata_parquet(path: Path, samples) -> None:
    rows = [_meta_row(k, c) for k, _, c in samples[1:]]        # the first sample has no row: fine
    rows.append(_meta_row(f"{path.stem}9999", "never downloaded", ok=False))  # a row with no sample
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture()
def img2dataset_wds(tmp_path, photo_jpegs):
    """output_format=webdataset: 00000.tar + 00000.parquet + 00000_stats.json per shard."""
    import webdataset as wds
    root = tmp_path / "i2d-wds"
    root.mkdir()
    shards = _img2dataset_shards(photo_jpegs)
    for name, samples in shards:
        with wds.TarWriter(str(root / f"{name}.tar")) as sink:
            for key, data, cap in samples:
                sink.write({"__key__": key, "jpg": data, "txt": cap,
                            "json": json.dumps({"key": key, "caption": cap, "status": "success",
                                                "similarity": -1.0}).encode()})
        _metadata_parquet(root / f"{name}.parquet", samples)
        _stats(root, name, len(samples))
    return root, shards


@pytest.fixture()
def img2dataset_files(tmp_path, photo_jpegs):
    """output_format=files (its default): 00000/000000000.{jpg,txt,json} + 00000.parquet +
    00000_stats.json at the top."""
    root = tmp_path / "i2d-files"
    shards = _img2dataset_shards(photo_jpegs)
    for name, samples in shards:
        (root / name).mkdir(parents=True)
        for key, data, cap in samples:
            (root / name / f"{key}.jpg").write_bytes(data)
            (root / name / f"{key}.txt").write_text(cap)
            (root / name / f"{key}.json").write_text(json.dumps({"key": key, "caption": cap, "status": "success"}))
        _metadata_parquet(root / f"{name}.parquet", samples)
        _stats(root, name, len(samples))
    return root, shards


def _hf_image_dataset(photo_jpegs, start: int, n: int):
    import datasets
    part = photo_jpegs[start:start + n]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"]),
                                  "caption": datasets.Value("string"), "score": datasets.Value("float32")})
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": d, "path": None} for _, d, _ in part], "label": [lab % 3 for _, _, lab in part],
         "caption": [f"hf {k}" for k, _, _ in part], "score": [i / 4 for i in range(len(part))]},
        features=features)


def _samples(result) -> int:
    return result["dataset"]["totals"]["samples"]


# -- img2dataset ---------------------------------------------------------------------------

def test_img2dataset_webdataset_joins_metadata_parquet_by_key(img2dataset_wds, tokenizer_dir, tmp_path):
    root, shards = img2dataset_wds
    (root / "stray.parquet").write_bytes((root / "00000.parquet").read_bytes().replace(b"key", b"kez"))
    (root / "notes.txt").write_text("a stray caption")
    plan = plan_sources([str(root)], 100)
    assert [(u.kind, Path(u.url).name, Path(u.metadata).name) for u in plan.units] == [
        ("wds", "00000.tar", "00000.parquet"), ("wds", "00001.tar", "00001.parquet")]
    assert sorted((Path(p).name, why) for p, why in plan.ignored) == [
        ("notes.txt", "orphan_sidecar"), ("stray.parquet", "other_format")]
    for unit, (_name, samples) in zip(plan.units, shards):
        records = list(read_unit(unit))
        assert [r.key for r in records] == [k for k, _, _ in samples] and all(r.skip is None for r in records)
        first, rest = records[0], records[1:]
        assert first.meta == {"key": first.key, "caption": samples[0][2], "status": "success", "similarity": -1.0}
        for r in rest:   # the sidecar's fields added, the record's own kept
            assert r.meta["similarity"] == -1.0 and r.meta["original_width"] == 640
            assert r.meta["url"] == f"https://example.com/{r.key}.jpg" and r.meta["sha256"] == "ab" * 32
    result = convert(convert_config([root], tmp_path / "out", tokenizer_dir), quiet=True)
    assert _samples(result) == sum(len(s) for _, s in shards)


def test_non_finite_numbers_in_a_metadata_sidecar_are_null_with_a_count(img2dataset_wds, tokenizer_dir, tmp_path):
    """The metadata sidecar's fields are cleaned as a sample's own metadata is: a NaN or
    infinite float (at the top or nested) is stored as null, counted on the sample it joins."""
    root, shards = img2dataset_wds
    name, samples = shards[0]
    rows = [_meta_row(k, c) for k, _, c in samples]
    for r, aesthetic in zip(rows, (0.25, float("nan"), float("inf"), 0.5, 0.75)):
        r["aesthetic"] = aesthetic
        r["extra"] = {"score": float("-inf") if r is rows[3] else 0.5, "tags": ["a"]}
    pq.write_table(pa.Table.from_pylist(rows), root / f"{name}.parquet")
    unit = plan_sources([str(root)], 100).units[0]
    records = list(read_unit(unit))
    assert [r.meta["aesthetic"] for r in records] == [0.25, None, None, 0.5, 0.75]
    assert [r.meta["extra"] for r in records] == [{"score": s, "tags": ["a"]} for s in (0.5, 0.5, 0.5, None, 0.5)]
    assert [r.dropped for r in records] == [[], ["nonfinite_number"], ["nonfinite_number"], ["nonfinite_number"], []]
    out = tmp_path / "out"
    record = convert(convert_config([root], out, tokenizer_dir), quiet=True)["dataset"]
    assert record["dropped_by_reason"] == {"nonfinite_number": 3}

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"stored {c}: not JSON"))
    metas = [strict(m) for p in sorted((out / "shards").glob("*.parquet"))
             for m in pq.read_table(p, columns=["meta"]).column("meta").to_pylist()]
    assert len(metas) == _samples({"dataset": record})
    assert sum(m.get("aesthetic", 0) is None for m in metas) == 2


def test_img2dataset_files_output_is_a_folder_with_metadata_sidecars(img2dataset_files, tokenizer_dir, tmp_path):
    root, shards = img2dataset_files
    (root / "00001" / "lost.txt").write_text("a caption with no image")
    for fmt in ("auto", "folder"):
        plan = plan_sources([str(root)], 3, fmt)
        assert [(u.kind, len(u.members), Path(u.metadata).name) for u in plan.units] == [
            ("folder", 3, "00000.parquet"), ("folder", 2, "00000.parquet"),
            ("folder", 3, "00001.parquet"), ("folder", 2, "00001.parquet")]
        assert all(m.endswith(".jpg") for u in plan.units for m in u.members)
        assert [(Path(p).name, why) for p, why in plan.ignored] == [("lost.txt", "orphan_sidecar")]
    records = [r for u in plan.units for r in read_unit(u)]
    assert [r.key for r in records] == [f"{name}/{k}" for name, s in shards for k, _, _ in s]
    assert all(r.skip is None and r.caption.startswith("a photo:") for r in records)
    joined = [r for r in records if "similarity" in r.meta]
    assert len(joined) == len(records) - len(shards)   # each shard's first sample has no row
    assert all(r.meta["status"] == "success" and r.meta["original_height"] == 480 for r in joined)
    result = convert(convert_config([root], tmp_path / "out", tokenizer_dir), quiet=True)
    assert _samples(result) == len(records)
    assert "not_an_image" not in result["dataset"]["skipped_by_reason"]


def test_img2dataset_parquet_output_and_an_unreadable_file(tmp_path, photo_jpegs, tokenizer_dir):
    """output_format=parquet: 00000.parquet (a jpg column) + 00000_stats.json; one truncated
    Parquet file among them is one unit with one unreadable_source skip, not a refused job."""
    root = tmp_path / "i2d-pq"
    root.mkdir()
    shards = _img2dataset_shards(photo_jpegs)
    for name, samples in shards:
        rows = [{**_meta_row(k, c), "jpg": d} for k, d, c in samples]
        pq.write_table(pa.Table.from_pylist(rows), root / f"{name}.parquet")
        _stats(root, name, len(samples))
    good = (root / "00001.parquet").read_bytes()
    (root / "00002.parquet").write_bytes(good[: len(good) // 2])
    plan = plan_sources([str(root)], 100)
    assert [(u.kind, Path(u.url).name, u.start, u.stop) for u in plan.units] == [
        ("parquet", "00000.parquet", 0, PER_SHARD), ("parquet", "00001.parquet", 0, PER_SHARD),
        ("unreadable", "00002.parquet", 0, 0)]
    assert plan.ignored == []
    bad = list(read_unit(plan.units[2]))
    assert [(r.skip, r.image) for r in bad] == [("unreadable_source", None)] and "00002.parquet" in bad[0].detail
    result = convert(convert_config([root], tmp_path / "out", tokenizer_dir), quiet=True)
    assert _samples(result) == 2 * PER_SHARD
    assert result["dataset"]["skipped_by_reason"]["unreadable_source"] == 1


# -- Hugging Face ----------------------------------------------------------------------------

def test_hf_save_to_disk_arrow_folder(tmp_path, photo_jpegs, tokenizer_dir):
    ds = _hf_image_dataset(photo_jpegs, 0, 7)
    ds.save_to_disk(str(tmp_path / "sd"), num_shards=2)
    plan = plan_sources([str(tmp_path / "sd")], 3)
    assert [(u.kind, Path(u.url).name, u.start, u.stop) for u in plan.units] == [
        ("arrow", "data-00000-of-00002.arrow", 0, 3), ("arrow", "data-00000-of-00002.arrow", 3, 4),
        ("arrow", "data-00001-of-00002.arrow", 0, 3)]
    assert plan.ignored == [] and plan.splits == ()     # dataset_info.json, state.json: known sidecars
    records = [r for u in plan.units for r in read_unit(u)]
    assert [r.image for r in records] == [d for _, d, _ in photo_jpegs[:7]]
    assert [r.label for r in records] == [lab % 3 for _, _, lab in photo_jpegs[:7]]
    assert [r.caption for r in records] == [f"hf {k}" for k, _, _ in photo_jpegs[:7]]
    assert len({r.key for r in records}) == 7
    result = convert(convert_config([tmp_path / "sd"], tmp_path / "out", tokenizer_dir), quiet=True)
    assert _samples(result) == 7
    assert result["dataset"]["class_names"] == {"label": ["a", "b", "c"]}   # from the Arrow schema


def test_hf_dataset_dict_splits_are_marked_or_chosen(tmp_path, photo_jpegs):
    import datasets
    datasets.DatasetDict({"train": _hf_image_dataset(photo_jpegs, 0, 4),
                          "test": _hf_image_dataset(photo_jpegs, 4, 2)}).save_to_disk(str(tmp_path / "dd"))
    plan = plan_sources([str(tmp_path / "dd")], 10)
    assert plan.splits == ("test", "train")
    assert [(unit_split(u), u.stop) for u in plan.units] == [("test", 2), ("train", 4)]
    records = [r for u in plan.units for r in read_unit(u)]
    assert [r.meta["split"] for r in records] == ["test"] * 2 + ["train"] * 4
    assert len({r.key for r in records}) == 6               # the same file name in both splits
    only = plan_sources([str(tmp_path / "dd")], 10, split="train")
    assert [(unit_split(u), u.stop, u.split) for u in only.units] == [(None, 4, "")]
    assert [(Path(p).parent.name, why) for p, why in only.ignored] == [("test", "other_split")]
    with pytest.raises(UsageError, match="--split dev: the inputs have splits: test, train"):
        plan_sources([str(tmp_path / "dd")], 10, split="dev")


def test_hf_hub_layout_keeps_splits_apart(tmp_path, photo_jpegs, tokenizer_dir):
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    _hf_image_dataset(photo_jpegs, 0, 3).to_parquet(str(data / "train-00000-of-00002.parquet"))
    _hf_image_dataset(photo_jpegs, 3, 3).to_parquet(str(data / "train-00001-of-00002.parquet"))
    _hf_image_dataset(photo_jpegs, 6, 2).to_parquet(str(data / "test-00000-of-00001.parquet"))
    (tmp_path / "hub" / "README.md").write_text("---\nlicense: mit\n---\n")
    plan = plan_sources([str(tmp_path / "hub")], 10)
    assert [(Path(u.url).name, unit_split(u)) for u in plan.units] == [
        ("test-00000-of-00001.parquet", "test"), ("train-00000-of-00002.parquet", "train"),
        ("train-00001-of-00002.parquet", "train")]
    assert [(Path(p).name, why) for p, why in plan.ignored] == [("README.md", "unknown_file")]
    records = [r for u in plan.units for r in read_unit(u)]
    assert [r.meta["split"] for r in records] == ["test"] * 2 + ["train"] * 6
    assert all(r.meta["score"] is not None for r in records)    # the record's own columns stay
    train = plan_units([f"{data}/*.parquet"], 10, split="train")  # a glob: split from the names
    assert [Path(u.url).name for u in train] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    result = convert(convert_config([tmp_path / "hub"], tmp_path / "out", tokenizer_dir), quiet=True)
    assert _samples(result) == 8


@pytest.mark.parametrize("rel,split", [
    ("data/train-00000-of-00002.parquet", "train"), ("data/validation-00003-of-00010.parquet", "validation"),
    ("data/my_split-00000-of-00001.parquet", "my_split"), ("data-00000-of-00001.arrow", None),
    ("train/00000.tar", "train"), ("val/shard_0.tar.gz", "val"), ("test.parquet", "test"),
    ("train_0.tar", "train"), ("00000.tar", None), ("trainer/00000.tar", None), ("contest.parquet", None),
])
def test_split_of(rel, split):
    assert split_of(rel) == split


# -- tar.gz, stray files, existing layouts unchanged --------------------------------------

def test_gzipped_tars_are_planned_and_read_like_tars(tmp_path, photo_tars):
    root = tmp_path / "gz"
    root.mkdir()
    tars = sorted(photo_tars.glob("*.tar"))
    for tar, suffix in zip(tars, (".tar.gz", ".tgz", ".tar")):
        mode = "w" if suffix == ".tar" else "w:gz"
        with tarfile.open(tar) as src, tarfile.open(root / (tar.stem + suffix), mode) as dst:
            for m in src.getmembers():
                dst.addfile(m, src.extractfile(m))
    (root / "loose.jpg").write_bytes(b"\xff\xd8")
    plan = plan_sources([str(root)], 100)
    assert [(u.kind, Path(u.url).name) for u in plan.units] == [
        ("wds", "00000.tar.gz"), ("wds", "00001.tgz"), ("wds", "00002.tar")][:len(tars)]
    assert [(Path(p).name, why) for p, why in plan.ignored] == [("loose.jpg", "other_format")]
    assert [u.url for u in plan_units([str(root / "00000.tar.gz")], 100)] == [plan.units[0].url]
    got = [sum(r.skip is None for r in read_unit(u)) for u in plan.units]
    want = [sum(1 for m in tarfile.open(t) if m.name.endswith(".jpg")) for t in tars[:len(got)]]
    assert got == want


def test_existing_layouts_plan_as_before(photo_tars, photo_folder, photo_parquet):
    """No metadata, no split marker, nothing ignored: the units (and so their hashes) of the
    layouts planned before are unchanged."""
    for src in (photo_tars, photo_folder, photo_parquet):
        plan = plan_sources([str(src)], 5)
        assert plan.ignored == [] and plan.splits == ()
        assert all(u.metadata == "" and unit_split(u) is None for u in plan.units)
        assert all(set(u.spec()) == {"kind", "url", "members", "start", "stop"} for u in plan.units)


def convert(cfg, quiet: bool = True):
    from tokshard.pipeline.convert.job import convert as run
    return run(cfg, quiet=quiet)


def test_a_convert_that_converts_nothing_fails_and_writes_no_manifest(tmp_path, tokenizer_dir, capsys):
    from tokshard.jobs.cli import main
    src = tmp_path / "src"
    src.mkdir()
    (src / "readme.txt").write_text("no images here")
    (src / "notes.pdf").write_bytes(b"%PDF-1.4")
    out = tmp_path / "out"
    code = main(["convert", str(src), "--out", str(out), "--tokenizer-opt", f"path={tokenizer_dir}", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and ("converted nothing from 1 unit(s): skipped not_an_image=1; input files not read: "
                          "orphan_sidecar=1; no manifest was written") in err
    assert not (out / "manifest.parquet").exists()


def test_the_summary_and_the_record_count_input_files_no_reader_took(photo_tars, tokenizer_dir, tmp_path, capsys):
    from tokshard.jobs.cli import main
    (photo_tars / "stray.parquet").write_bytes(b"PAR1")
    (photo_tars / "notes.txt").write_text("x")
    out = tmp_path / "out"
    assert main(["convert", str(photo_tars), "--out", str(out), "--tokenizer-opt", f"path={tokenizer_dir}",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "input files not read: " in text and "stray.parquet (other_format)" in text
    from tokshard.pipeline.format.manifest import read_manifest
    _, record = read_manifest(str(out))
    assert sum(record["ignored_inputs"].values()) == 2


def test_video2dataset_webdataset_output_joins_its_metadata(tmp_path, photos, tokenizer_dir):
    """video2dataset writes img2dataset's layout with video members: 00000.tar (KEY.mp4, KEY.txt,
    KEY.json) + 00000.parquet (key, url, caption, duration, status...) + 00000_stats.json."""
    import webdataset as wds
    from test_video import make_video
    root = tmp_path / "v2d"
    root.mkdir()
    keys = [f"00000{i:04d}" for i in range(3)]
    with wds.TarWriter(str(root / "00000.tar")) as sink:
        for i, key in enumerate(keys):
            sink.write({"__key__": key, "mp4": make_video(photos[i][1], frames=8), "txt": f"clip {i}",
                        "json": json.dumps({"key": key, "status": "success"}).encode()})
    pq.write_table(pa.Table.from_pylist([{"key": k, "url": f"https://v/{k}.mp4", "duration": 8 / 30,
                                          "status": "success"} for k in keys]), root / "00000.parquet")
    _stats(root, "00000", 3)
    plan = plan_sources([str(root)], 100)
    assert [(u.kind, Path(u.url).name, Path(u.metadata).name) for u in plan.units] == [
        ("wds", "00000.tar", "00000.parquet")]
    assert plan.ignored == []
    records = list(read_unit(plan.units[0]))
    assert [(r.key, r.media, r.caption, r.meta["url"]) for r in records] == [
        (k, "video", f"clip {i}", f"https://v/{k}.mp4") for i, k in enumerate(keys)]
    result = convert(convert_config([root], tmp_path / "out", tokenizer_dir, clip_frames=4), quiet=True)
    assert _samples(result) == 6 and not result["dataset"]["skipped_by_reason"]   # 2 clips of 4 frames each


def test_tars_of_two_splits_keep_their_keys_apart(tmp_path, photo_jpegs):
    import webdataset as wds
    for split in ("train", "test"):
        (tmp_path / "src" / split).mkdir(parents=True)
        with wds.TarWriter(str(tmp_path / "src" / split / "00000.tar")) as sink:
            for i, (_, data, _) in enumerate(photo_jpegs[:2]):
                sink.write({"__key__": f"{i:04d}", "jpg": data})
    plan = plan_sources([str(tmp_path / "src")], 10)
    records = [r for u in plan.units for r in read_unit(u)]
    assert [(r.key, r.meta["split"]) for r in records] == [
        ("test/0000", "test"), ("test/0001", "test"), ("train/0000", "train"), ("train/0001", "train")]
    only = plan_sources([str(tmp_path / "src")], 10, split="train")
    assert [r.key for u in only.units for r in read_unit(u)] == ["0000", "0001"]   # one split: keys as written
