"""Conversion speed: tokshard end to end vs an img2dataset-style loop, and the
Ray engine's overhead vs the local engine, on the same images in one run.

- Images: ~5,000 real photos and random crops of them (bundled sample
  photos), as img2dataset-style WebDataset tars of JPEGs.
- Baseline: the img2dataset resize loop over the same tars: read each JPEG
  member (tarfile), PIL open + decode + RGB, resize the short side to 256 with
  img2dataset's default interpolation (area -> PIL BOX when shrinking, Lanczos
  when enlarging) and center-crop (img2dataset's `resize_mode=center_crop`),
  one process, no tokenizer, no output. Both sides read the same tars.
- tokshard: `convert` with the default tokenizer (256 px, 16x16 codes), zstd
  Parquet shards: decode + resize + tokenize + code + write.
- Per core: images per CPU-second (process CPU time, all threads), so the
  ratio does not depend on how many cores each side happened to use.
- Ray overhead: wall time of the Ray engine vs the local engine with 2 decode
  workers, same job; with the Ray cluster already running (as on a cluster)
  and, separately, the cluster start-up time. Both Ray layouts: the default
  without GPUs (whole-unit tasks) and decode tasks + a tokenizer actor (the
  layout of GPU nodes, forced with encoders=1).

    python bench/convert.py    # or: make bench

Writes its table into bench/RESULTS.md under "## Conversion speed".
"""

from __future__ import annotations

import datetime
import os
import tarfile
import tempfile
import time
from pathlib import Path

from results_md import publish  # bench/ is the script's folder, so on sys.path

HEADING = "## Conversion speed"
CROPS_PER_PHOTO = 260
SHARD = 250


def jpeg_sizes(src: Path) -> list[int]:
    sizes = []
    for path in sorted(src.glob("*.tar")):
        with tarfile.open(path) as tar:
            sizes += [m.size for m in tar if m.name.endswith(".jpg")]
    return sizes


