"""Reference training (jobs/train.py): held-out accuracy of a small ViT trained on tokens,
against chance and against the same model trained on the source pixels, and samples/s.

- Data: the bundled photos plus `CROPS` random crops of each (label = which photo, 19
  classes), written as img2dataset tars and converted with the default tokenizer (256 px,
  16x16 grid of 1024 codes); held out: `ds.split(0.2, seed=0)`, by key hash.
- Run: `torchrun --nproc_per_node 2 -m tokshard.jobs.train --compare-pixels` on this
  machine's CPUs (gloo, one torch thread per rank, one loader worker per rank), the
  settings below; the pixel baseline is the same trunk on a 16x16-patch stem over the
  decoded 256 px images, same steps, batch size, sample order, optimizer and schedule.

    python bench/train.py

Writes the table into bench/RESULTS.md under "## Reference training (jobs/train.py)".
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_md import publish  # bench/ is the script's folder, so on sys.path

HEADING = "## Reference training (jobs/train.py)"
CROPS = 60
RANKS = 2
SETTINGS = {"steps": 150, "batch-size": 32, "dim": 64, "depth": 4, "heads": 4, "lr": 1e-3, "num-workers": 1,
            "ckpt-every": 50, "log-every": 25}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    t0 = time.perf_counter()
    import tokshard
    from tokshard.jobs.train import comparison_table, make_data
    with tempfile.TemporaryDirectory(prefix="tokshard-bench-") as tmp:
        tmp = Path(tmp)
        data = make_data(tmp / "data", crops_per_photo=CROPS)
        ds = tokshard.open(data)
        n, grid, vocab = len(ds), ds.grid, ds.vocab_size
        held, rest = ds.split(0.2, seed=0)
        token_bytes = int(ds.shard_bytes.sum())
        jpeg_bytes = sum(p.stat().st_size for p in (tmp / "data" / "source").glob("*.tar"))
        run = tmp / "run"
        args = [a for k, v in SETTINGS.items() for a in (f"--{k}", str(v))]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "tokshard.jobs.train", "--data", str(data),
               "--out", str(run), "--compare-pixels", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        started = time.perf_counter()
        done = subprocess.run(cmd, env=env, text=True, capture_output=True)
        wall = time.perf_counter() - started
        if done.returncode:
            print(done.stdout[-3000:], done.stderr[-5000:], file=sys.stderr)
            return 1
        print(done.stdout, file=sys.stderr)
        results = {"tokens": json.loads((run / "result.json").read_text()),
                   "pixels": json.loads((run / "pixels" / "result.json").read_text())}
    tok, pix = results["tokens"], results["pixels"]
    per_rank = SETTINGS["batch-size"]
    lines = [
        HEADING, "",
        f"_{datetime.date.today().isoformat()}, `python bench/train.py`, {os.cpu_count()}-core CPU machine, no GPU: "
        f"`torchrun --nproc_per_node {RANKS}` (gloo, 1 torch thread and 1 loader worker per rank, fp32). "
        f"Data: {n:,} images (19 bundled photos + {CROPS} random crops each; label = which photo, "
        f"{tok['num_classes']} classes) converted with the default tokenizer ({grid[0]}x{grid[1]} tokens of "
        f"{vocab} codes at {tok['resolution']} px); held out by key hash (`ds.split(0.2, seed=0)`): "
        f"{len(held)} samples, trained on the other {len(rest)}. ViT: dim {SETTINGS['dim']}, depth "
        f"{SETTINGS['depth']}, {SETTINGS['heads']} heads, mean pool; AdamW lr {SETTINGS['lr']}, wd 0.05, 10% "
        f"warmup + cosine; {SETTINGS['steps']} steps of {per_rank} per rank ({per_rank * RANKS} a step, "
        f"{SETTINGS['steps'] * per_rank * RANKS / len(rest):.1f} epochs). Whole run (both models, startup, "
        f"checkpoints, evaluation): {wall:.0f} s._", "",
        comparison_table(results), "",
        f"Tokens: codebook-initialised embedding ({tok['params'] - pix['params']:+,} parameters against the "
        f"pixel stem), TokenRandomResizedCrop (scale 0.25-1) + TokenHFlip in the loader worker, EmbeddingNoise "
        f"(rel_std 0.1) on the device. Pixels: the same trunk on a {tok['resolution'] // grid[0]}x"
        f"{tok['resolution'] // grid[0]} patch stem over the source JPEGs decoded and resized as convert "
        f"did, RandomResizedCrop (same scale range, bilinear) + flip in the loader worker. Same steps, batch size, "
        f"sample order, optimizer and schedule; samples/s counts training steps only (not startup, "
        f"checkpoints or evaluation). The token dataset stores {token_bytes / n:,.0f} B/image against "
        f"{jpeg_bytes / n:,.0f} B/image of source JPEG tars ({token_bytes / jpeg_bytes:.1%}).", "",
        f"Tokens vs pixels: {tok['accuracy']:.3f} vs {pix['accuracy']:.3f} held-out accuracy "
        f"({tok['accuracy'] - pix['accuracy']:+.3f}), {tok['accuracy'] / tok['chance']:.1f}x chance; "
        f"{tok['samples_per_s'] / pix['samples_per_s']:.2f}x the pixel model's training samples/s (same trunk: "
        "the pixel model also pays for cropping and resizing 256 px images in the loader workers, on the cores "
        "the ranks use, and for its convolution stem; samples/s on this shared 2-core VM vary by tens of percent "
        "from run to run, so read the speed ratio as rough). "
        "Caveat: the task is small (which of 19 photos a crop comes from; held-out crops are new crops of "
        "photos seen in training) and one seed is run: it shows that the pipeline trains end to end and "
        "what tokens keep, not an ImageNet result.", "",
    ]
    publish(HEADING, "\n".join(lines), t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
