"""The loader under real torchrun with gloo: every rank all_reduces once per step and the
epoch finishes (no rank has a batch the others wait for), every sample once (padding aside)."""

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import tokshard

WORLD, BATCH = 4, 53   # 213 samples: ranks of 53, 53, 53 and 54; at 53 a batch, 1 or 2 batches


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_all_reduce_every_step_and_finish(loader_datasets, tmp_path):
    path = loader_datasets[("parquet", "zstd")]
    ds = tokshard.open(path)
    # What the default prevents: uneven ranks differ in batch count (one rank would wait forever).
    uneven = {len(ds.loader(BATCH, rank=r, world_size=WORLD, even_batches=False)) for r in range(WORLD)}
    assert uneven == {1, 2}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).with_name("ddp_rank.py")),
           str(path), str(tmp_path), str(BATCH)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    assert [r["world"] for r in ranks] == [WORLD] * WORLD
    assert {r["steps"] for r in ranks} == {r["batches"] for r in ranks} == {2}
    real = [i for r in ranks for i, pad in zip(r["ids"], r["pads"]) if not pad]
    padded = [i for r in ranks for i, pad in zip(r["ids"], r["pads"]) if pad]
    assert Counter(real) == Counter(range(len(ds)))
    assert len(padded) == 3 and set(padded) <= set(real)   # 4 x 54 - 213 samples seen twice, marked
