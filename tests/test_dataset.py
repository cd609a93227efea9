"""tokshard.open: reading what the manifest promises, and typed errors when a
shard or the manifest does not hold its promise."""

import os
import time
from collections import Counter

import numpy as np
import pytest
from conftest import break_one_payload, rewrite_manifest

import tokshard
from tokshard.errors import CodecError, ManifestError, ShardError
from tokshard.pipeline.storage import TMP_MARK
from tokshard.pipeline.stream.shard_cache import STALE_TMP_S, ShardCache


def rewrite_record(root, **changes):
    rewrite_manifest(root, record=lambda meta: meta.update(changes))


def all_ids(loader):
    """The ids delivered, padding (samples repeated to even out the ranks) left out."""
    return [i for b in loader for i, pad in zip(b["id"].tolist(), b["pad"].tolist()) if not pad]


def test_open_reads_what_convert_wrote(loader_datasets, tokenizer_dir):
    from tokshard.tokenizers.kmeans_vq import KMeansVQ
    ds = tokshard.open(loader_datasets[("parquet", "zstd")])
    assert (len(ds), ds.num_shards, ds.grid, ds.vocab_size) == (213, 9, (8, 8), 64)
    assert ds.shard_sizes.tolist() == [30, 20, 23, 30, 30, 11, 9, 30, 30]
    first = ds.shard(0)
    assert first["tokens"].shape == (30, 8, 8) and first["id"].tolist() == list(range(30))
    # Same codes in every format and codec.
    for variant, path in loader_datasets.items():
        other = tokshard.open(path).shard(0)
        assert np.array_equal(other["tokens"], first["tokens"]) and other["key"] == first["key"], variant
        assert other["label"].tolist() == first["label"].tolist()
    tok = ds.tokenizer()
    assert isinstance(tok, KMeansVQ) and tok.identity() == KMeansVQ.load(tokenizer_dir).identity()
    assert ds.codebook().shape == (64, tok.codebook().shape[1])


def test_a_corrupted_shard_is_a_shard_error_naming_it(dataset_copy):
    root = dataset_copy()
    shard = root / "shards" / "000004.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = tokshard.open(root)
    with pytest.raises(ShardError, match="shard 000004: checksum mismatch") as e:
        all_ids(ds.loader(16, rank=0, world_size=1))
    assert e.value.shard == "000004"


def test_a_missing_shard_is_a_shard_error(dataset_copy):
    root = dataset_copy(("wds", "raw"))
    (root / "shards" / "000002.tar").unlink()
    with pytest.raises(ShardError, match="shard 000002: missing"):
        all_ids(tokshard.open(root).loader(16, rank=0, world_size=1))


def test_a_truncated_shard_is_named_even_without_checksums(dataset_copy):
    root = dataset_copy(("wds", "bitpack"))
    shard = root / "shards" / "000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))  # same size, zeroed tail
    with pytest.raises(ShardError, match="shard 000001: (holds|unreadable)"):
        all_ids(tokshard.open(root, verify=False).loader(16, rank=0, world_size=1, shuffle=False))


def test_skip_mode_counts_bad_shards_and_delivers_the_rest_once(dataset_copy):
    root = dataset_copy()
    (root / "shards" / "000003.parquet").unlink()
    bad = root / "shards" / "000007.parquet"
    bad.write_bytes(b"x" + bad.read_bytes()[1:])
    ds = tokshard.open(root)
    lost = set(range(*ds.shard_offsets[3:5])) | set(range(*ds.shard_offsets[7:9]))
    seen = Counter()
    skipped = set()
    for rank in range(2):
        loader = ds.loader(16, rank=rank, world_size=2, on_error="skip", num_workers=rank)
        seen.update(all_ids(loader))
        skipped |= set(loader.skipped_shards)
    assert skipped == {"000003", "000007"}
    assert seen == Counter(set(range(len(ds))) - lost)


def test_unknown_codec_and_newer_manifest_are_refused_at_open(dataset_copy):
    root = dataset_copy()
    rewrite_record(root, codec={"name": "brotli-x", "version": 1, "params": {}, "state_sha256": None})
    with pytest.raises(CodecError, match="unknown codec 'brotli-x'"):
        tokshard.open(root)
    rewrite_record(root, schema_version="2.0")
    with pytest.raises(ManifestError, match="newer than this tokshard supports"):
        tokshard.open(root)
    (root / "manifest.parquet").unlink()
    with pytest.raises(ManifestError, match="no manifest"):
        tokshard.open(root)


def test_a_corrupt_coded_payload_names_shard_and_sample(dataset_copy):
    # A payload that is wrong although the file's checksum matches (a writer bug,
    # or a tampered manifest): the codec catches it, and the error says where.
    root = dataset_copy()
    size = break_one_payload(root / "shards" / "000000.parquet", 5)
    ds = tokshard.open(root, verify=False)
    ds.shard_bytes[0] = size
    with pytest.raises(ShardError, match="shard 000000: sample row 5"):
        all_ids(ds.loader(16, rank=0, world_size=1, shuffle=False))


