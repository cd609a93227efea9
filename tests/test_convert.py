"""End-to-end convert: every source kind, writer and codec, determinism,
incremental re-runs, and bad inputs as counted skips."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import RES, convert_config

from tokshard.errors import UsageError
from tokshard.pipeline.convert.decode import DecodeConfig, decode_image
from tokshard.pipeline.convert.job import convert
from tokshard.pipeline.format.codecs import codec_from_description
from tokshard.pipeline.format.manifest import read_manifest
from tokshard.tokenizers.kmeans_vq import KMeansVQ


def expected_codes(tokenizer_dir, jpegs):
    """What the tokenizer gives for each source image, computed independently of convert."""
    tok = KMeansVQ.load(tokenizer_dir)
    images = np.stack([decode_image(d, DecodeConfig(resolution=RES)).image for d in jpegs])
    return tok.encode(images)


def read_dataset(root: Path):
    """key -> tokens, read back through the manifest, shard files and codec."""
    table, meta = read_manifest(str(root))
    state = (root / meta["codec_state"]).read_bytes() if meta["codec_state"] else None
    codec = codec_from_description(meta["codec"], meta["tokenizer"]["vocab_size"], state)
    n = int(np.prod(meta["grid"]))
    out = {}
    for row in table.to_pylist():
        data = (root / row["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert len(data) == row["stored_bytes"]
        if row["format"] == "parquet":
            t = pq.read_table(io.BytesIO(data))
            for key, tokens in zip(t["key"].to_pylist(), t["tokens"].to_pylist()):
                arr = np.asarray(tokens) if meta["codec"]["name"] == "raw" else codec.decode(tokens, n)
                out[key] = arr.reshape(meta["grid"])
        else:
            for sample in wds.WebDataset(str(root / row["path"]), shardshuffle=False):
                ext = [k for k in sample if k.startswith("tokens.")][0]
                if ext == "tokens.npy":
                    arr = np.load(io.BytesIO(sample[ext]), allow_pickle=False)
                else:
                    arr = codec.decode(sample[ext], n)
                out[sample["__key__"]] = arr.reshape(meta["grid"])
    return table, meta, out


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
@pytest.mark.parametrize("codec", ["raw", "bitpack", "zstd", "zstd-dict"])
def test_tars_roundtrip_every_format_and_codec(tmp_path, photo_tars, tokenizer_dir, fmt, codec):
    result = convert(convert_config([photo_tars], tmp_path / "out", tokenizer_dir,
                                    format=fmt, codec=codec), quiet=True)
    table, meta, got = read_dataset(tmp_path / "out")
    jpegs, keys = [], []
    for tar in sorted(Path(photo_tars).glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".jpg"):
                    keys.append(m.name[:-4])
                    jpegs.append(t.extractfile(m).read())
    assert sorted(got) == sorted(keys)
    want = expected_codes(tokenizer_dir, jpegs)
    for key, codes in zip(keys, want):
        np.testing.assert_array_equal(got[key], codes)
    assert meta["totals"]["samples"] == len(keys) == result["dataset"]["totals"]["samples"]
    assert meta["codec"]["name"] == codec and meta["grid"] == [RES // 8, RES // 8]
    assert table.num_rows == len(list(Path(photo_tars).glob("*.tar")))


def test_folder_and_parquet_sources_keep_captions_and_labels(tmp_path, photo_folder, photo_parquet,
                                                             tokenizer_dir, photo_jpegs):
    convert(convert_config([photo_folder], tmp_path / "f", tokenizer_dir, shard_size=7), quiet=True)
    convert(convert_config([photo_parquet], tmp_path / "p", tokenizer_dir, shard_size=7), quiet=True)
    want = dict(zip([k for k, _, _ in photo_jpegs], expected_codes(tokenizer_dir, [d for _, d, _ in photo_jpegs])))
    labels = {k: lab for k, _, lab in photo_jpegs}
    for out, prefix in ((tmp_path / "f", lambda k: f"{'a' if labels[k] % 2 else 'b'}/{k}"),
                        (tmp_path / "p", lambda k: k)):
        table, meta, got = read_dataset(out)
        assert table.num_rows == -(-len(photo_jpegs) // 7)
        for k, codes in want.items():
            np.testing.assert_array_equal(got[prefix(k)], codes)
        rows = [r for p in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
        for r in rows:
            k = r["key"].split("/")[-1]
            assert r["caption"] == f"caption {k}" and r["label"] == labels[k]
        index = pq.read_table(out / "samples").to_pylist()
        assert sorted(i["key"] for i in index) == sorted(got)


def test_same_inputs_give_byte_identical_dataset(tmp_path, photo_tars, tokenizer_dir):
    for name in ("a", "b"):
        convert(convert_config([photo_tars], tmp_path / name, tokenizer_dir, format="wds",
                               codec="zstd-dict"), quiet=True)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                   if p.is_file() and "_work" not in p.parts and p.name != "timings.parquet")
    assert "manifest.parquet" in {str(f) for f in files}
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_rerun_skips_committed_shards_and_redoes_missing(tmp_path, photo_tars, tokenizer_dir):
    out = tmp_path / "out"
    cfg = convert_config([photo_tars], out, tokenizer_dir)
    first = convert(cfg, quiet=True)
    manifest = (out / "manifest.parquet").read_bytes()
    again = convert(cfg, quiet=True)
    assert again["units_reused"] == first["dataset"]["shards"]
    victim = sorted((out / "shards").glob("*.parquet"))[1]
    victim.unlink()
    third = convert(cfg, quiet=True)
    assert third["units_reused"] == first["dataset"]["shards"] - 1
    assert victim.exists() and (out / "manifest.parquet").read_bytes() == manifest


def test_receipts_from_before_label_counts_are_completed_from_the_index(tmp_path, photo_tars, tokenizer_dir):
    """A job resumed over shards committed by a tokshard without labels.parquet (schema < 1.2)."""
    out = tmp_path / "out"
    cfg = convert_config([photo_tars], out, tokenizer_dir)
    convert(cfg, quiet=True)
    labels = (out / "labels.parquet").read_bytes()
    assert pq.read_table(out / "labels.parquet").num_rows > 1
    for path in (out / "_work" / "units").glob("*.json"):
        receipt = json.loads(path.read_text())
        del receipt["labels"]
        path.write_text(json.dumps(receipt))
    (out / "labels.parquet").unlink()
    again = convert(cfg, quiet=True)
    assert again["units_reused"] == again["dataset"]["shards"]
    assert (out / "labels.parquet").read_bytes() == labels


def test_different_config_into_same_destination_is_refused(tmp_path, photo_tars, tokenizer_dir):
    convert(convert_config([photo_tars], tmp_path / "out", tokenizer_dir), quiet=True)
    with pytest.raises(UsageError, match="different config"):
        convert(convert_config([photo_tars], tmp_path / "out", tokenizer_dir, codec="raw"), quiet=True)


def test_appending_with_another_codebook_is_refused(tmp_path, photo_tars, tokenizer_dir):
    from tokshard.tokenizers.kmeans_vq import KMeansVQ
    convert(convert_config([photo_tars], tmp_path / "out", tokenizer_dir), quiet=True)
    tok = KMeansVQ.load(tokenizer_dir)
    weights = dict(tok._weights)
    weights["centroids"] = weights["centroids"].copy()
    weights["centroids"][0] += 1.0              # one code moved: same config, other codebook
    other = tmp_path / "other-tok"
    KMeansVQ(weights, patch_size=tok.patch_size, resolution=tok.resolution, fit_info=tok.fit_info).save(other)
    assert KMeansVQ.load(other).identity().codebook_hash != tok.identity().codebook_hash
    with pytest.raises(UsageError, match="different tokenizer codebook"):
        convert(convert_config([photo_tars], tmp_path / "out", other), quiet=True)


def _tar(path: Path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_bad_inputs_are_counted_skips(tmp_path, photo_jpegs, tokenizer_dir):
    good = photo_jpegs[0][1]
    src = tmp_path / "src"
    src.mkdir()
    _tar(src / "00000.tar", [
        ("ok1.jpg", good), ("ok1.txt", b"fine"),
        ("empty.jpg", b""),
        ("trunc.jpg", good[: len(good) // 2]),
        ("text.jpg", b"this is not an image"),
        ("captiononly.txt", b"no image here"),
        ("../escape.jpg", good), ("/abs.jpg", good),
        ("ok1.png", good),  # same key again in a later position -> duplicate
        ("badcap.jpg", good), ("badcap.txt", b"\xff\xfe not utf-8"),
    ])
    whole = src / "00001.tar"
    _tar(whole, [(f"k{i}.jpg", good) for i in range(4)])
    data = whole.read_bytes()
    (src / "00001.tar").write_bytes(data[: len(data) // 2])  # truncated tar
    result = convert(convert_config([src], tmp_path / "out", tokenizer_dir), quiet=True)
    skips = result["dataset"]["skipped_by_reason"]
    assert skips["empty_file"] == 1
    assert skips["decode_error"] == 2
    assert skips["no_image"] == 1
    assert skips["unsafe_key"] == 2
    assert skips["duplicate_key"] == 1
    assert skips["unreadable_source"] == 1
    table, meta, got = read_dataset(tmp_path / "out")
    assert "ok1" in got and "badcap" in got
    assert all(k.startswith("k") or k in ("ok1", "badcap") for k in got)
    want = expected_codes(tokenizer_dir, [good])[0]
    for codes in got.values():
        np.testing.assert_array_equal(codes, want)
    per_shard = {r["shard"]: r["skipped"] for r in table.to_pylist()}
    assert sum(per_shard.values()) == sum(skips.values())


def test_folder_non_images_and_unreadable_parquet(tmp_path, photo_jpegs, tokenizer_dir):
    src = tmp_path / "folder"
    src.mkdir()
    (src / "a.jpg").write_bytes(photo_jpegs[0][1])
    (src / "README.md").write_text("not an image")
    (src / "zero.png").write_bytes(b"")
    result = convert(convert_config([src], tmp_path / "o1", tokenizer_dir), quiet=True)
    assert result["dataset"]["totals"]["samples"] == 1
    assert result["dataset"]["skipped_by_reason"] == {"empty_file": 1, "not_an_image": 1}


@pytest.fixture(params=[False, True], ids=["one-unit-at-a-time", "decode-ahead"])
def local_ahead(request, monkeypatch):
    """Both ways the local engine runs: units one at a time (the CPU default) and decoding
    ahead across units (the default where the tokenizer is on a GPU)."""
    from tokshard.pipeline.convert.engines.local import LocalEngine
    monkeypatch.setattr(LocalEngine, "ahead", request.param)
    return request.param


def test_failed_unit_leaves_no_visible_partial_output_and_resumes(tmp_path, photo_tars, tokenizer_dir,
                                                                  monkeypatch, local_ahead):
    import tokshard.pipeline.convert.stages as worker
    from tokshard.errors import JobError
    real = worker.atomic_write
    calls = Counter()

    def failing(fs, path, data):
        # The second unit's shard index cannot be written, however often it is tried.
        calls[path] += 1
        if path.endswith("samples/000001.parquet"):
            raise OSError("disk went away")
        real(fs, path, data)

    monkeypatch.setattr(worker, "atomic_write", failing)
    cfg = convert_config([photo_tars], tmp_path / "out", tokenizer_dir)
    with pytest.raises(JobError, match=r"1 of 3 shards failed after 3 attempts \(first: shard 000001 .*disk went away"):
        convert(cfg, quiet=True)
    out = tmp_path / "out"
    assert calls[str(out / "samples" / "000001.parquet")] == 3
    assert not (out / "manifest.parquet").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert sorted(p.name for p in (out / "_work" / "units").iterdir()) == ["000000.json", "000002.json"]
    monkeypatch.setattr(worker, "atomic_write", real)
    resumed = convert(cfg, quiet=True)
    assert resumed["units_reused"] == 2
    convert(convert_config([photo_tars], tmp_path / "clean", tokenizer_dir), quiet=True)
    assert (out / "manifest.parquet").read_bytes() == (tmp_path / "clean" / "manifest.parquet").read_bytes()


def test_a_transient_failure_is_retried_within_the_run(tmp_path, photo_tars, tokenizer_dir, monkeypatch,
                                                        local_ahead):
    import tokshard.pipeline.convert.stages as worker
    real = worker.atomic_write
    calls = {"n": 0}

    def flaky(fs, path, data):
        calls["n"] += 1
        if calls["n"] == 5:  # once, mid-way through the second unit
            raise OSError("connection reset")
        real(fs, path, data)

    monkeypatch.setattr(worker, "atomic_write", flaky)
    out = tmp_path / "out"
    convert(convert_config([photo_tars], out, tokenizer_dir), quiet=True)
    monkeypatch.setattr(worker, "atomic_write", real)
    convert(convert_config([photo_tars], tmp_path / "clean", tokenizer_dir), quiet=True)
    assert (out / "manifest.parquet").read_bytes() == (tmp_path / "clean" / "manifest.parquet").read_bytes()


def test_a_unit_that_fails_while_read_is_retried_alone_and_the_others_are_unchanged(
        tmp_path, photo_tars, tokenizer_dir, monkeypatch, local_ahead):
    # A source shard that cannot be read, once (retried) or always (that unit fails for
    # good): while decoding runs ahead, the next units go on and come out byte-identical.
    import tokshard.pipeline.convert.stages as worker
    from tokshard.errors import JobError
    real = worker.read_unit
    reads: Counter = Counter()
    always = False

    def flaky(unit, *args, **kwargs):
        name = Path(unit.url).name
        reads[name] += 1
        if name == "00001.tar" and (always or reads[name] == 1):
            raise OSError("connection reset")
        return real(unit, *args, **kwargs)

    monkeypatch.setattr(worker, "read_unit", flaky)
    convert(convert_config([photo_tars], tmp_path / "once", tokenizer_dir), quiet=True)
    assert reads["00001.tar"] == 2
    always = True
    with pytest.raises(JobError, match=r"1 of 3 shards failed after 3 attempts .*connection reset"):
        convert(convert_config([photo_tars], tmp_path / "always", tokenizer_dir), quiet=True)
    monkeypatch.setattr(worker, "read_unit", real)
    convert(convert_config([photo_tars], tmp_path / "clean", tokenizer_dir), quiet=True)
    clean = tmp_path / "clean"
    assert (tmp_path / "once" / "manifest.parquet").read_bytes() == (clean / "manifest.parquet").read_bytes()
    for shard in ("000000", "000002"):
        assert (tmp_path / "always" / "shards" / f"{shard}.parquet").read_bytes() == \
            (clean / "shards" / f"{shard}.parquet").read_bytes()
    assert not (tmp_path / "always" / "shards" / "000001.parquet").exists()


def test_where_keeps_only_selected_source_samples(tmp_path, photo_tars, tokenizer_dir):
    from tokshard.errors import JobError
    metas = {}
    for tar_path in sorted(Path(photo_tars).glob("*.tar")):
        with tarfile.open(tar_path) as t:
            for m in t:
                if m.name.endswith(".json"):
                    meta = json.loads(t.extractfile(m).read())
                    metas[meta["key"]] = meta
    wide = {k for k, m in metas.items() if m["width"] > 500 and "coffee" not in m["caption"]}
    assert 0 < len(wide) < len(metas)
    out = tmp_path / "out"
    result = convert(convert_config([photo_tars], out, tokenizer_dir,
                                    where="width > 500 AND caption NOT LIKE '%coffee%'"), quiet=True)
    assert result["dataset"]["skipped_by_reason"] == {"not_selected": len(metas) - len(wide)}
    import tokshard
    assert {k for _, k, _, _ in tokshard.open(out)} == wide
    for bad in ("width >>> 3", "width >", "no_such_function(width)"):
        with pytest.raises(UsageError, match="--where is not valid"):
            convert(convert_config([photo_tars], tmp_path / "x", tokenizer_dir, where=bad), quiet=True)
    with pytest.raises(JobError, match="no_such_field"):
        convert(convert_config([photo_tars], tmp_path / "y", tokenizer_dir, where="no_such_field > 1", retries=0),
                quiet=True)


def test_where_cannot_touch_files(tmp_path, photo_tars, tokenizer_dir):
    """The predicate runs in a DuckDB connection without file access: no reading a local
    file into the selection, no writing one through a second statement."""
    secret = tmp_path / "secret.csv"
    secret.write_text("key\nanything\n")
    planted = tmp_path / "planted.csv"
    from tokshard.errors import JobError
    with pytest.raises(UsageError, match="--where is not valid: Permission Error"):
        convert(convert_config([photo_tars], tmp_path / "z", tokenizer_dir,
                               where=f"key IN (SELECT key FROM read_csv('{secret}'))"), quiet=True)
    # `width` is a metadata field, unknown before the samples are read: this one fails per shard.
    with pytest.raises(JobError, match="Permission Error"):
        convert(convert_config([photo_tars], tmp_path / "z", tokenizer_dir, retries=0,
                               where=f"width > 1; COPY (SELECT 1) TO '{planted}'"), quiet=True)
    assert not planted.exists()
