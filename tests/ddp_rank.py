"""One rank of the DDP test (tests/test_ddp.py), run under torchrun: a training-loop
stand-in that all_reduces once per step, as DDP's gradient sync does, over the rank's
batches with the loader's defaults. Writes what the rank saw to OUT/rank-N.json.

    torchrun --nproc_per_node W tests/ddp_rank.py DATASET OUT BATCH_SIZE
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import tokshard


def main() -> None:
    dataset, out, batch_size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # rank and world size: from torch.distributed
    loader = tokshard.open(dataset).loader(batch_size, seed=5, shuffle_buffer=40)
    ids, pads, steps = [], [], 0
    for batch in loader:
        step = torch.tensor([float(len(batch["id"])), 1.0])
        dist.all_reduce(step)           # every rank must reach every step, or this waits forever
        steps += 1
        ids += batch["id"].tolist()
        pads += batch["pad"].tolist()
    dist.barrier()
    (out / f"rank-{rank}.json").write_text(json.dumps(
        {"steps": steps, "batches": len(loader), "ids": ids, "pads": pads, "world": dist.get_world_size()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
