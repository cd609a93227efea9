"""The reference training job (jobs/train.py) under real torchrun: 2 ranks over gloo train a
tiny ViT on tokens, checkpoint, and a second launch resumed from the mid-run checkpoint
trains exactly the batches, losses and weights of the uninterrupted run; held-out accuracy
is reported against chance. And the pixel baseline finds every sample's source pixels."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import torch

import tokshard
from tokshard.jobs.train import TrainConfig, source_pixels, train

WORLD = 2
# 213 samples, 8x8 grids: ~170 train samples = ~11 steps of 2 x 8 per epoch, so the resumed
# half (steps 8-14) crosses into epoch 1 and the loader's epoch change is resumed too.
TINY = ["--steps", "14", "--ckpt-every", "7", "--batch-size", "8", "--dim", "16", "--depth", "1",
        "--heads", "2", "--eval-batch-size", "64", "--num-workers", "1", "--log-every", "7",
        "--color-adapt", "0.5", "--mixup", "0.8", "--shuffle-buffer", "64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "tokshard.jobs.train", *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def log(run, rank):
    return [json.loads(line) for line in (run / f"log-rank{rank}.jsonl").read_text().splitlines()]


def test_train_resumes_exactly_under_torchrun(loader_datasets, tmp_path):
    data = loader_datasets[("parquet", "zstd")]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    done = torchrun("--data", data, "--out", full, *TINY)
    torchrun("--data", data, "--out", resumed, *TINY, "--resume", full / "ckpt-0000007.pt")

    assert sorted(p.name for p in full.glob("ckpt-*.pt")) == ["ckpt-0000007.pt", "ckpt-0000014.pt"]
    for rank in range(WORLD):
        a, b = log(full, rank), log(resumed, rank)
        assert [r["step"] for r in a] == list(range(1, 15)) and [r["step"] for r in b] == list(range(8, 15))
        assert a[7:] == b                                  # same samples, same loss, bit for bit
        assert {r["epoch"] for r in b} == {0, 1}           # the resumed half crosses an epoch
    # The ranks trained on different samples.
    assert not set(log(full, 0)[0]["ids"]) & set(log(full, 1)[0]["ids"])

    end_a = torch.load(full / "ckpt-0000014.pt", weights_only=True)
    end_b = torch.load(resumed / "ckpt-0000014.pt", weights_only=True)
    assert end_a["model"].keys() == end_b["model"].keys()
    assert all(torch.equal(end_a["model"][k], end_b["model"][k]) for k in end_a["model"])
    assert all(torch.equal(x, end_b["optimizer"]["state"][i][n])
               for i, st in end_a["optimizer"]["state"].items() for n, x in st.items())
    assert end_a["loader"] == end_b["loader"] and (end_a["step"], end_a["epoch"]) == (14, 1)

    ra, rb = (json.loads((run / "result.json").read_text()) for run in (full, resumed))
    ds = tokshard.open(data)
    held, _ = ds.split(0.2, seed=0)
    classes = max(label for _, _, _, label in ds) + 1       # photos 0..16: the fixture keeps 213 crops
    assert ra["num_classes"] == classes and ra["chance"] == 1 / classes
    assert ra["held_out"] == len(held) and 0 <= ra["accuracy"] <= 1
    assert (ra["accuracy"], rb["resumed_at"]) == (rb["accuracy"], 7)
    assert "held-out accuracy" in done.stdout and f"(chance {1 / classes:.3f})" in done.stdout


def test_pixel_baseline_reads_the_source_pixels(loader_datasets, tmp_path):
    data = loader_datasets[("parquet", "zstd")]
    ds = tokshard.open(data)
    keys = ds.keys[::-7]
    pixels = source_pixels(ds, keys, 64)
    assert pixels.shape == (len(keys), 64, 64, 3) and all(p.any() for p in pixels)
    # The pixels are the sample's image: re-encoded with the dataset's tokenizer they give
    # its stored tokens (the fixture's sources are 64 px already, so no resize intervenes).
    codes = ds.tokenizer().encode(pixels)
    stored = np.stack([ds.get(k)["tokens"] for k in keys])
    assert np.array_equal(codes, stored)

    threads = torch.get_num_threads()
    try:
        result = train(TrainConfig(data=str(data), out=str(tmp_path / "px"), input="pixels", steps=2,
                                   batch_size=8, dim=16, depth=1, heads=2, num_workers=0, threads=1))
    finally:
        torch.set_num_threads(threads)
    assert result["input"] == "pixels" and result["held_out"] > 0 and 0 <= result["accuracy"] <= 1
