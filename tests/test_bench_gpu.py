"""bench/gpu.py in its dry mode (`--device cpu --quick`): the parts run on the CPU at tiny
sizes, write real figures to gpu.json, and `--record` turns them into RESULTS.md's section."""

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("ray")   # starts a Ray cluster: not beside test_engine_ray's

BENCH = Path(__file__).resolve().parents[1] / "bench"
PARTS = ["env", "tokenizers", "convert", "ray", "loader"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(d: dict, *keys: str) -> None:
    for k in keys:
        assert isinstance(d[k], (int, float)) and d[k] > 0, (k, d.get(k))


def test_dry_run_writes_figures_and_records_them(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # Not from the repository's root: its tokshard/ folder would shadow the installed package.
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--out", str(out), "--work", str(work),
                           "--device", "cpu", "--quick", "--budget", "400", "--parts", ",".join(PARTS)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((out / "gpu.json").read_text())
    for part in PARTS:
        assert "error" not in res[part] and "skipped" not in res[part], (part, res[part])
        positive(res[part], "seconds")

    positive(res["env"], "cpus", "torch_threads")

    km = res["tokenizers"]["kmeans-vq"]
    positive(km, "cpu_images_s", "gpu_images_s_batch64")
    assert km["vs_cpu"]["tokens_equal"] == 1.0 and km["repeat_identical"] and km["batch_independent"]

    cv = res["convert"]
    assert cv["images"] == 76
    positive(cv["default_cpu"], "wall_s", "images_s")
    assert cv["default_cpu"]["converted"] == 76 and cv["default_gpu_equals_cpu_bytes"] is True

    ry = res["ray"]
    assert ry["images"] == 76 and ry["shards"] == 3 and ry["device"] == "cpu"
    assert ry["encoders"] == 1 and ry["cluster"]["CPU"] > 0
    positive(ry, "cluster_start_s")
    for engine in ("local", "ray"):
        positive(ry[engine], "wall_s", "images_s")
        assert ry[engine]["converted"] == 76
    # The README's promise: the same bytes from either engine.
    assert ry["ray_equals_local_bytes"] is True and "ray_vs_local_differing" not in ry
    # Both outputs are there and the comparison is not vacuous.
    assert (work / "ray" / "manifest.parquet").read_bytes() == (work / "local" / "manifest.parquet").read_bytes()
    assert len(list((work / "ray" / "shards").iterdir())) >= 3

    ld = res["loader"]
    assert ld["samples"] == 76
    positive(ld, *[k for k in ld if k.endswith("_samples_s")])
    assert sum(k.endswith("_samples_s") for k in ld) == 4

    # --record into a copy of RESULTS.md: the GPU section is replaced, the others are kept.
    results = tmp_path / "RESULTS.md"
    shutil.copy(BENCH / "RESULTS.md", results)
    before = results.read_text()
    real = (BENCH / "RESULTS.md").read_bytes()
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--record", str(out / "gpu.json"),
                           "--results", str(results)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (BENCH / "RESULTS.md").read_bytes() == real
    text = results.read_text()
    # A section of its own for the device (here the CPU), after the others, which are kept.
    mine = f"## GPU measurements (bench/gpu.py): {res['env']['device']}"
    assert mine not in before and text.startswith(before.rstrip())
    start = text.index(mine)
    gpu = text[start:]
    headings = [line for line in before.splitlines() if line.startswith("## ")]
    assert [line for line in text.splitlines() if line.startswith("## ")] == headings + [mine]
    # Recorded again, the device's section is replaced, not repeated.
    again = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--record", str(out / "gpu.json"),
                            "--results", str(results)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and results.read_text() == text
    assert "Ray engine (GPU tokenizer actors) vs local engine: convert of the same 76 JPEGs (3 shards)" in gpu
    assert (f"| local engine | {ry['decode_workers']} decode workers, one process | {ry['local']['wall_s']} | "
            f"{ry['local']['images_s']:,} | (reference) |") in gpu
    assert (f"| Ray, first job on a new cluster | 1 tokenizer actor(s) on the CPU | {ry['ray']['wall_s']} | "
            f"{ry['ray']['images_s']:,} | yes |") in gpu
    assert f"| default cpu | {cv['default_cpu']['wall_s']} | {cv['default_cpu']['images_s']:,} |" in gpu
    assert f"| kmeans-vq (default) | batch 64 | {km['gpu_images_s_batch64']:,} |" in gpu
    assert f"Loader to the GPU (76 samples, batch 256, 3 epochs): workers0 pin0 {ld['workers0_pin0_samples_s']:,}/s" \
        in gpu


def test_the_ray_part_without_ray_records_an_error_and_the_run_goes_on(tmp_path, monkeypatch):
    gpu = load_bench()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    run = gpu.Run(tmp_path / "out", tmp_path / "work", 60, "cpu", True)
    run.part("ray", 0, gpu.ray_part)
    run.part("env", 0, gpu.env)
    res = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert res["ray"]["error"].startswith("RuntimeError: ray is not importable")
    assert res["env"]["cpus"] > 0
    assert not (tmp_path / "work").exists()      # nothing was built for it
    assert "Ray engine: RuntimeError: ray is not importable" in gpu.section(res)


def test_time_limit_interrupts_a_part_and_restores_the_alarm_handler():
    gpu = load_bench()
    import signal
    before = signal.getsignal(signal.SIGALRM)
    t = time.perf_counter()
    with pytest.raises(TimeoutError, match="ran past its 0 s"), gpu.time_limit(0.2):
        time.sleep(5)
    assert time.perf_counter() - t < 2
    assert signal.getsignal(signal.SIGALRM) == before