def test_stream_from_s3_through_a_bounded_cache(loader_datasets, s3_bucket, tmp_path):
    fs, bucket, options = s3_bucket
    local = loader_datasets[("parquet", "zstd")]
    fs.put(str(local) + "/", f"{bucket}/ds/", recursive=True)
    cache = tmp_path / "cache"
    ds = tokshard.open(f"s3://{bucket}/ds", storage_options=options, cache_dir=str(cache), cache_bytes=6000)
    want = [b["id"].tolist() for b in tokshard.open(local).loader(16, rank=0, world_size=1, seed=5)]
    got = [b["id"].tolist() for b in ds.loader(16, rank=0, world_size=1, seed=5)]
    assert got == want
    # DataLoader worker processes fork with the S3 client of the parent.
    assert [b["id"].tolist() for b in ds.loader(16, rank=0, world_size=1, seed=5, num_workers=2)] == want
    files = list(cache.iterdir())
    assert files and sum(f.stat().st_size for f in files) <= 6000 + max(f.stat().st_size for f in files)
    assert all(f.name.split(".")[0] in ds.shard_sha256 for f in files)
    # A damaged cached copy is detected and fetched again.
    victim = files[0]
    victim.write_bytes(b"garbage")
    assert [b["id"].tolist() for b in ds.loader(16, rank=0, world_size=1, seed=5)] == want
    # Selections on S3: routed through labels.parquet, and a full index scan.
    for where in ("label IN (1, 4)", "label IN (1, 4) AND key LIKE '%'"):
        want = [b["id"].tolist() for b in tokshard.open(local).loader(8, rank=0, world_size=1, where=where)]
        assert want and [b["id"].tolist() for b in ds.loader(8, rank=0, world_size=1, where=where)] == want


@pytest.mark.parametrize("faults", [("503", "500"), ("reset", "slow")], ids=["errors", "resets-and-slow"])
def test_transient_s3_errors_are_retried_end_to_end(s3_bucket, photo_tars, tokenizer_dir, tmp_path, faults):
    from conftest import convert_config
    from faulty_s3 import FaultyS3Proxy

    from tokshard.pipeline.convert.job import convert
    fs, bucket, options = s3_bucket
    fs.put(str(photo_tars) + "/", f"{bucket}/src/", recursive=True)
    with FaultyS3Proxy(options["endpoint_url"], every=4, faults=faults) as proxy:
        flaky = {**options, "endpoint_url": proxy.url}
        convert(convert_config([f"s3://{bucket}/src"], f"s3://{bucket}/out", tokenizer_dir,
                               storage_options=flaky), quiet=True)
        ds = tokshard.open(f"s3://{bucket}/out", storage_options=flaky, cache_dir=str(tmp_path / "c"))
        streamed = sorted(i for b in ds.loader(8, rank=0, world_size=1) for i in b["id"].tolist())
        assert proxy.injected >= 5
    assert streamed == list(range(19))
    # The same job without faults writes the same bytes.
    convert(convert_config([f"s3://{bucket}/src"], f"s3://{bucket}/clean", tokenizer_dir,
                           storage_options=options), quiet=True)
    for rel in ("manifest.parquet", "shards/000000.parquet", "shards/000001.parquet", "shards/000002.parquet"):
        assert fs.cat_file(f"{bucket}/out/{rel}") == fs.cat_file(f"{bucket}/clean/{rel}"), rel


def test_cache_evicts_temporaries_of_killed_writers_but_not_live_ones(tmp_path):
    cache = ShardCache(str(tmp_path), limit_bytes=10_000)
    stale, live = tmp_path / f"{TMP_MARK}killed", tmp_path / f"{TMP_MARK}writing"
    stale.write_bytes(b"x" * 100)
    live.write_bytes(b"y" * 100)
    old = time.time() - STALE_TMP_S - 60
    os.utime(stale, (old, old))
    cache.put("ab" * 32, "parquet", b"shard bytes")
    assert not stale.exists() and live.exists()
    assert cache.get("ab" * 32, "parquet") == b"shard bytes"
    assert cache.size() == len(b"shard bytes")      # temporaries never count against the bound


def test_processes_that_read_a_dataset_exit_cleanly(loader_datasets):
    """pyarrow's thread pool, after a Parquet read through a Python file object, aborts
    ~1 interpreter in 4 at exit here ("terminate called without an active exception",
    apache/arrow#34314): every read goes through Arrow buffers instead."""
    import subprocess
    import sys
    root = loader_datasets[("parquet", "zstd")]
    # As `tokshard info` runs: read the manifest, exit (no torch imported: it makes the abort rarer).
    script = ("import sys\n"
              "from tokshard.pipeline.format.manifest import read_manifest\n"
              "assert read_manifest(sys.argv[1])[0].num_rows > 0 and 'torch' not in sys.modules\n")
    results = []
    for _ in range(2):
        procs = [subprocess.Popen([sys.executable, "-c", script, str(root)], stderr=subprocess.PIPE, text=True)
                 for _ in range(8)]
        results += [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0] * 16, [err for rc, err in results if rc][:1]
