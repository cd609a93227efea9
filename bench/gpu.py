"""What only a GPU can tell: the tokenizers on CUDA (speed, and whether their codes match
the CPU's), the convert job with its tokenizer on the GPU, nvJPEG against the CPU JPEG
decoder, the loader feeding a GPU, and the reference training job under nccl + bf16.

    python bench/gpu.py --out DIR             # on a machine with a CUDA GPU, ~5 min
    python bench/gpu.py --record DIR/gpu.json # here: turn its figures into bench/RESULTS.md
    python bench/gpu.py --device cpu --quick  # a dry run on the CPU, tiny sizes (the tests run it)

The run writes DIR/gpu.json after every part, so a part that fails (or a run cut short by
its time limit) still leaves the parts before it; each part's error is recorded in place
of its figures. `--budget` seconds bound the whole run: a part is skipped, and says so,
when too little time is left for it. Everything is built here from the bundled photos and
from random weights in the tokenizers' public layouts: no download, no network.

Parts (each a function below):
- env: the device, torch/CUDA/cuDNN versions, the TF32 switches.
- tokenizers: images/s on the GPU for kmeans-vq (the default, fitted on the bundled photos)
  and the VQGAN-class tokenizers at their full public sizes (taming's imagenet_f16_1024,
  LlamaGen VQ-16, MaskGIT's VQGAN) with random weights, at the default settings (fp32,
  micro_batch 4) and at bf16 + channels_last with larger micro-batches; for each, the
  share of codes that equal the CPU's codes for the same images (the default settings,
  with and without TF32), whether a second GPU run repeats the codes exactly, and whether
  an image's codes depend on the other images of its batch.
- convert: `convert` of ~5,000 JPEGs (img2dataset tars) with the default tokenizer on the
  GPU and on the CPU, and with taming's VQGAN on the GPU in bf16, decoding ahead across
  units (the local engine's GPU default) and one unit at a time; images/s, and whether the
  GPU's shards are byte-identical to the CPU's and the two engine modes' to each other.
- nvjpeg: `torchvision.io.decode_jpeg(device="cuda")` on batches of the same JPEGs (and a
  resize to 256 on the GPU) against simplejpeg on one CPU core.
- loader: `loader(pin_memory=...)` moving batches to the GPU, samples/s.
- train: `torchrun -m tokshard.jobs.train --compare-pixels` on one GPU (nccl, bf16).
- ray: the Ray engine on a local Ray cluster (decode tasks on the CPUs, tokenizer actors
  with one GPU each) against the local engine on the same JPEGs as `convert` (built once
  per run), the default tokenizer on the GPU for both: images/s of each (the first job on
  a new cluster, when the workers start, and a second one), and whether the shards and
  manifest are byte-identical, as the README promises. Needs `pip install 'tokshard[ray]'`;
  without Ray the part records an error saying so.

`--device cpu --quick` is the dry mode: every part on the CPU at tiny sizes (76 JPEGs in
3 tars; the VQGAN-class tokenizers, ~2 s an image on a CPU, are left out; one Ray job), a
Ray cluster of the machine's CPUs with one tokenizer actor on the CPU. `--results PATH`
makes `--record` write another copy of RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

HEADING = "## GPU measurements (bench/gpu.py)"
RESOLUTION = 256


class Run:
    """The results so far, written to OUT/gpu.json after every part."""

    def __init__(self, out: Path, work: Path, budget: float, device: str, quick: bool):
        self.out, self.work, self.device, self.quick = out, work, device, quick
        self.deadline = time.perf_counter() + budget
        self.results: dict[str, Any] = {"started": datetime.datetime.now().isoformat(timespec="seconds")}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def part(self, name: str, needs: float, fn: Callable[[Run], Any]) -> None:
        if self.left() < needs:
            self.results[name] = {"skipped": f"{self.left():.0f} s left, needs ~{needs:.0f} s"}
        else:
            t = time.perf_counter()
            try:
                self.results[name] = fn(self)
            except Exception as e:   # recorded, and the next part still runs
                self.results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            if isinstance(self.results[name], dict):
                self.results[name]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"[{name}] {json.dumps(self.results[name], default=str)[:1500]}", flush=True)
        (self.out / "gpu.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")


def sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def test_images(n: int, seed: int = 0) -> np.ndarray:
    """n 256 px RGB images: the bundled photos and random crops of them, resized as convert does."""
    from tokshard.pipeline.convert.decode import DecodeConfig, resize_array
    from tokshard.pipeline.sample_data import sample_images
    cfg = DecodeConfig(resolution=RESOLUTION)
    photos = sample_images(crops_per_photo=max(1, n // 19), seed=seed)
    return np.stack([resize_array(img, cfg) for _, img, _ in photos[:n]])


# --- env --------------------------------------------------------------------------------

def env(run: Run) -> dict:
    import torch
    d: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
                         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                         "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                         "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                         "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d.update(device=p.name, memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                 capability=f"{p.major}.{p.minor}", bf16=torch.cuda.is_bf16_supported())
    else:
        d["device"] = "no GPU (dry run on the CPU)"
    try:
        d["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                                          "--format=csv,noheader"], capture_output=True, text=True,
                                         timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        d["nvidia_smi"] = str(e)
    return d


# --- tokenizers -------------------------------------------------------------------------

def vqgan_family(name: str):
    from tokshard.tokenizers.maskgit_vqgan import MaskGitVQGAN
    from tokshard.tokenizers.vqgan import LlamaGenVQ, TamingVQGAN
    return {"vqgan-taming": TamingVQGAN, "llamagen-vq16": LlamaGenVQ, "maskgit-vqgan": MaskGitVQGAN}[name]


def random_weights(cls) -> tuple[dict, dict]:
    """The family's default public architecture with torch's default initialisation (seed 0)."""
    import torch
    arch = cls.canonical_arch(cls.presets[cls.default_preset])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls.build_model(arch)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, arch


def rate(encode: Callable[[np.ndarray], np.ndarray], images: np.ndarray, warm: np.ndarray,
         rounds: int = 2) -> tuple[float, np.ndarray]:
    """Images/s of `encode` over `images` (best of `rounds`, after one warm-up call), and its codes."""
    encode(warm)
    best, codes = float("inf"), None
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        codes = encode(images)
        sync()
        best = min(best, time.perf_counter() - t)
    return len(images) / best, codes


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    a, b = np.asarray(a), np.asarray(b)
    return {"tokens_equal": round(float((a == b).mean()), 6),
            "images_identical": round(float((a.reshape(len(a), -1) == b.reshape(len(b), -1)).all(1).mean()), 4),
            "n_images": len(a)}


def consistency(tok, images: np.ndarray, codes: np.ndarray) -> dict:
    """Does a second run repeat the codes, and are an image's codes independent of its batch?"""
    again = tok.encode(images)
    perm = np.random.default_rng(1).permutation(len(images))
    shuffled = tok.encode(images[perm])
    return {"repeat_identical": bool((again == codes).all()),
            "batch_independent": bool((shuffled == codes[perm]).all()),
            "batch_independent_tokens_equal": round(float((shuffled == codes[perm]).mean()), 6)}