def img2dataset_loop(src: Path, size: int = 256) -> tuple[float, float, int]:
    """Read the tars, decode every JPEG with PIL, short side -> size, center crop."""
    import io

    from PIL import Image
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    for path in sorted(src.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.name.endswith(".jpg"):
                    continue
                img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                w, h = img.size
                s = size / min(w, h)
                # img2dataset's resizer defaults: "area" when shrinking, "lanczos" when enlarging.
                resample = Image.BOX if s < 1 else Image.LANCZOS
                img = img.resize((max(size, round(w * s)), max(size, round(h * s))), resample)
                w, h = img.size
                left, top = (w - size) // 2, (h - size) // 2
                img.crop((left, top, left + size, top + size)).tobytes()
                n += 1
    return time.perf_counter() - wall, time.process_time() - cpu, n


def tokshard_convert(src: Path, out: Path, **kw) -> tuple[float, float, dict]:
    import shutil

    from tokshard.pipeline.convert.job import ConvertConfig, convert
    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = time.perf_counter(), time.process_time()
    result = convert(ConvertConfig(sources=[str(src)], out=str(out), **kw), quiet=True)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def encode_seconds(out: Path) -> float:
    import pyarrow.parquet as pq
    return float(sum(pq.read_table(out / "timings.parquet").column("encode_s").to_pylist()))


def best_of(runs: int, fn):
    """The fastest of `runs` runs by wall time: a 2-core machine shared with Ray's daemons is noisy."""
    return min((fn() for _ in range(runs)), key=lambda r: r[0])


def one_core_run(src: Path, out: Path) -> tuple[float, float, float]:
    """(wall, CPU, tokenizer encode seconds) of a convert with 1 decode worker, torch 1 thread."""
    wall, cpu, _ = tokshard_convert(src, out, decode_workers=1)
    return wall, cpu, encode_seconds(out)


def main() -> int:
    from tokshard.pipeline.convert.default_tokenizer import default_artifact
    from tokshard.pipeline.sample_data import write_img2dataset_shards
    default_artifact()          # fitted once and cached; not part of any timing
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokshard-bench-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        write_img2dataset_shards(src, crops_per_photo=CROPS_PER_PHOTO, shard_size=SHARD)
        sizes = jpeg_sizes(src)
        n = len(sizes)
        mean_kb = sum(sizes) / n / 1024
        import torch
        threads = torch.get_num_threads()
        # Per-core figures: best CPU time of 3 runs on each side, interleaved.
        base_runs, one_runs = [], []
        for _ in range(3):
            base_runs.append(img2dataset_loop(src))
            torch.set_num_threads(1)    # so the tokenizer's wall time is its CPU time
            one_runs.append(one_core_run(src, tmp / "one"))
            torch.set_num_threads(threads)
        base_wall, base_cpu, base_n = min(base_runs, key=lambda r: r[1])
        assert base_n == n
        one_wall, one_cpu, encode_cpu = min(one_runs, key=lambda r: r[1])
        loc_wall, loc_cpu, local = best_of(2, lambda: tokshard_convert(src, tmp / "local", decode_workers=2))
        from tokshard.pipeline.convert.engines.ray import init_ray
        t = time.perf_counter()
        ray = init_ray(None)
        ray_start = time.perf_counter() - t
        ray_wall, _, _ = best_of(2, lambda: tokshard_convert(src, tmp / "ray", decode_workers=2, engine="ray"))
        actor_wall, _, _ = best_of(2, lambda: tokshard_convert(src, tmp / "actors", decode_workers=2,
                                                               engine="ray", encoders=1))
        ray.shutdown()
        files = ["manifest.parquet"] + [f"shards/{i:06d}.parquet" for i in range(local["dataset"]["shards"])]
        same = all((tmp / "local" / p).read_bytes() == (tmp / q / p).read_bytes()
                   for q in ("ray", "actors") for p in files)
    base_rate, one_rate = n / base_cpu, n / one_cpu
    side_rate = n / (one_cpu - encode_cpu)
    lines = [
        HEADING, "",
        f"_{datetime.date.today().isoformat()}, `python bench/convert.py`, {os.cpu_count()}-core machine, "
        f"no GPU. {n:,} real JPEGs (bundled photos and random crops, mean {mean_kb:.0f} KiB) in "
        f"img2dataset-style tars, to 256 px; tokshard runs the default tokenizer (16x16 codes) and writes "
        f"zstd Parquet shards. Per-core figures are images per CPU-second (all threads)._", "",
        "| run | wall s | images/s | CPU s | images per CPU-s | vs baseline (per core) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| img2dataset-style loop: read tar, PIL decode + resize (baseline, no tokenizer) | {base_wall:.1f} | "
        f"{n / base_wall:,.0f} | {base_cpu:.1f} | {base_rate:,.0f} | 1.00x |",
        f"| tokshard convert, local engine, 1 decode worker, torch 1 thread | {one_wall:.1f} | "
        f"{n / one_wall:,.0f} | {one_cpu:.1f} | {one_rate:,.0f} | {one_rate / base_rate:.2f}x |",
        f"| same run, CPU work besides the tokenizer forward pass ({encode_cpu:.1f} s): "
        f"read, decode, resize, code, write | - | - | {one_cpu - encode_cpu:.1f} | {side_rate:,.0f} | "
        f"{side_rate / base_rate:.2f}x |",
        f"| tokshard convert, local engine, 2 decode workers | {loc_wall:.1f} | {n / loc_wall:,.0f} | "
        f"{loc_cpu:.1f} | {n / loc_cpu:,.0f} | {n / loc_cpu / base_rate:.2f}x |",
        f"| tokshard convert, Ray engine, default on a cluster without GPUs: whole-unit tasks "
        f"(local cluster already up) | {ray_wall:.1f} | {n / ray_wall:,.0f} | - | - | - |",
        f"| tokshard convert, Ray engine, decode tasks + 1 tokenizer actor (`--encoders 1`, the GPU-node "
        f"layout) | {actor_wall:.1f} | {n / actor_wall:,.0f} | - | - | - |",
        "",
        f"Ray engine overhead vs the local engine at 2 workers: **{100 * (ray_wall / loc_wall - 1):+.0f}%** "
        f"wall time with the default layout, {100 * (actor_wall / loc_wall - 1):+.0f}% with a tokenizer actor "
        f"(its process start-up, importing torch, is part of every job; here it shares 2 cores with the "
        f"decode tasks). Cluster start-up, paid once per cluster: another {ray_start:.1f} s. "
        f"Ray output byte-identical to local (both layouts): {'yes' if same else 'NO'}.", "",
        f"Targets (issue 4): per-core speed >= 1.5x the baseline: end to end on this CPU-only machine, "
        f"where the tokenizer shares the cores, {one_rate / base_rate:.2f}x "
        f"({'met' if one_rate / base_rate >= 1.5 else 'NOT met'}); for the CPUs of a GPU node, where the "
        f"tokenizer runs on the GPU, {side_rate / base_rate:.2f}x "
        f"({'met' if side_rate / base_rate >= 1.5 else 'NOT met'}). Ray overhead <= 15%: "
        f"{'met' if ray_wall / loc_wall <= 1.15 else 'NOT met'}. Per-core rows: the lowest CPU time of 3 "
        f"interleaved runs of each side; wall times of the local and Ray runs: the best of 2.", "",
    ]
    table = "\n".join(lines)
    publish(HEADING, table, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
