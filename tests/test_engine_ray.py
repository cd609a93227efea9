"""The Ray engine on a real local Ray cluster: same bytes as the local engine,
exactly-once under kill -9, failed-shard retry, S3 end to end."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import convert_config

import tokshard
from tokshard.errors import JobError
from tokshard.pipeline.convert.job import convert
from tokshard.pipeline.sample_data import write_img2dataset_shards

pytestmark = pytest.mark.xdist_group("ray")   # one Ray cluster per test worker process


@pytest.fixture(scope="module")
def ray_cluster():
    from tokshard.pipeline.convert.engines.ray import init_ray
    ray = init_ray(None)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def many_tars(tmp_path_factory):
    """12 img2dataset tars of 12 real photo crops each."""
    return write_img2dataset_shards(tmp_path_factory.mktemp("src"), crops_per_photo=7, shard_size=12)[0].parent


def tree(root: Path) -> dict[str, bytes]:
    """Every file of a dataset except run statistics (timings, receipts)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "timings.parquet" and "units" not in p.parts}


AREA = {"resize_mode": "area", "max_area": 4096}     # variable grids: the photos' own aspect ratios


@pytest.mark.parametrize("fmt,codec,encoders,extra", [("parquet", "zstd", 2, {}), ("wds", "zstd-dict", 2, {}),
                                                      ("parquet", "zstd", 0, {}), ("wds", "zstd-dict", 0, {}),
                                                      ("parquet", "rans-ctx", 2, AREA)])
def test_ray_and_local_engines_write_identical_datasets(ray_cluster, tmp_path, photo_tars, tokenizer_dir,
                                                        fmt, codec, encoders, extra):
    """encoders=2: decode tasks + tokenizer actors + commit tasks; 0 on a cluster
    without GPUs: whole-unit tasks."""
    import tempfile
    copies = set(Path(tempfile.gettempdir()).glob("tokshard-tok-*"))
    local, distributed = tmp_path / "local", tmp_path / "ray"
    convert(convert_config([photo_tars], local, tokenizer_dir, format=fmt, codec=codec, **extra), quiet=True)
    result = convert(convert_config([photo_tars], distributed, tokenizer_dir, format=fmt, codec=codec,
                                    engine="ray", encoders=encoders, **extra), quiet=True)
    # Workers rebuild the tokenizer from a temporary copy of the artifact and remove it.
    assert set(Path(tempfile.gettempdir()).glob("tokshard-tok-*")) <= copies
    assert result["dataset"]["shards"] == 3 and result["units_reused"] == 0
    a, b = tree(local), tree(distributed)
    assert a.keys() == b.keys() and "manifest.parquet" in a
    assert [k for k in a if a[k] != b[k]] == []
    if extra:     # the photos' aspect ratios made grids of their own
        assert len({tuple(g) for g in tokshard.open(str(local)).grids().tolist()}) > 1


def test_a_failing_shard_is_retried_reported_and_redone_on_rerun(ray_cluster, tmp_path, photo_tars,
                                                                 tokenizer_dir):
    out = tmp_path / "out"
    blocker = out / "shards" / "000001.parquet"
    blocker.mkdir(parents=True)           # a directory where the shard must go: every write fails
    cfg = convert_config([photo_tars], out, tokenizer_dir, engine="ray", retries=1)
    with pytest.raises(JobError, match=r"1 of 3 shards failed after 2 attempts \(first: shard 000001"):
        convert(cfg, quiet=True)
    assert not (out / "manifest.parquet").exists()
    assert sorted(p.name for p in (out / "_work" / "units").iterdir()) == ["000000.json", "000002.json"]
    blocker.rmdir()
    again = convert(cfg, quiet=True)
    assert again["units_reused"] == 2
    convert(convert_config([photo_tars], tmp_path / "clean", tokenizer_dir), quiet=True)
    assert tree(out) == tree(tmp_path / "clean")


def cli(*args):
    return [sys.executable, "-m", "tokshard", *args]