def tokenizers(run: Run) -> dict:
    import torch

    from tokshard.pipeline.convert.default_tokenizer import default_artifact
    from tokshard.tokenizers.kmeans_vq import KMeansVQ
    dev = run.device
    q = run.quick
    out: dict[str, Any] = {}
    images = test_images(64 if q else 1024)

    # kmeans-vq: the default tokenizer.
    cpu = KMeansVQ.load(default_artifact(), device="cpu", batch_size=64)
    n_cpu = 64 if q else 512
    cpu_rate, cpu_codes = rate(cpu.encode, images[:n_cpu], images[:64], rounds=1)
    row: dict[str, Any] = {"cpu_images_s": round(cpu_rate), "cpu_threads": torch.get_num_threads()}
    for bs in ((64,) if q else (64, 256, 1024)):
        tok = KMeansVQ.load(default_artifact(), device=dev, batch_size=bs)
        r, codes = rate(tok.encode, images, images[:bs])
        row[f"gpu_images_s_batch{bs}"] = round(r)
    row["vs_cpu"] = agreement(codes[:n_cpu], cpu_codes)
    row.update(consistency(tok, images[:256], codes[:256]))
    out["kmeans-vq"] = row

    # The VQGAN family at full size, random weights.
    n_gpu = 64 if q else 512
    n_cpu = 4 if q else 16
    for name in ("vqgan-taming", "llamagen-vq16", "maskgit-vqgan"):
        if q and dev == "cpu":
            out[name] = {"skipped": "dry mode: ~2 s an image on a CPU"}
            continue
        if run.left() < 40:
            out[name] = {"skipped": "time"}
            continue
        cls = vqgan_family(name)
        sd, arch = random_weights(cls)
        row = {"params_m": round(sum(v.numel() for v in sd.values()) / 1e6, 1)}
        ref = cls(sd, arch, device="cpu")
        t = time.perf_counter()
        cpu_codes = ref.encode(images[:n_cpu])
        row["cpu_images_s"] = round(n_cpu / (time.perf_counter() - t), 2)
        del ref
        settings = [("fp32", False, 4, 32)] if q else [
            ("fp32", False, 4, 32), ("bf16", False, 4, 32), ("bf16", True, 4, 32),
            ("bf16", True, 32, 128), ("bf16", True, 128, 256)]
        for precision, cl, mb, bs in settings:
            key = f"{precision}{'_cl' if cl else ''}_mb{mb}"
            tok = cls(sd, arch, device=dev, precision=precision, channels_last=cl, micro_batch=mb, batch_size=bs)
            r, codes = rate(tok.encode, images[:n_gpu], images[:bs], rounds=1)
            cell: dict[str, Any] = {"images_s": round(r, 1)}
            if (precision, cl, mb) == ("fp32", False, 4):    # the default identity
                cell["vs_cpu"] = agreement(codes[:n_cpu], cpu_codes)
                cell.update(consistency(tok, images[:64], codes[:64]))
                if dev == "cuda":
                    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
                    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
                    try:
                        cell["vs_cpu_no_tf32"] = agreement(tok.encode(images[:n_cpu]), cpu_codes)
                    finally:
                        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
            elif precision == "bf16" and not cl and mb == 4:
                cell["vs_cpu"] = agreement(codes[:n_cpu], cpu_codes)
            row[key] = cell
            del tok
            if dev == "cuda":
                torch.cuda.empty_cache()
        if dev == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        out[name] = row
    return out


