"""kill -9 at random points of a convert, then re-run: the dataset an
uninterrupted run writes, and nothing partial visible in between."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import convert_config

from tokshard.pipeline.convert.job import convert


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "timings.parquet" and "units" not in p.parts}


def same_tree(got: dict, want: dict) -> bool:
    """Equal trees; on a difference, say which files (a bare dict diff hides it)."""
    if got == want:
        return True
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    differ = sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
    raise AssertionError(f"missing {missing}, extra {extra}, different {differ}")


def kill_at_random_points(tmp_path, photo_tars, tokenizer_dir, trials: int, seed: int) -> None:
    clean = tmp_path / "clean"
    convert(convert_config([photo_tars], clean, tokenizer_dir, codec="zstd-dict"), quiet=True)
    want = tree(clean)
    rng = random.Random(seed)
    cmd = [sys.executable, "-m", "tokshard", "convert", str(photo_tars), "--out", "OUT", "--codec", "zstd-dict",
           "--tokenizer-opt", f"path={tokenizer_dir}", "--quiet"]
    for trial in range(trials):
        out = tmp_path / f"run{trial}"
        # Kill one to three times at random moments (startup, fitting, shard writes, manifest), then finish.
        for _ in range(rng.randint(1, 3)):
            proc = subprocess.Popen([c.replace("OUT", str(out)) for c in cmd], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(rng.uniform(0.2, 4.0))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            # Whatever moment it died at: every file under its final name is whole (a killed
            # write leaves only a .tmp- file no reader looks at), and a manifest means complete.
            if out.exists():
                for p in (out / "shards").glob("*") if (out / "shards").exists() else []:
                    if not p.name.startswith(".tmp-"):
                        assert p.read_bytes() == (clean / "shards" / p.name).read_bytes(), p
                if (out / "manifest.parquet").exists():
                    assert same_tree(tree(out), want)
        done = subprocess.run([c.replace("OUT", str(out)) for c in cmd], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert same_tree(tree(out), want), f"trial {trial}"
        assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]


def test_kill_9_at_random_points_then_rerun(tmp_path, photo_tars, tokenizer_dir):
    kill_at_random_points(tmp_path, photo_tars, tokenizer_dir, trials=3, seed=1)


@pytest.mark.slow
def test_kill_9_at_random_points_20_trials(tmp_path, photo_tars, tokenizer_dir):
    kill_at_random_points(tmp_path, photo_tars, tokenizer_dir, trials=20, seed=2)
