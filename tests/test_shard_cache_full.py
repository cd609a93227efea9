"""A full, read-only or broken disk under the shard cache (issue 14).

Every write here fails for real: a 1 MiB tmpfs filled up or remounted read-only
(needs mount rights; skipped with the reason where there are none), a file size
limit (RLIMIT_FSIZE, in a subprocess: writes past it fail with EFBIG), a directory
where a cached copy should be, a cache directory under a regular file. `put`
raises CacheError and leaves no temporary; a dataset read serves every shard all
the same (counted and warned once), so the loader finishes its epoch with every
sample, under on_error="skip" and "raise" alike.
"""

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest

import tokshard
from tokshard.errors import CacheError, TokshardError
from tokshard.pipeline.storage import TMP_MARK, sha256
from tokshard.pipeline.stream.shard_cache import ShardCache

VARIANT = ("parquet", "zstd")
LOADER = dict(rank=0, world_size=1, seed=5)


def ids(loader):
    return [i for b in loader for i in b["id"].tolist()]


def temporaries(directory):
    return sorted(p.name for p in directory.rglob("*") if p.name.startswith(TMP_MARK))


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(mount, leave):
    """Fill `mount` up to `leave` free bytes with one file."""
    (mount / "filler").write_bytes(b"\xff" * max(0, free_bytes(mount) - leave))


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A real 1 MiB tmpfs mounted under tmp_path (unmounted after the test)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs Linux and mount(8)")
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root or CAP_SYS_ADMIN): {run.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture()
def s3_dataset(loader_datasets, s3_bucket):
    """(url, storage_options, local copy, the ids of one epoch read from the local copy)."""
    fs, bucket, options = s3_bucket
    local = loader_datasets[VARIANT]
    fs.put(str(local) + "/", f"{bucket}/ds/", recursive=True)
    want = ids(tokshard.open(local).loader(16, **LOADER))
    assert sorted(want) == list(range(len(want)))
    return f"s3://{bucket}/ds", options, local, want


def assert_whole_copies(cache_dir, ds):
    """Every file in the cache is a whole copy of a shard of `ds` (named by its sha256)."""
    for f in cache_dir.iterdir():
        digest = f.name.split(".")[0]
        assert digest in ds.shard_sha256 and sha256(f.read_bytes()) == digest, f.name


def test_put_on_a_full_tmpfs_is_a_cache_error_and_removes_its_partial_temporary(small_tmpfs):
    cache_dir = small_tmpfs / "cache"
    cache = ShardCache(str(cache_dir), limit_bytes=1 << 30)
    fill(small_tmpfs, leave=16 * 1024)
    before = free_bytes(small_tmpfs)
    assert 0 < before <= 16 * 1024
    data = os.urandom(256 * 1024)
    with pytest.raises(CacheError, match=r"cannot write (ab)+\.parquet \(ENOSPC: No space left on device\)") as err:
        cache.put("ab" * 32, "parquet", data)
    assert isinstance(err.value, TokshardError) and not isinstance(err.value, OSError)
    assert err.value.errno == errno.ENOSPC and err.value.directory == str(cache_dir)
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    back = pickle.loads(pickle.dumps(err.value))
    assert (type(back), back.errno, back.directory, str(back)) == (CacheError, errno.ENOSPC, str(cache_dir),
                                                                  str(err.value))
    # The temporary took the last free pages before the write failed; it is gone, and its space with it.
    assert list(cache_dir.iterdir()) == []
    assert free_bytes(small_tmpfs) == before
    assert cache.get("ab" * 32, "parquet") is None
    # The tolerant path a dataset read uses: counted, warned once, not raised.
    with pytest.warns(RuntimeWarning, match="ENOSPC"):
        assert cache.store("ab" * 32, "parquet", data) is False
    assert cache.store("ab" * 32, "parquet", data) is False
    assert cache.failures == 2 and cache.last_failure.errno == errno.ENOSPC
    assert list(cache_dir.iterdir()) == []
    # Room again: the same cache works.
    (small_tmpfs / "filler").unlink()
    assert cache.store("ab" * 32, "parquet", data) is True
    assert cache.get("ab" * 32, "parquet") == data and [p.name for p in cache_dir.iterdir()] == ["ab" * 32 + ".parquet"]


def test_streaming_from_s3_onto_a_cache_disk_that_fills_up_serves_every_sample(small_tmpfs, s3_dataset):
    url, options, local, want = s3_dataset
    sizes = sorted(os.path.getsize(p) for p in (local / "shards").iterdir())
    cache_dir = small_tmpfs / "cache"
    cache_dir.mkdir()
    # Room for a shard or two: the disk fills up part way through the first epoch.
    fill(small_tmpfs, leave=sizes[-1] + sizes[-1] // 2)
    ds = tokshard.open(url, storage_options=options, cache_dir=str(cache_dir))
    with pytest.warns(RuntimeWarning, match=r"shard cache .*: cannot write .*\(ENOSPC: No space left on device\)"):
        loader = ds.loader(16, on_error="raise", **LOADER)
        assert ids(loader) == want
    assert loader.skipped_shards == []
    assert ds._cache.failures >= 1 and ds._cache.last_failure.errno == errno.ENOSPC
    assert temporaries(small_tmpfs) == []
    cached = sorted(p.name for p in cache_dir.iterdir())
    assert 0 < len(cached) < ds.num_shards, "the disk should have taken some shards, not all"
    assert_whole_copies(cache_dir, ds)
    # on_error="skip", a fresh process view of the same full cache, two DataLoader workers: nothing skipped.
    for workers in (0, 2):
        ds = tokshard.open(url, storage_options=options, cache_dir=str(cache_dir))
        loader = ds.loader(16, on_error="skip", num_workers=workers, **LOADER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert ids(loader) == want
        assert loader.skipped_shards == []
        assert temporaries(small_tmpfs) == []
        assert sorted(p.name for p in cache_dir.iterdir()) == cached
    assert (small_tmpfs / "filler").exists()


def test_a_read_only_cache_still_serves_its_copies_and_never_stops_a_read(small_tmpfs, s3_dataset):
    url, options, _, want = s3_dataset
    cache_dir = small_tmpfs / "cache"
    ds = tokshard.open(url, storage_options=options, cache_dir=str(cache_dir))
    assert ids(ds.loader(16, **LOADER)) == want
    assert len(list(cache_dir.iterdir())) == ds.num_shards and ds._cache.failures == 0
    missing = sorted(cache_dir.iterdir())[0]
    missing.unlink()
    run = subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    # Eight copies read from the read-only cache (their recency cannot be updated), one miss that cannot be stored.
    ds = tokshard.open(url, storage_options=options, cache_dir=str(cache_dir))
    with pytest.warns(RuntimeWarning, match=r"cannot write .*\(EROFS: Read-only file system\)"):
        loader = ds.loader(16, on_error="skip", **LOADER)
        assert ids(loader) == want
    assert loader.skipped_shards == [] and ds._cache.failures == 1 and ds._cache.last_failure.errno == errno.EROFS
    assert not missing.exists() and len(list(cache_dir.iterdir())) == ds.num_shards - 1
    # A cache directory that cannot be created on the read-only disk: warned at open, every shard read from S3.
    with pytest.warns(RuntimeWarning, match=r"cannot create the directory \(EROFS"):
        ds = tokshard.open(url, storage_options=options, cache_dir=str(small_tmpfs / "other"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)          # warned once, at open: not again per shard
        loader = ds.loader(16, on_error="raise", **LOADER)
        assert ids(loader) == want
    assert ds._cache.failures == 1 + ds.num_shards and ds._cache.last_failure.errno == errno.EROFS


RLIMIT_SCRIPT = textwrap.dedent("""
    import json, resource, signal, sys

    import tokshard
    from tokshard.errors import CacheError
    from tokshard.pipeline.stream.shard_cache import ShardCache

    cfg = json.loads(sys.argv[1])
    ds = tokshard.open(cfg["url"], storage_options=cfg["options"], cache_dir=cfg["cache"])
    loader = ds.loader(16, rank=0, world_size=1, seed=5, on_error="skip")
    direct = ShardCache(cfg["cache"] + "-direct", 1 << 30)
    # Past the limit, write() fails with EFBIG instead of the process being killed by SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["limit"], resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    out = {}
    try:
        direct.put("cd" * 32, "parquet", b"x" * (4 * cfg["limit"]))
    except CacheError as e:
        out["direct"] = [e.errno, str(e)]
    out["ids"] = [i for b in loader for i in b["id"].tolist()]
    out["skipped"] = loader.skipped_shards
    out["failures"] = ds._cache.failures
    out["errno"] = ds._cache.last_failure.errno if ds._cache.last_failure else None
    print(json.dumps(out))
""")


def test_a_file_size_limit_makes_every_cache_write_fail_and_the_epoch_still_finishes(s3_dataset, tmp_path):
    # No mount needed: RLIMIT_FSIZE below the smallest shard, set in a subprocess.
    url, options, local, want = s3_dataset
    limit = min(os.path.getsize(p) for p in (local / "shards").iterdir()) // 2
    assert limit > 0
    cache_dir = tmp_path / "cache"
    cfg = {"url": url, "options": options, "cache": str(cache_dir), "limit": limit}
    run = subprocess.run([sys.executable, "-c", RLIMIT_SCRIPT, json.dumps(cfg)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["direct"][0] == errno.EFBIG and "(EFBIG: File too large)" in out["direct"][1]
    assert out["ids"] == want and out["skipped"] == []
    n_shards = len(list((local / "shards").iterdir()))
    assert out["failures"] == n_shards and out["errno"] == errno.EFBIG
    assert "RuntimeWarning" in run.stderr and run.stderr.count("EFBIG") == 1     # warned once
    # Each write got `limit` bytes into its temporary before EFBIG; none is left.
    assert list(cache_dir.iterdir()) == [] and list((tmp_path / "cache-direct").iterdir()) == []


def test_an_unreadable_cached_copy_is_a_miss_and_the_shard_is_read_from_the_store(s3_dataset, tmp_path):
    # A directory where shard 0's copy should be: reading it fails (EISDIR), and so does renaming a copy onto it.
    url, options, _, want = s3_dataset
    cache_dir = tmp_path / "cache"
    ds = tokshard.open(url, storage_options=options, cache_dir=str(cache_dir))
    blocker = cache_dir / f"{ds.shard_sha256[0]}.{ds.shard_paths[0].rsplit('.', 1)[-1]}"
    blocker.mkdir()
    cache = ds._cache
    with pytest.raises(CacheError, match=r"cannot read .*\(EISDIR: Is a directory\)") as err:
        cache.get(ds.shard_sha256[0], "parquet")
    assert err.value.errno == errno.EISDIR
    with pytest.raises(CacheError) as err:
        cache.put(ds.shard_sha256[0], "parquet", b"bytes")
    assert err.value.errno in (errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY) and temporaries(cache_dir) == []
    with pytest.warns(RuntimeWarning, match="EISDIR"):
        loader = ds.loader(16, on_error="raise", **LOADER)
        assert ids(loader) == want
    assert loader.skipped_shards == [] and cache.failures >= 2
    assert blocker.is_dir() and temporaries(cache_dir) == []
    copies = [p for p in cache_dir.iterdir() if p.is_file()]
    assert len(copies) == ds.num_shards - 1
    assert all(sha256(p.read_bytes()) == p.name.split(".")[0] for p in copies)


def test_a_cache_directory_that_cannot_be_made_is_warned_at_open_and_reads_go_on(s3_dataset, tmp_path):
    url, options, _, want = s3_dataset
    (tmp_path / "a-file").write_bytes(b"not a directory")
    with pytest.warns(RuntimeWarning, match=r"cannot create the directory \(ENOTDIR: Not a directory\)"):
        ds = tokshard.open(url, storage_options=options, cache_dir=str(tmp_path / "a-file" / "shards"))
    loader = ds.loader(16, on_error="skip", **LOADER)
    assert ids(loader) == want and loader.skipped_shards == []
    assert ds._cache.failures == 1 + ds.num_shards and ds._cache.last_failure.errno == errno.ENOTDIR
    assert (tmp_path / "a-file").read_bytes() == b"not a directory"