# --- convert ----------------------------------------------------------------------------

def make_source(tmp: Path, quick: bool) -> Path:
    """The JPEGs `convert`, `ray` and `nvjpeg` read, written once per run: 19 photos and 260
    crops of each (4,959 JPEGs) in tars of 250; quick: 3 crops of each (76) in tars of 32."""
    import shutil

    from tokshard.pipeline.sample_data import write_img2dataset_shards
    src, done = tmp / "src", tmp / "src.done"
    if not done.exists():
        shutil.rmtree(src, ignore_errors=True)
        write_img2dataset_shards(src, crops_per_photo=3 if quick else 260, shard_size=32 if quick else 250)
        done.touch()
    return src


def count_jpegs(src: Path) -> int:
    return sum(1 for p in src.glob("*.tar") for m in tarfile.open(p) if m.name.endswith(".jpg"))


def timed_convert(src: Path, out: Path, **kw: Any) -> tuple[float, dict]:
    import shutil

    from tokshard.pipeline.convert.job import ConvertConfig, convert
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    result = convert(ConvertConfig(sources=[str(src)], out=str(out), **kw), quiet=True)
    sync()
    return time.perf_counter() - t, result


def differing_files(a: Path, b: Path) -> dict[str, Any]:
    """The files of output `a` that differ from `b`'s (timings aside), and for Parquet files
    the columns that differ."""
    import pyarrow.parquet as pq
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and "timings" not in p.name
                   and not any(part.startswith("_") for part in p.relative_to(a).parts))
    out: dict[str, Any] = {}
    for f in files:
        if (b / f).is_file() and (a / f).read_bytes() == (b / f).read_bytes():
            continue
        what: Any = "missing" if not (b / f).is_file() else "bytes"
        if what == "bytes" and f.suffix == ".parquet":
            ta, tb = pq.read_table(a / f), pq.read_table(b / f)
            what = [c for c in ta.column_names if c not in tb.column_names or not ta[c].equals(tb[c])]
            if not what:
                what = {"schema_metadata": ta.schema.metadata != tb.schema.metadata}
        elif what == "bytes" and f.suffix == ".json":
            ja, jb = json.loads((a / f).read_text()), json.loads((b / f).read_text())
            what = sorted(k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k)) if isinstance(ja, dict) else what
        out[str(f)] = what
        if len(out) >= 8:
            break
    return out


