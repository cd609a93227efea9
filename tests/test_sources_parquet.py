"""The Parquet reader on real producers' layouts: img2dataset's `output_format=parquet`
(its column names, from its documentation and writer) and Hugging Face `datasets`'
Parquet (written by `datasets` itself: `Image()` with bytes or paths, `ClassLabel`)."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokshard.errors import JobError, UsageError
from tokshard.pipeline.convert.engines.retry import is_transient
from tokshard.pipeline.convert.select import check_predicate, select_records
from tokshard.pipeline.convert.sources import Record, plan_units, read_unit
from tokshard.pipeline.convert.sources.parquet import class_names

IMG2DATASET_META = ("url", "caption", "similarity", "key", "status", "error_message", "width", "height",
                    "original_width", "original_height", "exif", "sha256")


def _records(path: Path, shard_size: int = 1000, **columns: str) -> list[Record]:
    return [r for u in plan_units([str(path)], shard_size) for r in read_unit(u, **columns)]


def _drops(records: list[Record]) -> Counter:
    return Counter(d for r in records for d in r.dropped)


@pytest.fixture()
def img2dataset_parquet(tmp_path, photo_jpegs):
    """One shard of img2dataset `output_format=parquet`: the input's url/caption and the
    `--save_additional_columns` (similarity), then key, status, error_message, sizes, exif,
    sha256 (`--compute_hash`), the image under its encode format (`jpg`) and `txt`. A failed
    download is a row without image bytes; one similarity is NaN."""
    n = 8
    rows = []
    for i in range(n):
        key, data, _ = photo_jpegs[i]
        failed = i == n - 1
        rows.append({
            "url": f"https://example.com/{key}.jpg", "caption": f"a photo {key}",
            "similarity": float("nan") if i == 3 else 0.1 * i,
            "key": f"{i:09d}", "status": "failed_to_download" if failed else "success",
            "error_message": "HTTP Error 404" if failed else None,
            "width": None if failed else 64, "height": None if failed else 64,
            "original_width": None if failed else 160, "original_height": None if failed else 120,
            "exif": None if failed else json.dumps({"Image Make": "tokshard"}),
            "sha256": None if failed else f"{i:064x}",
            "downloaded_at": datetime.datetime(2024, 1, 2, 3, 4, i),
            "jpg": None if failed else data, "txt": f"a photo {key}",
        })
    path = tmp_path / "i2d" / "00000.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_img2dataset_parquet_carries_every_column_but_the_image(img2dataset_parquet):
    records = _records(img2dataset_parquet)
    assert len(records) == 8
    failed = records[-1]
    assert failed.skip == "no_image" and failed.meta["status"] == "failed_to_download"
    good = [r for r in records if r.skip is None]
    assert len(good) == 7 and all(r.image[:2] == b"\xff\xd8" for r in good)
    for i, r in enumerate(good):
        assert r.key == f"{i:09d}" and r.caption.startswith("a photo")
        assert set(r.meta) == (set(IMG2DATASET_META) - {"caption", "key"}) | {"downloaded_at", "txt"}
        assert r.meta["original_width"] == 160 and r.meta["url"].endswith(".jpg")
        assert r.meta["downloaded_at"] == f"2024-01-02T03:04:{i:02d}"
        json.dumps(r.meta, allow_nan=False)         # valid JSON for any reader
    assert good[3].meta["similarity"] is None and good[2].meta["similarity"] == pytest.approx(0.2)
    assert _drops(records) == {"nonfinite_number": 1}


def test_where_sees_img2dataset_columns(img2dataset_parquet):
    kept = [r for r in select_records(_records(img2dataset_parquet), "similarity > 0.3 AND status = 'success'")
            if r.skip is None]
    # 0.4, 0.5, 0.6; row 3 (NaN -> null) is not selected, row 7 has no image
    assert [r.key for r in kept] == ["000000004", "000000005", "000000006"]


def _rec(i: int, **meta) -> Record:
    return Record(f"k{i}", b"x", "src", meta=meta)


def test_where_treats_a_mixed_type_value_as_null_with_a_count():
    recs = [_rec(0, similarity=0.9), _rec(1, similarity="n/a"), _rec(2, similarity=0.1), _rec(3, flag=True)]
    out = list(select_records(recs, "similarity > 0.3"))
    assert [r.skip for r in out] == [None, "not_selected", "not_selected", "not_selected"]
    assert out[1].dropped == ["mixed_type"] and out[1].meta["similarity"] == "n/a"   # stored as it was
    # The type is the unit's, not the chunk's: text first, then numbers in a later chunk.
    from tokshard.pipeline.convert import select
    chunk = select.CHUNK
    recs = [_rec(i, v="a") for i in range(chunk)] + [_rec(chunk + i, v=i) for i in range(3)]
    out = list(select_records(recs, "v IS NOT NULL"))
    assert sum(r.skip is None for r in out) == chunk and _drops(out) == {"mixed_type": 3}


def test_where_fields_absent_from_some_samples_are_null_and_unknown_ones_fail_once():
    recs = [_rec(0, a=1)] + [_rec(i) for i in range(1, 600)] + [_rec(600, a=2)]
    assert [r.key for r in select_records(recs, "a >= 1") if r.skip is None] == ["k0", "k600"]
    with pytest.raises(UsageError, match="'simlarity', which no sample of src has") as e:
        list(select_records([_rec(0, similarity=1.0)], "simlarity > 0.3"))
    assert not is_transient(e.value)
    with pytest.raises(UsageError, match="--where is not valid"):
        check_predicate("similarity >")


def _hf_parquet(path: Path, images: list, labels: list[int], names: list[str], **extra) -> Path:
    import datasets
    from datasets import ClassLabel, Features, Image, Value
    features = {"image": Image(), "label": ClassLabel(names=names)}
    features.update({k: Value("float32") for k in extra})
    ds = datasets.Dataset.from_dict({"image": images, "label": labels, **extra}, features=Features(features))
    # `datasets` sizes its writes by stat'ing image paths, relative to the working folder:
    # write from the file's folder, with every named file there (missing ones made, then removed).
    made = [p for p in (path.parent / i for i in images if isinstance(i, str)) if not p.exists()]
    for p in made:
        p.write_bytes(b"")
    with contextlib.chdir(path.parent):
        ds.to_parquet(str(path))
    for p in made:
        p.unlink()
    return path


def test_hf_parquet_with_embedded_images_and_class_names(tmp_path, photo_jpegs):
    images = [{"bytes": d, "path": None} for _, d, _ in photo_jpegs[:4]]
    path = _hf_parquet(tmp_path / "train.parquet", images, [0, 1, 2, 1], ["cat", "dog", "fox"])
    assert json.loads(pq.read_schema(path).metadata[b"huggingface"])["info"]["features"]["label"]["names"]
    records = _records(path)
    assert [r.skip for r in records] == [None] * 4 and [r.label for r in records] == [0, 1, 2, 1]
    assert all(r.meta is None for r in records)
    assert class_names(str(path)) == {"label": ["cat", "dog", "fox"]}


def test_hf_parquet_image_paths_resolve_inside_the_files_folder(tmp_path, photo_jpegs):
    root = tmp_path / "hf"
    (root / "images").mkdir(parents=True)
    for i in range(3):
        (root / "images" / f"{i}.jpg").write_bytes(photo_jpegs[i][1])
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(photo_jpegs[3][1])
    (root / "images" / "link.jpg").symlink_to(outside)
    paths = ["images/0.jpg", "images/1.jpg", str(root / "images" / "2.jpg"), "images/missing.jpg",
             "../outside.jpg", str(outside), "images/../../outside.jpg", "images/link.jpg"]
    path = _hf_parquet(root / "data.parquet", paths, [0] * len(paths), ["a"])
    cells = pq.read_table(path).column("image").to_pylist()
    assert all(c["bytes"] is None for c in cells) and cells[0]["path"] == "images/0.jpg"  # what HF writes
    records = _records(path)
    assert [r.skip for r in records] == [None, None, None, "unreadable_source"] + ["unsafe_key"] * 4
    assert [r.image for r in records[:3]] == [photo_jpegs[i][1] for i in range(3)]
    assert "missing.jpg" in records[3].detail


def test_hf_parquet_image_paths_on_s3(s3_bucket, photo_jpegs, tokenizer_dir, tmp_path):
    """Image paths resolve against the Parquet file's folder on an object store too (a real
    S3 server): the images are read from the bucket, and a path out of the folder is refused."""
    from conftest import convert_config

    from tokshard import open as open_dataset
    from tokshard.pipeline.convert.job import convert
    fs, bucket, options = s3_bucket
    local = tmp_path / "hf"
    (local / "images").mkdir(parents=True)
    for i in range(2):
        (local / "images" / f"{i}.jpg").write_bytes(photo_jpegs[i][1])
    (tmp_path / "outside.jpg").write_bytes(photo_jpegs[2][1])
    _hf_parquet(local / "d.parquet", ["images/0.jpg", "images/1.jpg", "../outside.jpg"], [0, 1, 0], ["a", "b"])
    fs.put(str(local), f"{bucket}/hf", recursive=True)
    fs.put(str(tmp_path / "outside.jpg"), f"{bucket}/outside.jpg")
    records = [r for u in plan_units([f"s3://{bucket}/hf/d.parquet"], 10, storage_options=options)
               for r in read_unit(u, options)]
    assert [(r.key, r.image, r.skip) for r in records] == [
        ("d/000000000", photo_jpegs[0][1], None), ("d/000000001", photo_jpegs[1][1], None),
        ("d/000000002", None, "unsafe_key")]
    out = tmp_path / "out"
    record = convert(convert_config([f"s3://{bucket}/hf"], out, tokenizer_dir, storage_options=options),
                     quiet=True)["dataset"]
    assert record["skipped_by_reason"] == {"unsafe_key": 1} and record["class_names"] == {"label": ["a", "b"]}
    assert sorted(k for _, k, _, _ in open_dataset(out)) == ["d/000000000", "d/000000001"]


def test_bad_labels_are_null_with_a_count(tmp_path, photo_jpegs):
    jpg = photo_jpegs[0][1]
    floats = [1.0, float("inf"), float("nan"), 1e300, 2.5, None]
    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"jpg": [jpg] * len(floats), "label": floats}), path)
    records = _records(path)
    assert [r.label for r in records] == [1, None, None, None, None, None]
    assert all(r.skip is None for r in records)
    assert _drops(records) == {"nonfinite_number": 2, "bad_label": 2}
    strings = tmp_path / "s.parquet"
    pq.write_table(pa.table({"jpg": [jpg] * 3, "label": ["dog", "7", None]}), strings)
    records = _records(strings)
    assert [r.label for r in records] == [None, None, None] and _drops(records) == {"bad_label": 2}
    # A label stored as a ClassLabel name is its index.
    named = tmp_path / "n.parquet"
    hf = json.dumps({"info": {"features": {"jpg": {"_type": "Image"},
                                           "label": {"_type": "ClassLabel", "names": ["cat", "dog"]}}}})
    pq.write_table(pa.table({"jpg": [jpg] * 2, "label": ["dog", "emu"]}).replace_schema_metadata(
        {"huggingface": hf}), named)
    records = _records(named)
    assert [r.label for r in records] == [1, None] and _drops(records) == {"bad_label": 1}


def test_bytes_and_vector_columns_are_counted_not_carried(tmp_path, photo_jpegs):
    jpg = photo_jpegs[0][1]
    path = tmp_path / "v.parquet"
    pq.write_table(pa.table({"jpg": [jpg] * 2, "mask": [b"\x00\x01"] * 2, "clip_emb": [[0.5] * 8] * 2,
                             "tags": [["a", "b"], []], "score": [0.5, 1.5]}), path)
    records = _records(path)
    assert [r.meta for r in records] == [{"tags": ["a", "b"], "score": 0.5}, {"tags": [], "score": 1.5}]
    assert _drops(records) == {"unknown_member": 4}


def test_convert_hf_parquet_with_where_keeps_class_names(tmp_path, photo_jpegs, tokenizer_dir):
    from conftest import convert_config

    import tokshard
    from tokshard.pipeline.convert.job import convert
    root = tmp_path / "hf"
    (root / "images").mkdir(parents=True)
    n = 10
    for i in range(n):
        (root / "images" / f"{i}.jpg").write_bytes(photo_jpegs[i][1])
    sims = [0.1 * i + 0.05 for i in range(n)]
    sims[5] = math.nan
    paths = [f"images/{i}.jpg" for i in range(n)]
    paths[8] = "images/gone.jpg"
    names = ["cat", "dog", "fox"]
    src = _hf_parquet(root / "train.parquet", paths, [i % 3 for i in range(n)], names, similarity=sims)
    out = tmp_path / "out"
    record = convert(convert_config([src], out, tokenizer_dir, where="similarity > 0.3", shard_size=4),
                     quiet=True)["dataset"]
    # kept: 3, 4, 6, 7, 9 (0.35...; 5 is NaN -> null, 8's image is missing)
    assert record["totals"]["samples"] == 5
    assert record["skipped_by_reason"] == {"not_selected": 4, "unreadable_source": 1}
    assert record["dropped_by_reason"] == {"nonfinite_number": 1}
    assert record["class_names"] == {"label": names}
    ds = tokshard.open(str(out))
    assert ds.class_names == {"label": names}
    assert sorted((key, int(label)) for _, key, _, label in ds) == [(f"train/{i:09d}", i % 3)
                                                                     for i in (3, 4, 6, 7, 9)]

    # Two sources that name the classes differently are refused at the start.
    (tmp_path / "images").mkdir()
    other = _hf_parquet(tmp_path / "other.parquet", paths[:1], [0], ["ant", "bee"])
    with pytest.raises(UsageError, match="disagree on the class names of column 'label'"):
        convert(convert_config([src, other], tmp_path / "out2", tokenizer_dir), quiet=True)


def test_a_where_column_no_table_source_has_fails_at_the_start(img2dataset_parquet, tokenizer_dir, tmp_path):
    from conftest import convert_config

    from tokshard.pipeline.convert.job import convert
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"--where names 'similarty', which no source has \(columns: .*similarity"):
        convert(convert_config([img2dataset_parquet], out, tokenizer_dir, where="similarty > 0.3"), quiet=True)
    assert not out.exists()         # refused before the destination is claimed
    # Case does not matter to DuckDB, nor here; a column the sources have passes.
    record = convert(convert_config([img2dataset_parquet], out, tokenizer_dir, where="SIMILARITY > 0.3"),
                     quiet=True)["dataset"]
    assert record["totals"]["samples"] == 3


def test_column_options_that_cannot_apply_fail_at_the_start(img2dataset_parquet, photo_jpegs, tokenizer_dir,
                                                           tmp_path):
    """A column option naming a column a table source lacks (a typo would read every caption as
    missing), or one no input kind takes (--key-column with only tars), fails once, before the
    destination is claimed, naming the file and its columns."""
    import webdataset as wds
    from conftest import convert_config

    from tokshard.pipeline.convert.job import convert
    out = tmp_path / "out"
    for option, name in (("caption_column", "text"), ("image_column", "image"), ("key_column", "id"),
                         ("label_column", "cls")):
        with pytest.raises(UsageError, match=rf"--{option.replace('_', '-')} '{name}': .*00000.parquet has no "
                                             r"such column \(columns: url, caption, similarity, key, "):
            convert(convert_config([img2dataset_parquet], out, tokenizer_dir, columns={option: name}), quiet=True)
    tars = tmp_path / "tars"
    tars.mkdir()
    with wds.TarWriter(str(tars / "00000.tar")) as sink:
        for k, data, _ in photo_jpegs[:2]:
            sink.write({"__key__": k, "jpg": data, "txt": "short", "caption.txt": "long"})
    with pytest.raises(UsageError, match=r"--key-column applies to Parquet or Arrow inputs; these inputs are tars"):
        convert(convert_config([tars], out, tokenizer_dir, columns={"key_column": "key"}), quiet=True)
    with pytest.raises(UsageError, match="name the same column"):
        convert(convert_config([tars], out, tokenizer_dir, columns={"image_column": "jpg", "caption_column": "JPG"}),
                quiet=True)
    assert not out.exists()
    # On tars, a column is a member's extension: the caption member is chosen.
    convert(convert_config([tars], out, tokenizer_dir, columns={"caption_column": "caption.txt"}), quiet=True)
    captions = [c for p in sorted((out / "shards").glob("*.parquet"))
                for c in pq.read_table(p, columns=["caption"]).column("caption").to_pylist()]
    assert captions == ["long", "long"]
    # An --image-column no tar member has: nothing converted, and the message says why.
    with pytest.raises(JobError, match=r"skipped no_image=2; no sample had the --image-column 'input.jpg' member"):
        convert(convert_config([tars], tmp_path / "out2", tokenizer_dir, columns={"image_column": "input.jpg"}),
                quiet=True)


def test_hf_video_feature_and_video2dataset_parquet_convert_to_clips(tmp_path, photos, tokenizer_dir, monkeypatch):
    """A Hugging Face `Video()` column (bytes, or a path beside the file) and video2dataset's
    parquet output (an `mp4` column) are the video column: clips, tokenized as the frames."""
    import datasets
    import numpy as np
    from conftest import convert_config
    from test_video import frames_of, make_video

    from tokshard import open as open_dataset
    from tokshard.pipeline.convert.job import convert
    from tokshard.tokenizers.kmeans_vq import KMeansVQ
    big = [p for _, p, _ in photos if p.shape[1] >= 120]
    videos = [make_video(big[i], 8) for i in range(3)]
    hf = tmp_path / "hf"
    (hf / "clips").mkdir(parents=True)
    (hf / "clips" / "b.mp4").write_bytes(videos[1])
    features = datasets.Features({"video": datasets.Video(), "caption": datasets.Value("string")})
    monkeypatch.chdir(hf)       # `datasets` checks a path as given, against the working directory
    datasets.Dataset.from_dict({"video": [{"bytes": videos[0], "path": None}, {"bytes": None, "path": "clips/b.mp4"}],
                                "caption": ["embedded", "by path"]}, features=features).to_parquet(hf / "data.parquet")
    cells = pq.read_table(hf / "data.parquet").column("video").to_pylist()
    assert cells[1] == {"bytes": None, "path": "clips/b.mp4"}     # what HF writes: a path, no bytes
    monkeypatch.chdir(tmp_path)
    v2d = tmp_path / "v2d"
    v2d.mkdir()
    pq.write_table(pa.table({"key": ["000000000"], "mp4": [videos[2]], "txt": ["v2d"], "duration": [0.27]}),
                   v2d / "00000.parquet")
    tok = KMeansVQ.load(tokenizer_dir)
    for src, want in ((hf, {"data/000000000": 0, "data/000000001": 1}), (v2d, {"000000000": 2})):
        out = tmp_path / f"out-{src.name}"
        convert(convert_config([src], out, tokenizer_dir, clip_frames=4), quiet=True)
        stored = {k: t for _, k, t, _ in open_dataset(out)}
        assert sorted(stored) == sorted(f"{k}_{c:04d}" for k in want for c in range(2))
        for key, v in want.items():
            frames = frames_of(videos[v])
            for c in range(2):
                assert np.array_equal(stored[f"{key}_{c:04d}"], tok.encode(np.stack(frames[4 * c:4 * c + 4])))