def run_until(cmd, out: Path, condition, timeout=120):
    """Start `cmd` in its own process group; kill -9 the whole group once `condition(out)` holds."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if condition(out):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.05)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def receipts(out: Path) -> int:
    units = out / "_work" / "units"
    return len(list(units.glob("*.json"))) if units.exists() else 0


def test_kill_9_of_the_driver_then_rerun_gives_the_uninterrupted_dataset(tmp_path, many_tars, tokenizer_dir):
    out = tmp_path / "out"
    args = ("convert", str(many_tars), "--out", str(out), "--tokenizer-opt", f"path={tokenizer_dir}",
            "--engine", "ray", "--quiet")
    # Killed (driver, raylet and workers alike) once a few shards are committed.
    assert run_until(cli(*args), out, lambda o: receipts(o) >= 3)
    assert not (out / "manifest.parquet").exists()
    assert 3 <= receipts(out) < 12
    done = subprocess.run(cli(*args), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    convert(convert_config([many_tars], tmp_path / "clean", tokenizer_dir), quiet=True)
    assert tree(out) == tree(tmp_path / "clean")


def ray_workers(kind: str) -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines()[1:] if f"ray::{kind}" in line]


@pytest.mark.parametrize("encoders,kinds", [("1", ("_decode_task", "_Encoder")), ("0", ("_unit_task",))])
def test_kill_9_of_workers_mid_job_still_completes_exactly_once(tmp_path, many_tars, tokenizer_dir,
                                                                encoders, kinds):
    out = tmp_path / "out"
    cmd = cli("convert", str(many_tars), "--out", str(out), "--tokenizer-opt", f"path={tokenizer_dir}",
              "--engine", "ray", "--encoders", encoders, "--quiet", "--retries", "3")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, text=True)
    killed = set()
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and len(killed) < len(kinds):
            for kind in kinds:
                pids = [p for p in ray_workers(kind) if p not in killed]
                if pids and kind not in {k for k, _ in killed}:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.add((kind, pids[0]))
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert {k for k, _ in killed} == set(kinds), "the job ended before every kind was killed"
    assert proc.returncode == 0, stderr
    convert(convert_config([many_tars], tmp_path / "clean", tokenizer_dir), quiet=True)
    assert tree(out) == tree(tmp_path / "clean")


@pytest.mark.parametrize("encoders", [0, 1])
def test_s3_end_to_end_on_ray(ray_cluster, tmp_path, photo_tars, tokenizer_dir, s3_bucket, encoders):
    fs, bucket, options = s3_bucket
    fs.put(str(photo_tars) + "/", f"{bucket}/laion/", recursive=True)
    src, dest = f"s3://{bucket}/laion", f"s3://{bucket}/tokens"
    result = convert(convert_config([src], dest, tokenizer_dir, engine="ray", storage_options=options,
                                    encoders=encoders), quiet=True)
    assert result["dataset"]["totals"]["samples"] == 19
    assert fs.exists(f"{bucket}/tokens/manifest.parquet")
    # No credential reaches what is written.
    for path in fs.find(f"{bucket}/tokens"):
        assert b"testing" not in fs.cat_file(path) or path.endswith(".tar"), path
    local = tmp_path / "local"
    convert(convert_config([photo_tars], local, tokenizer_dir), quiet=True)
    remote = tokshard.open(dest, storage_options=options, cache_dir=str(tmp_path / "cache"))
    ref = {k: (t, lab) for _, k, t, lab in tokshard.open(local)}
    seen = 0
    for batch in remote.loader(8, rank=0, world_size=1):
        for k, t, lab in zip(batch["key"], batch["tokens"].numpy(), batch["label"].tolist()):
            assert np.array_equal(ref[k][0], t) and ref[k][1] == lab
            seen += 1
    assert seen == 19
    record = json.loads(json.dumps(remote.record))
    assert record["sources"] == [src] and "endpoint_url" not in json.dumps(record)


def test_job_entry_point_runs_a_config_file(tmp_path, photo_tars, tokenizer_dir):
    from tokshard.jobs.convert import load_config
    example = load_config(str(Path(__file__).parents[1] / "jobs" / "examples" / "laion-s3.toml"))
    assert example.engine == "ray" and example.sources[0].startswith("s3://")
    out = tmp_path / "out"
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"sources": [str(photo_tars)], "out": str(out), "engine": "ray",
                                  "tokenizer_options": {"path": str(tokenizer_dir)}}))
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "jobs" / "convert.py"),
                           "--config", str(config), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("converted 19 images into 3 shard(s)")
    convert(convert_config([photo_tars], tmp_path / "local", tokenizer_dir), quiet=True)
    assert tree(out) == tree(tmp_path / "local")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sources": ["x"], "out": "y", "engines": "ray"}))
    done = subprocess.run([sys.executable, "-m", "tokshard.jobs.convert", "--config", str(bad)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "unknown field(s) ['engines']" in done.stderr


@pytest.mark.parametrize("encoders", [0, 1])
def test_video_clips_on_ray_match_the_local_engine(ray_cluster, tmp_path, photos, tokenizer_dir, encoders):
    from test_video import make_video
    src = tmp_path / "videos"
    src.mkdir()
    wide = [img for _, img, _ in photos if img.shape[1] >= 120]
    for i in range(3):
        (src / f"v{i}.mp4").write_bytes(make_video(wide[i], 20))
    local, distributed = tmp_path / "local", tmp_path / "ray"
    convert(convert_config([src], local, tokenizer_dir, clip_frames=8, shard_size=2), quiet=True)
    result = convert(convert_config([src], distributed, tokenizer_dir, clip_frames=8, shard_size=2, engine="ray",
                                    encoders=encoders), quiet=True)
    assert result["dataset"]["totals"]["samples"] == 6 and result["dataset"]["shards"] == 2
    assert tree(local) == tree(distributed)