def convert_part(run: Run) -> dict:
    import tokshard
    from tokshard.pipeline.convert.engines.local import LocalEngine
    from tokshard.tokenizers.vqgan import TamingVQGAN
    tmp = run.work
    src = make_source(tmp, run.quick)
    n = count_jpegs(src)
    workers = max(2, (os.cpu_count() or 4) - 2)
    out: dict[str, Any] = {"images": n, "decode_workers": workers}
    # Warm-up (CUDA context, cuDNN, the default artifact) outside the timings.
    timed_convert(src, tmp / "warm", decode_workers=workers, tokenizer_options={"device": run.device})
    for dev in (run.device, "cpu"):
        wall, res = timed_convert(src, tmp / f"default-{dev}", decode_workers=workers,
                                  tokenizer_options={"device": dev})
        out[f"default_{dev}"] = {"wall_s": round(wall, 2), "images_s": round(n / wall),
                                 "converted": len(tokshard.open(str(tmp / f"default-{dev}")))}
    diff = differing_files(tmp / f"default-{run.device}", tmp / "default-cpu")
    out["default_gpu_equals_cpu_bytes"], out["default_gpu_vs_cpu_differing"] = not diff, diff
    # A VQGAN-class tokenizer on the GPU, its fastest settings measured above.
    if run.left() > 60 and not run.quick:
        sd, arch = random_weights(TamingVQGAN)
        art = tmp / "taming"
        TamingVQGAN(sd, arch, device="cpu").save(art)
        opts = {"precision": "bf16", "channels_last": "true", "micro_batch": "32", "batch_size": "128"}
        # The local engine decodes ahead across units where the tokenizer is on a GPU; the
        # same convert one unit at a time, for the difference.
        for label, ahead in (("taming_bf16_cl_mb32", None), ("taming_bf16_cl_mb32_one_unit_at_a_time", False)):
            LocalEngine.ahead = ahead
            try:
                wall, res = timed_convert(src, tmp / label, decode_workers=workers, tokenizer="vqgan-taming",
                                          tokenizer_options={"path": str(art), "device": run.device, **opts})
            finally:
                LocalEngine.ahead = None
            out[label] = {"wall_s": round(wall, 2), "images_s": round(n / wall),
                          "converted": len(tokshard.open(str(tmp / label)))}
        diff = differing_files(tmp / "taming_bf16_cl_mb32", tmp / "taming_bf16_cl_mb32_one_unit_at_a_time")
        out["ahead_equals_one_unit_at_a_time_bytes"] = not diff
    return out


# --- ray --------------------------------------------------------------------------------

