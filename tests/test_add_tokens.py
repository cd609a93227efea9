"""`tokshard add-tokens DEST --tokenizer NAME --as FIELD` (issue 17): a second tokenizer's codes
of the same samples as a token field beside the dataset (its shards untouched), both identities
in the record, aligned key for key, streamed by `loader(tokens=...)` with partitioning, order
and resume unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import convert_config, fit_test_tokenizer

import tokshard
from tokshard.errors import JobError, ManifestError, UsageError
from tokshard.jobs.cli import main
from tokshard.pipeline.convert.job import convert
from tokshard.pipeline.tools.fields import add_tokens
from tokshard.pipeline.tools.verify import verify


@pytest.fixture(scope="module")
def second_tokenizer(tmp_path_factory, photos):
    """Another k-means VQ: 32 codes of 16x16 patches at 64 px (a 4x4 grid), its own codebook."""
    return fit_test_tokenizer(photos, tmp_path_factory.mktemp("tok2"), codebook_size=32, patch_size=16, pca_dim=8,
                              max_patches=5_000, iters=3, seed=1)


@pytest.fixture(scope="module")
def with_field(tmp_path_factory, photo_jpegs, tokenizer_dir, second_tokenizer):
    """(a dataset of the bundled photos' tars with a field "vq4" added, the same photos converted
    directly with the second tokenizer, the dataset's files before the field)."""
    from tokshard.pipeline.sample_data import write_img2dataset_shards
    root = tmp_path_factory.mktemp("fields")
    src = write_img2dataset_shards(root / "src", crops_per_photo=2, shard_size=16)[0].parent
    dest, direct = root / "ds", root / "direct"
    convert(convert_config([src], dest, tokenizer_dir), quiet=True)
    convert(convert_config([src], direct, second_tokenizer), quiet=True)
    before = {p.relative_to(dest).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in dest.rglob("*") if p.is_file()}
    out = add_tokens(str(dest), "vq4", "kmeans-vq", {"path": str(second_tokenizer)})
    return dest, direct, before, out


def test_the_field_holds_the_second_tokenizers_codes_of_the_same_samples(with_field):
    dest, direct, before, out = with_field
    ds, ref = tokshard.open(dest), tokshard.open(direct)
    field = ds.field("vq4")
    assert ds.fields == ("vq4",) and len(field) == len(ds) == len(ref) and field.grid == (4, 4)
    by_key = {ref[i]["key"]: ref[i]["tokens"] for i in range(len(ref))}
    for i in range(len(ds)):
        a, b = ds[i], field[i]
        assert a["key"] == b["key"]
        # the same as converting the sources with the second tokenizer directly
        assert np.array_equal(b["tokens"], by_key[a["key"]])
    # The dataset's shards, indexes and everything else are untouched; only the manifest changed.
    after = {p.relative_to(dest).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in dest.rglob("*") if p.is_file() and not p.relative_to(dest).as_posix().startswith("fields/")}
    assert {k for k in after if after[k] != before.get(k)} == {"manifest.parquet"}
    record = json.loads(pq.read_schema(dest / "manifest.parquet").metadata[b"tokshard"])
    # both identities: the dataset's tokenizer and the field's (the second one's codebook)
    assert record["tokenizer"]["codebook_hash"] != record["fields"]["vq4"]["tokenizer"]["codebook_hash"]
    assert record["fields"]["vq4"]["tokenizer"]["codebook_hash"] == ref.info.tokenizer.codebook_hash
    assert record["fields"]["vq4"]["path"] == "fields/vq4" and "fields/vq4/manifest.parquet" in record["files"]
    assert out["record"]["fields"]["vq4"]["grid"] == [4, 4]
    assert verify(str(dest)) == (ds.num_shards, [])


def test_the_loader_streams_fields_aligned_with_unchanged_order_and_resume(with_field):
    dest, direct, _, _ = with_field
    ds, ref = tokshard.open(dest), tokshard.open(direct)
    own = {ref[i]["key"]: ref[i]["tokens"] for i in range(len(ref))}
    kw = dict(seed=3, shuffle_buffer=8)
    for world in (1, 2):
        for rank in range(world):
            plain = list(ds.loader(5, rank=rank, world_size=world, **kw))
            both = list(ds.loader(5, rank=rank, world_size=world, tokens=["tokens", "vq4"],
                                  num_workers=rank, **kw))
            only = list(ds.loader(5, rank=rank, world_size=world, tokens="vq4", **kw))
            assert [b["key"] for b in plain] == [b["key"] for b in both] == [b["key"] for b in only]
            for p, b, o in zip(plain, both, only):
                assert torch.equal(p["tokens"], b["tokens"]) and torch.equal(b["vq4"], o["tokens"])
                assert b["vq4"].shape == (len(b["key"]), 4, 4) and b["vq4"].dtype == torch.int64
                for key, codes in zip(b["key"], b["vq4"].numpy()):
                    assert np.array_equal(codes, own[key])
    loader = ds.loader(4, tokens=["tokens", "vq4"], **kw)
    it = iter(loader)
    next(it), next(it)
    again = ds.loader(4, tokens=["tokens", "vq4"], **kw)
    again.load_state_dict(loader.state_dict())
    got, want = next(iter(again)), next(it)
    assert got["key"] == want["key"] and torch.equal(got["vq4"], want["vq4"])


def test_bad_fields_name_the_cause(with_field, tmp_path, second_tokenizer):
    dest, direct, _, _ = with_field
    ds = tokshard.open(dest)
    with pytest.raises(UsageError, match="has no token field 'nope' \\(fields: vq4"):
        ds.loader(4, tokens="nope")
    with pytest.raises(UsageError, match="can only be that first one"):
        ds.loader(4, tokens=["vq4", "tokens"])
    with pytest.raises(UsageError, match="not a mixture"):
        tokshard.mix([ds, ds]).loader(4, tokens="vq4")
    with pytest.raises(UsageError, match="pack=N packs the dataset's own codes"):
        ds.loader(2, tokens="vq4", pack=200)
    for bad in ("tokens", "Caps", "1x", "../up", "caption"):
        with pytest.raises(UsageError, match="a field name is"):
            add_tokens(str(dest), bad, "kmeans-vq", {"path": str(second_tokenizer)})
    with pytest.raises(UsageError, match="--sources must be the dataset's own sources"):
        add_tokens(str(dest), "again", "kmeans-vq", {"path": str(second_tokenizer)}, sources=[str(tmp_path)])
    # A field whose manifest is not the one the record pins: refused when opened.
    tampered = tmp_path / "tampered"
    shutil.copytree(dest, tampered)
    fm = tampered / "fields" / "vq4" / "manifest.parquet"
    fm.write_bytes(fm.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match="record.fields.vq4"):
        tokshard.open(tampered).field("vq4")


def test_verify_checks_a_field_and_add_tokens_again_rebuilds_it(tmp_path, photo_tars, tokenizer_dir,
                                                                second_tokenizer):
    dest = tmp_path / "ds"
    convert(convert_config([photo_tars], dest, tokenizer_dir), quiet=True)
    add_tokens(str(dest), "vq4", "kmeans-vq", {"path": str(second_tokenizer)})
    shard = sorted((dest / "fields" / "vq4" / "shards").iterdir())[0]
    good = shard.read_bytes()
    shard.write_bytes(good[:-7] + b"damaged")
    checked, problems = verify(str(dest))
    assert [p.path for p in problems] == [f"fields/vq4/shards/{shard.name}"]
    assert "token field 'vq4'" in problems[0].what and "add-tokens" in problems[0].what
    add_tokens(str(dest), "vq4", "kmeans-vq", {"path": str(second_tokenizer)})
    assert shard.read_bytes() == good and verify(str(dest)) == (checked, [])


def test_a_field_of_sources_changed_since_is_not_added(tmp_path, photo_tars, tokenizer_dir, second_tokenizer):
    dest = tmp_path / "ds"
    convert(convert_config([photo_tars], dest, tokenizer_dir), quiet=True)
    manifest = (dest / "manifest.parquet").read_bytes()
    sorted(photo_tars.glob("*.tar"))[-1].unlink()        # a source shard gone since the conversion
    with pytest.raises(JobError, match="the sources changed since the dataset was converted; the field is not added"):
        add_tokens(str(dest), "late", "kmeans-vq", {"path": str(second_tokenizer)})
    assert (dest / "manifest.parquet").read_bytes() == manifest and tokshard.open(dest).fields == ()


def test_the_cli_adds_a_field(tmp_path, photo_tars, tokenizer_dir, second_tokenizer, capsys):
    dest = tmp_path / "ds"
    convert(convert_config([photo_tars], dest, tokenizer_dir), quiet=True)
    assert main(["add-tokens", str(dest), "--tokenizer", "kmeans-vq", "--tokenizer-opt",
                 f"path={second_tokenizer}", "--as", "small", "--codec", "raw", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "field 'small'" in out and "grid [4, 4]" in out
    ds = tokshard.open(dest)
    assert ds.field("small").codec.name == "raw"
    assert main(["info", str(dest)]) == 0
    assert "field       small: kmeans-vq/1 32 codes, grid [4, 4], codec raw" in capsys.readouterr().out
    batch = next(iter(ds.loader(3, tokens=["tokens", "small"], seed=0)))
    assert batch["small"].shape == (3, 4, 4)
    # Again: the field is complete, so nothing is converted anew; the record is the same.
    manifest = (dest / "manifest.parquet").read_bytes()
    assert main(["add-tokens", str(dest), "--tokenizer", "kmeans-vq", "--tokenizer-opt",
                 f"path={second_tokenizer}", "--as", "small", "--codec", "raw", "--quiet"]) == 0
    assert (dest / "manifest.parquet").read_bytes() == manifest
    # The same name with another tokenizer is another job: refused, the field kept.
    assert main(["add-tokens", str(dest), "--tokenizer", "kmeans-vq", "--tokenizer-opt",
                 f"path={tokenizer_dir}", "--as", "small", "--quiet"]) == 2
    assert "already has a field 'small', made with another tokenizer" in capsys.readouterr().err
    assert tokshard.open(dest).field("small").grid == (4, 4)


def test_a_field_on_s3(tmp_path, photo_tars, tokenizer_dir, second_tokenizer, s3_bucket):
    """Sources and dataset in a bucket (a real S3-compatible server on 127.0.0.1): the field
    lands beside the dataset there and streams aligned."""
    fs, bucket, options = s3_bucket
    fs.put(str(photo_tars) + "/", f"{bucket}/src/", recursive=True)
    src, dest = f"s3://{bucket}/src", f"s3://{bucket}/ds"
    convert(convert_config([src], dest, tokenizer_dir, storage_options=options), quiet=True)
    add_tokens(dest, "vq4", "kmeans-vq", {"path": str(second_tokenizer)}, storage_options=options)
    assert fs.exists(f"{bucket}/ds/fields/vq4/manifest.parquet")
    ds = tokshard.open(dest, storage_options=options, cache_dir=str(tmp_path / "cache"))
    batch = next(iter(ds.loader(19, tokens=["tokens", "vq4"], seed=0)))
    assert batch["vq4"].shape == (19, 4, 4)
    for key, codes in zip(batch["key"], batch["vq4"].numpy()):
        assert np.array_equal(codes, ds.field("vq4").get(key)["tokens"])
    assert verify(dest, options) == (ds.num_shards, [])