@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after `seconds` (a hung cluster must not take
    the rest of the run's budget: the Ray driver waits in 1 s steps, so the alarm lands)."""
    def fire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the part ran past its {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def same_bytes(a: Path, b: Path) -> dict[str, Any]:
    """differing_files both ways: the files that differ, and those only one side has."""
    return {**differing_files(a, b), **{f: "only in the second" for f in differing_files(b, a) if
                                        not (a / f).is_file()}}


def ray_part(run: Run) -> dict:
    import importlib.util
    if importlib.util.find_spec("ray") is None:
        raise RuntimeError("ray is not importable (pip install 'tokshard[ray]'): the Ray engine was not run")
    import torch

    import tokshard
    from tokshard.pipeline.convert.engines.ray import init_ray
    tmp = run.work
    src = make_source(tmp, run.quick)
    n = count_jpegs(src)
    workers = max(2, (os.cpu_count() or 4) - 2)     # as `convert`: the local engine's decode threads
    gpus = torch.cuda.device_count() if run.device == "cuda" else 0
    # One tokenizer actor per GPU, one GPU each (the engine's default where the cluster has
    # GPUs); on the CPU one actor all the same, so that the dry run takes the same path
    # (decode tasks -> actor -> commit tasks) rather than whole-unit tasks.
    encoders, gpus_per_encoder = (gpus, 1.0) if gpus else (1, None)
    opts = {"device": run.device}
    out: dict[str, Any] = {"images": n, "device": run.device, "decode_workers": workers, "encoders": encoders,
                           "gpus_per_encoder": gpus_per_encoder or 0}
    labels = ("ray",) if run.quick else ("ray_first_job", "ray")
    cwd = os.getcwd()
    # Ray puts the driver's working directory on its workers' sys.path: from the repository's
    # root, its tokshard/ folder would shadow the installed package there.
    os.chdir(tmp)
    try:
        with time_limit(max(30.0, run.left() - 5)):
            ray = None
            try:
                t = time.perf_counter()
                ray = init_ray(None)
                resources = ray.cluster_resources()
                if gpus and resources.get("GPU", 0) < gpus:   # Ray did not see the GPU: say so, and give it
                    out["ray_detected_gpus"] = resources.get("GPU", 0)
                    ray.shutdown()
                    ray.init(num_gpus=gpus, include_dashboard=False, logging_level="WARNING",  # as init_ray
                             log_to_driver=False)
                    resources = ray.cluster_resources()
                out["cluster"] = {k: resources.get(k, 0) for k in ("CPU", "GPU")}
                out["cluster_start_s"] = round(time.perf_counter() - t, 2)
                ray_kw = {"engine": "ray", "encoders": encoders, "gpus_per_encoder": gpus_per_encoder}
                # The first job on a new cluster starts its worker processes (each imports torch);
                # the second finds the task workers started (tokenizer actors start in every job).
                # The dry run has one job only.
                for label in labels:
                    wall, res = timed_convert(src, tmp / label, decode_workers=workers, tokenizer_options=opts,
                                              **ray_kw)
                    out[label] = {"wall_s": round(wall, 2), "images_s": round(n / wall),
                                  "converted": len(tokshard.open(str(tmp / label))),
                                  "first_job_on_the_cluster": label == labels[0]}
            finally:
                if ray is not None:
                    ray.shutdown()      # before the local engine runs: its CPUs to itself
            wall, res = timed_convert(src, tmp / "local", decode_workers=workers, tokenizer_options=opts)
            out["local"] = {"wall_s": round(wall, 2), "images_s": round(n / wall),
                            "converted": len(tokshard.open(str(tmp / "local")))}
            out["shards"] = res["dataset"]["shards"]
    finally:
        os.chdir(cwd)
    for label in labels:
        diff = same_bytes(tmp / "local", tmp / label)
        out[f"{label}_equals_local_bytes"] = not diff
        if diff:
            out[f"{label}_vs_local_differing"] = diff
    return out


# --- nvJPEG -----------------------------------------------------------------------------

def jpegs(src: Path, limit: int) -> list[bytes]:
    out: list[bytes] = []
    for p in sorted(src.glob("*.tar")):
        with tarfile.open(p) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    f = tar.extractfile(m)
                    assert f is not None
                    out.append(f.read())
                    if len(out) >= limit:
                        return out
    return out


def nvjpeg(run: Run) -> dict:
    import simplejpeg
    import torch
    import torchvision
    from torchvision.io import decode_jpeg
    data = jpegs(make_source(run.work, run.quick), 256 if run.quick else 2048)
    out: dict[str, Any] = {"images": len(data), "mean_kib": round(sum(map(len, data)) / len(data) / 1024, 1),
                           "torchvision": torchvision.__version__}
    t = time.perf_counter()
    for d in data:
        simplejpeg.decode_jpeg(d, colorspace="RGB")
    out["cpu_simplejpeg_1core_images_s"] = round(len(data) / (time.perf_counter() - t))
    if run.device != "cuda":
        return out
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    for batch in (64, 256):
        def go(resize: bool, batch: int = batch) -> None:
            for i in range(0, len(tensors), batch):
                imgs = decode_jpeg(tensors[i:i + batch], device="cuda")
                if resize:
                    for im in imgs:
                        torch.nn.functional.interpolate(im[None].float(), size=(RESOLUTION, RESOLUTION),
                                                        mode="bilinear", antialias=True)
        go(False)
        for resize in (False, True):
            sync()
            t = time.perf_counter()
            go(resize)
            sync()
            out[f"gpu_batch{batch}{'_resize' if resize else ''}_images_s"] = round(len(data) /
                                                                                  (time.perf_counter() - t))
    return out


# --- loader -----------------------------------------------------------------------------

def loader_part(run: Run) -> dict:
    import torch

    import tokshard
    data = run.work / f"default-{run.device}"
    if not (data / "manifest.parquet").exists():
        return {"skipped": "no converted dataset (convert part failed)"}
    ds = tokshard.open(str(data))
    out: dict[str, Any] = {"samples": len(ds)}
    dev = torch.device(run.device)
    digests = set()
    for workers in (0, 4):
        for pin in (False, True):
            dl = ds.loader(256, num_workers=workers, pin_memory=pin)
            n, t = 0, time.perf_counter()
            digest = hashlib.sha256()
            for epoch in range(3):
                dl.set_epoch(epoch)
                for b in dl:
                    x = b["tokens"].to(dev, non_blocking=pin)
                    n += len(x)
                    # (what arrived: workers hand batches over through shared memory, and
                    # pinning copies them again; the bytes must not depend on either)
                    digest.update(b["id"].numpy().tobytes())
                    digest.update(b["tokens"].numpy().tobytes())
            sync()
            out[f"workers{workers}_pin{int(pin)}_samples_s"] = round(n / (time.perf_counter() - t))
            digests.add(digest.hexdigest())
    out["batches_identical_across_workers_and_pinning"] = len(digests) == 1
    return out


# --- train ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_part(run: Run) -> dict:
    tmp = run.work
    settings = ({"steps": 6, "batch-size": 16, "dim": 32, "depth": 1, "heads": 2, "num-workers": 1,
                 "ckpt-every": 3, "log-every": 3} if run.quick else
                {"steps": 300, "batch-size": 128, "dim": 192, "depth": 6, "heads": 6, "num-workers": 6,
                 "ckpt-every": 100, "log-every": 50})
    args = [a for k, v in settings.items() for a in (f"--{k}", str(v))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "tokshard.jobs.train", "--make-data", str(tmp / "train-data"),
           "--crops-per-photo", "3" if run.quick else "60", "--out", str(tmp / "train-run"), "--compare-pixels", *args]
    t = time.perf_counter()
    # Not from the repository's root: its tokshard/ folder would shadow the installed package.
    done = subprocess.run(cmd, text=True, capture_output=True, timeout=max(30, run.left() - 5), cwd=tmp)
    out: dict[str, Any] = {"settings": settings, "wall_s": round(time.perf_counter() - t, 1), "rc": done.returncode}
    if done.returncode:
        out["stderr"] = done.stderr[-3000:]
        return out
    for name, path in (("tokens", tmp / "train-run" / "result.json"),
                       ("pixels", tmp / "train-run" / "pixels" / "result.json")):
        r = json.loads(path.read_text())
        out[name] = {k: r.get(k) for k in ("accuracy", "chance", "samples_per_s", "params", "final_loss", "bf16",
                                           "train_s")}
    return out


# --- RESULTS.md -------------------------------------------------------------------------

def heading(res: dict) -> str:
    """A section per device: a run on another GPU does not replace this one's figures."""
    return f"{HEADING}: {res.get('env', {}).get('device', 'unknown device')}"


def section(res: dict) -> str:
    e = res.get("env", {})
    lines = [heading(res), "",
             f"_{res.get('started', '?')[:10]}, `python bench/gpu.py` on one {e.get('device', '?')} "
             f"({e.get('memory_gib', '?')} GiB, {e.get('cpus', '?')} CPU cores; torch {e.get('torch')}, CUDA "
             f"{e.get('cuda')}, cuDNN {e.get('cudnn')}; TF32 for convolutions "
             f"{'on' if e.get('cudnn_allow_tf32') else 'off'}"
             f" by default). VQGAN-class tokenizers at their public sizes with random weights (speed does not "
             f"depend on the weights; agreement with the CPU does, so read it as indicative)._", ""]
    tk = res.get("tokenizers", {})
    if "error" in tk or "skipped" in tk:
        lines += [f"Tokenizers: {tk.get('error') or tk.get('skipped')}", ""]
    elif tk:
        km = tk.get("kmeans-vq", {})
        lines += ["| tokenizer | settings | images/s on the GPU | codes equal to the CPU's | same codes on a rerun "
                  "| independent of the batch |", "|---|---|---:|---|---|---|"]
        for k, v in km.items():
            if k.startswith("gpu_images_s_batch"):
                lines.append(f"| kmeans-vq (default) | batch {k.removeprefix('gpu_images_s_batch')} | {v:,} | "
                             + (f"{km['vs_cpu']['tokens_equal']:.4%} of tokens, {km['vs_cpu']['images_identical']:.1%}"
                                f" of images | {km.get('repeat_identical')} | {km.get('batch_independent')} |"
                                if k.endswith("64") else "| | |"))
        lines.append(f"| kmeans-vq | CPU, {km.get('cpu_threads')} threads | {km.get('cpu_images_s', 0):,} (CPU) "
                     "| | | |")
        for name in ("vqgan-taming", "llamagen-vq16", "maskgit-vqgan"):
            row = tk.get(name, {})
            for key, cell in row.items():
                if not isinstance(cell, dict):
                    continue
                agree = ""
                if "vs_cpu" in cell:
                    agree = f"{cell['vs_cpu']['tokens_equal']:.2%} of tokens"
                    if "vs_cpu_no_tf32" in cell:
                        agree += f" ({cell['vs_cpu_no_tf32']['tokens_equal']:.2%} with TF32 off)"
                rep = str(cell.get("repeat_identical", ""))
                ind = str(cell.get("batch_independent", ""))
                lines.append(f"| {name} ({row.get('params_m')} M params) | {key.replace('_', ', ')} | "
                             f"{cell['images_s']:,.0f} | {agree} | {rep} | {ind} |")
            if "cpu_images_s" in row:
                lines.append(f"| {name} | CPU fp32, micro_batch 4 | {row['cpu_images_s']} (CPU) | | | |")
        lines.append("")
    cv = res.get("convert", {})
    if cv and "error" not in cv and "skipped" not in cv:
        lines += [f"Convert, {cv['images']:,} JPEGs in img2dataset tars to 256 px, local engine, "
                  f"{cv['decode_workers']} decode workers:", "",
                  "| tokenizer | wall s | images/s |", "|---|---:|---:|"]
        for k, v in cv.items():
            if isinstance(v, dict) and "wall_s" in v:
                lines.append(f"| {k.replace('_', ' ')} | {v['wall_s']} | {v['images_s']:,} |")
        lines += ["", f"Default tokenizer: shards and manifest on the GPU byte-identical to the CPU's: "
                      f"{'yes' if cv.get('default_gpu_equals_cpu_bytes') else 'NO'}."
                  + (f" Decoding ahead across units byte-identical to one unit at a time: "
                     f"{'yes' if cv['ahead_equals_one_unit_at_a_time_bytes'] else 'NO'}."
                     if "ahead_equals_one_unit_at_a_time_bytes" in cv else ""), ""]
    elif cv:
        lines += [f"Convert: {cv.get('error') or cv.get('skipped')}", ""]
    nj = res.get("nvjpeg", {})
    if nj and "error" not in nj and "skipped" not in nj:
        lines += [f"JPEG decode, {nj['images']:,} JPEGs (mean {nj['mean_kib']} KiB): simplejpeg on one CPU core "
                  f"{nj['cpu_simplejpeg_1core_images_s']:,} images/s; nvJPEG (torchvision {nj['torchvision']}) "
                  + ", ".join(f"{k.removeprefix('gpu_').removesuffix('_images_s').replace('_', ' ')} {v:,}/s"
                              for k, v in nj.items() if k.startswith("gpu_")) + ".", ""]
    elif nj:
        lines += [f"nvJPEG: {nj.get('error') or nj.get('skipped')}", ""]
    ld = res.get("loader", {})
    if ld and "error" not in ld and "skipped" not in ld:
        lines += [f"Loader to the GPU ({ld['samples']:,} samples, batch 256, 3 epochs): "
                  + ", ".join(f"{k.removesuffix('_samples_s').replace('_', ' ')} {v:,}/s"
                              for k, v in ld.items() if k.endswith("_samples_s")) + "; batches byte-identical "
                  f"across workers and pinning: {ld.get('batches_identical_across_workers_and_pinning')}.", ""]
    elif ld:
        lines += [f"Loader: {ld.get('error') or ld.get('skipped')}", ""]
    tr = res.get("train", {})
    if tr.get("rc") == 0:
        s = tr["settings"]
        lines += [f"Reference training on one GPU (`torchrun --nproc_per_node 1`, nccl, bf16 "
                  f"{tr['tokens'].get('bf16')}; ViT dim {s['dim']}, depth {s['depth']}, {s['steps']} steps of "
                  f"{s['batch-size']}, {s['num-workers']} loader workers): tokens "
                  f"{tr['tokens']['accuracy']:.3f} held-out accuracy at {tr['tokens']['samples_per_s']:,.0f} "
                  f"samples/s; pixels {tr['pixels']['accuracy']:.3f} at {tr['pixels']['samples_per_s']:,.0f} "
                  f"samples/s (chance {tr['tokens']['chance']:.3f}).", ""]
    elif tr:
        lines += [f"Training: {tr.get('error') or tr.get('skipped') or tr.get('stderr', '')[-500:]}", ""]
    lines += ray_lines(res.get("ray", {}))
    return "\n".join(lines)


def ray_lines(ry: dict) -> list[str]:
    if not ry:
        return []
    if "error" in ry or "skipped" in ry:
        return [f"Ray engine: {ry.get('error') or ry.get('skipped')}", ""]
    actors = (f"{ry['encoders']} tokenizer actor(s), {ry['gpus_per_encoder']:g} GPU each" if ry["gpus_per_encoder"]
              else f"{ry['encoders']} tokenizer actor(s) on the CPU")
    cluster = ry.get("cluster", {})
    rows = [("local engine", ry["local"], f"{ry['decode_workers']} decode workers, one process", "(reference)")]
    for label in ("ray_first_job", "ray"):
        if label in ry:
            name = "Ray, first job on a new cluster" if ry[label].get("first_job_on_the_cluster") else "Ray, second job"
            rows.append((name, ry[label], actors, "yes" if ry[f"{label}_equals_local_bytes"] else "NO"))
    lines = [f"Ray engine (GPU tokenizer actors) vs local engine: convert of the same {ry['images']:,} JPEGs "
             f"({ry.get('shards', '?')} shards), default tokenizer (kmeans-vq) on `{ry.get('device', 'cuda')}` "
             f"in both; a local Ray cluster of {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPU(s), "
             f"started in {ry['cluster_start_s']} s (not in the walls):", "",
             "| engine | workers | wall s | images/s | shards + manifest byte-identical to the local engine's |",
             "|---|---|---:|---:|---|"]
    lines += [f"| {name} | {how} | {cell['wall_s']} | {cell['images_s']:,} | {same} |"
              for name, cell, how, same in rows]
    if "ray_detected_gpus" in ry:
        lines += ["", f"(Ray detected {ry['ray_detected_gpus']:g} GPUs by itself; the cluster was started with "
                      f"num_gpus given.)"]
    return [*lines, ""]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for gpu.json (default: a new temporary folder)")
    p.add_argument("--work", help="folder for the data the parts make (default: a new temporary folder)")
    p.add_argument("--budget", type=float, default=270, help="seconds for the whole run")
    p.add_argument("--device", default="cuda", help="cuda (or cpu, to try the script out)")
    p.add_argument("--quick", action="store_true", help="small sizes, to try the script out")
    p.add_argument("--parts", default="env,tokenizers,train,convert,loader,nvjpeg,ray")
    p.add_argument("--record", metavar="GPU_JSON", help="write RESULTS.md's section from a run's gpu.json")
    p.add_argument("--results", metavar="PATH", help="the RESULTS.md that --record writes (default: bench's)")
    args = p.parse_args()
    if args.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import results_md
        from results_md import write_section
        if args.results:
            results_md.RESULTS = Path(args.results)
        res = json.loads(Path(args.record).read_text())
        text = section(res)
        print(text)
        write_section(heading(res), text)
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="tokshard-gpu-")).resolve()
    # Absolute: the ray and train parts run from the work folder.
    run = Run(out, Path(args.work or tempfile.mkdtemp(prefix="tokshard-gpu-work-")).resolve(), args.budget,
              args.device, args.quick)
    parts = {"env": (0, env), "tokenizers": (60, tokenizers), "convert": (40, convert_part),
             "nvjpeg": (15, nvjpeg), "loader": (15, loader_part), "train": (40, train_part),
             "ray": (60, ray_part)}
    for name in args.parts.split(","):
        needs, fn = parts[name]
        run.part(name, needs, fn)
    print(section(run.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
