"""Reference training job: a small SeiT-style ViT trained on a token dataset, under DDP.

    python -m tokshard.jobs.train --make-data DIR                      # bundled photos -> DIR/tokens
    python -m torch.distributed.run --nproc_per_node 2 -m tokshard.jobs.train \\
        --data DIR/tokens --out RUN [--steps 400 --batch-size 32 --dim 64 --depth 4] [--compare-pixels]
    ... --resume RUN                                                   # continue exactly from RUN's last checkpoint

What it shows is the training loop tokshard exists for:

- the model reads token grids (B, H, W): a token embedding initialised from the dataset's
  codebook (`ds.codebook()`; learned from scratch when the tokenizer has none), projected
  to the model width, position embeddings, pre-norm transformer blocks, mean pool, linear
  head (SeiT, Park et al., ICCV 2023, without its convolutional stem);
- token-space crop + flip run in the loader's workers, and embedding-space augmentations
  (Emb-Noise by default; ColorAdapt and mixup on request) run on the training device
  between the embedding lookup and the projection, where SeiT applies them;
- DDP through torchrun (gloo on CPU, nccl on CUDA), bf16 autocast where the device
  supports it, a checkpoint every `--ckpt-every` steps and at the end holding the model,
  the optimizer, the step, the epoch and `loader.state_dict()`: `--resume` continues with
  the exact batches, augmentations and updates of an uninterrupted run;
- the held-out part is `ds.split(--holdout, seed=0)` (by key hash); accuracy is reported
  against chance, and with `--compare-pixels` against the same architecture trained on the
  source pixels of the same samples (a patch-embedding stem instead of the token embedding;
  same steps, batch size, order of samples, optimizer and schedule).

Per step, each rank appends {"step", "epoch", "loss", "ids"} to RUN/log-rank{R}.jsonl (the
loss of its own batch before DDP averages the gradients, the sample ids it trained on): a
resumed run's lines equal the uninterrupted run's, which is what tests/test_train.py checks.
RUN/result.json holds the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokshard.errors import TokshardError, UsageError

if TYPE_CHECKING:
    from tokshard.pipeline.stream.access import TokenSubset
    from tokshard.pipeline.stream.dataset import TokenDataset

CHECKPOINT_FORMAT = "tokshard-train/1"
# Settings that change the model, the order of samples or their augmentation: a checkpoint
# resumed under other values would not continue the run it came from, so they must match.
# (`steps` may change: the run is then extended, with the schedule of the new length.)
MUST_MATCH = ("input", "batch_size", "dim", "depth", "heads", "lr", "weight_decay", "warmup", "seed",
              "holdout", "shuffle_buffer", "crop_scale", "emb_noise", "color_adapt", "mixup", "num_classes")


@dataclass
class TrainConfig:
    """The job's settings (the command line's options)."""
    data: str
    out: str
    input: str = "tokens"              # tokens | pixels (the baseline)
    steps: int = 400
    batch_size: int = 32               # per rank
    dim: int = 64
    depth: int = 4
    heads: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.1                # fraction of the steps
    seed: int = 0
    holdout: float = 0.2
    shuffle_buffer: int = 10_000
    crop_scale: float = 0.25           # lower bound of the random-resized-crop area
    emb_noise: float = 0.1             # EmbeddingNoise rel_std (0: off)
    color_adapt: float = 0.0           # ColorAdapt p (0: off)
    mixup: float = 0.0                 # EmbeddingMixup alpha (0: off)
    num_classes: int = 0               # 0: from the dataset's labels
    num_workers: int = 1
    ckpt_every: int = 100
    log_every: int = 20
    eval_batch_size: int = 128
    threads: int = 0                   # torch threads per rank; 0: the cores shared by the local ranks
    precision: str = "auto"            # auto (bf16 on CUDA that has it, else fp32) | fp32 | bf16
    resume: str | None = None
    pixel_sources: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.input not in ("tokens", "pixels"):
            raise UsageError(f"--input must be tokens or pixels, got {self.input!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UsageError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        for name in ("steps", "batch_size", "dim", "depth", "heads", "ckpt_every", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.dim % self.heads:
            raise UsageError(f"--dim {self.dim} must be a multiple of --heads {self.heads}")
        if not 0 < self.holdout < 1:
            raise UsageError("--holdout must be in (0, 1)")
        if not 0 < self.crop_scale <= 1:
            raise UsageError("--crop-scale must be in (0, 1]")
        if self.mixup and self.input == "pixels":
            raise UsageError("--mixup is an embedding-space augmentation of the token model; the pixel "
                             "baseline has none")


# -- the model -----------------------------------------------------------------------------

def _codebook_table(codebook: torch.Tensor) -> torch.Tensor:
    """The codebook centred and scaled to unit RMS: code embeddings of any tokenizer start at
    the scale of the position embeddings and activations, their relative geometry kept."""
    table = codebook.float() - codebook.float().mean(0)
    return table / table.pow(2).mean().sqrt().clamp_min(1e-8)


class TokenStem(nn.Module):
    """Token ids (B, H, W) -> code embeddings (B, C, H, W) -> the model width (B, H*W, dim).

    The two halves are separate so that embedding-space augmentations (augment_embed.py)
    run on the (B, C, H, W) maps in between, as SeiT applies them after the lookup."""

    def __init__(self, vocab_size: int, dim: int, codebook: torch.Tensor | None = None, code_dim: int = 32):
        super().__init__()
        if codebook is not None:
            if codebook.shape[0] != vocab_size:
                raise UsageError(f"the codebook has {codebook.shape[0]} codes, the dataset's vocabulary "
                                 f"{vocab_size}")
            # Initialised from the codebook and trained (SeiT freezes it; fine-tuning it costs
            # nothing here and lets codes the tokenizer confused drift apart).
            self.embed = nn.Embedding.from_pretrained(_codebook_table(codebook), freeze=False)
        else:
            self.embed = nn.Embedding(vocab_size, code_dim)
        self.proj = nn.Linear(self.embed.embedding_dim, dim)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens).permute(0, 3, 1, 2)

    def project(self, maps: torch.Tensor) -> torch.Tensor:
        return self.proj(maps.flatten(2).transpose(1, 2))


class PatchStem(nn.Module):
    """Pixels (B, 3, R, R) -> (B, (R/patch)^2, dim): a ViT patch embedding, for the baseline."""

    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.conv = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv(pixels).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """A stem, learned position embeddings, pre-norm transformer blocks, mean pool, head.

    `forward(x, augment=None)`: x is tokens for a TokenStem (`augment(maps) -> maps` runs
    between its lookup and projection) or normalised pixels for a PatchStem."""

    def __init__(self, stem: TokenStem | PatchStem, seq_len: int, dim: int, depth: int, heads: int,
                 num_classes: int):
        super().__init__()
        self.stem = stem
        self.pos = nn.Parameter(torch.zeros(1, seq_len, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        # dropout=0: no randomness outside the seeded augmentations, so a resumed run's
        # steps are the uninterrupted run's bit for bit.
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                ) -> torch.Tensor:
        if isinstance(self.stem, TokenStem):
            maps = self.stem.lookup(x)
            if augment is not None:
                maps = augment(maps)
            seq = self.stem.project(maps)
        else:
            seq = self.stem(x)
        h = self.blocks(seq + self.pos)
        return self.head(self.norm(h).mean(1))


def build_model(cfg: TrainConfig, ds: TokenDataset, num_classes: int, codebook: torch.Tensor | None,
                resolution: int) -> ViT:
    """The token model, or (cfg.input == "pixels") the same trunk on a patch-embedding stem
    whose patches make the same sequence length as the token grid."""
    h, w = ds.grid
    stem: TokenStem | PatchStem
    if cfg.input == "tokens":
        stem = TokenStem(ds.vocab_size, cfg.dim, codebook)
    else:
        if h != w or resolution % h:
            raise UsageError(f"the pixel baseline needs a square grid that divides the resolution; grid "
                             f"{ds.grid}, resolution {resolution}")
        stem = PatchStem(cfg.dim, resolution // h)
    return ViT(stem, h * w, cfg.dim, cfg.depth, cfg.heads, num_classes)


# -- data ------------------------------------------------------------------------------------

def make_data(dest: str | Path, crops_per_photo: int = 60, tokenizer_path: str | None = None,
              resolution: int | None = None, seed: int = 0) -> Path:
    """The bundled photos (and `crops_per_photo` random crops of each; label = which photo) as
    img2dataset tars under DEST/source, converted to a token dataset DEST/tokens with the
    default tokenizer (or the fitted one at `tokenizer_path`). No network. Returns DEST/tokens;
    a second call reuses what the first wrote."""
    from tokshard.pipeline.convert.job import ConvertConfig, convert
    from tokshard.pipeline.sample_data import write_img2dataset_shards
    dest = Path(dest)
    src, tokens = dest / "source", dest / "tokens"
    if not any(src.glob("*.tar")):
        write_img2dataset_shards(src, crops_per_photo=crops_per_photo, shard_size=256, seed=seed)
    options = {"path": str(tokenizer_path)} if tokenizer_path else {}
    convert(ConvertConfig(sources=[str(src)], out=str(tokens), tokenizer_options=options, resolution=resolution),
            quiet=True)
    return tokens


def count_classes(ds: TokenDataset) -> int:
    """Number of classes: the labels' class names, else the largest label + 1 (from the label
    table, which the manifest checks; read from the shards when the dataset has none)."""
    if ds.label_names:
        return len(ds.label_names)
    top: int | None = None
    try:
        from tokshard.pipeline.tools.query import run
        top = run(ds.url, "SELECT max(label) FROM labels", ds.storage_options)[1][0][0]
    except (ImportError, TokshardError):
        top = None
    if top is None:
        top = max((int(ds.read_shard(i)["label"].max(initial=-1)) for i in range(ds.num_shards)), default=-1)
    if top < 1:
        raise UsageError(f"{ds.url}: the samples have no labels (or one class): nothing to classify")
    return int(top) + 1


def source_pixels(ds: TokenDataset, keys: list[str], resolution: int, sources: list[str] | None = None,
                  ) -> np.ndarray:
    """(len(keys), R, R, 3) uint8: the pixels the tokenizer saw for those samples, read again
    from the sources (`sources`, default: the job spec's, announced on stderr before they are
    read, as `preview --originals` does: they are the dataset's word) and decoded and resized
    as convert did (its decode settings, at the tokenizer's resolution)."""
    from tokshard.pipeline.convert.decode import DecodeConfig
    from tokshard.pipeline.convert.sources import read_unit
    from tokshard.pipeline.convert.sources.plan import plan_sources
    from tokshard.pipeline.convert.stages import decode_records
    from tokshard.pipeline.tools.preview import announce_sources, job_plan
    job = job_plan(ds)
    if not sources:
        sources = job.sources
        announce_sources(sources)
    decode = DecodeConfig(**{**ds.info.decode, "resolution": resolution})
    columns = job.columns     # the column choices convert read the tables with
    plan = plan_sources(sources, job.shard_size, job.input_format, ds.storage_options, split=job.split,
                        image_column=columns.get("image_column"))
    want = {k: i for i, k in enumerate(keys)}
    out = np.zeros((len(keys), resolution, resolution, 3), np.uint8)
    found = np.zeros(len(keys), bool)

    def wanted() -> Iterator:
        for unit in plan.units:
            for rec in read_unit(unit, ds.storage_options, **columns):
                if rec.key in want and not found[want[rec.key]]:
                    yield rec

    for rec, dec in decode_records(wanted(), decode, workers=2):
        if dec is not None:
            out[want[rec.key]] = dec.image
            found[want[rec.key]] = True
    if not found.all():
        missing = [k for k, f in zip(keys, found) if not f]
        raise UsageError(f"the pixel baseline needs the source images: {len(missing)} of {len(keys)} samples "
                         f"(e.g. {missing[0]!r}) were not found in {', '.join(sources[:3])}"
                         f"{' ...' if len(sources) > 3 else ''}; point --pixel-sources at them")
    return out


class PixelBatch:
    """Loader augmentation of the pixel baseline: looks each sample's pixels up by key (in an
    .npy the job wrote, memory-mapped) and, for training, applies random-resized-crop and
    flip in the worker as the token model's crop and flip are, from the same per-batch
    generator. Adds "pixels": uint8 (B, 3, R, R)."""

    def __init__(self, path: str, keys: list[str], train: bool, crop_scale: float):
        self.path, self.index, self.train = path, {k: i for i, k in enumerate(keys)}, train
        self.crop_scale = crop_scale
        self._pixels: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}     # a worker maps the file itself

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        from tokshard.pipeline.stream.augment import EmbeddingRandomResizedCrop
        if self._pixels is None:
            self._pixels = np.load(self.path, mmap_mode="r")
        rows = np.fromiter((self.index[k] for k in batch["key"]), np.int64, count=len(batch["key"]))
        x = torch.from_numpy(np.ascontiguousarray(self._pixels[rows])).permute(0, 3, 1, 2)
        if self.train and len(rows):
            size = x.shape[-1]
            crop = EmbeddingRandomResizedCrop(size, scale=(self.crop_scale, 1.0))
            y = crop({"embeddings": x.float()}, generator)["embeddings"]
            flip = torch.rand(len(rows), generator=generator) < 0.5
            y = torch.where(flip[:, None, None, None], y.flip(3), y)
            x = y.round_().clamp_(0, 255).to(torch.uint8)
        return {**batch, "pixels": x.contiguous()}


# Per-channel statistics of natural images, for the pixel stem's input.
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


# -- distributed plumbing --------------------------------------------------------------------

@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()


def setup_distributed(threads: int) -> Dist:
    """Join the torchrun group (nccl on CUDA, gloo on CPU); a plain `python` run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    # Ranks on one machine share its cores: more threads than cores slows every rank down.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads or max(1, cores // local_world))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def _bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.precision == "fp32":
        return False
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if cfg.precision == "bf16" and not supported:
        # On CPU bf16 autocast is emulated on most chips: slower, and less exact. fp32 it is.
        raise UsageError("--precision bf16 needs a CUDA device with bf16")
    return supported


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine to zero: a function of the step alone, so a resumed run
    needs no scheduler state."""
    warm = max(1, round(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _seed64(*parts: int) -> int:
    """A generator seed from integers (splitmix64 over the parts), for per-step randomness."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


def find_checkpoint(path: str) -> Path:
    """`path` itself, or the newest checkpoint of the run folder `path`."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("ckpt-*.pt"))
        if not found:
            raise UsageError(f"--resume {path}: no checkpoint (ckpt-*.pt) in that folder")
        return found[-1]
    if not p.is_file():
        raise UsageError(f"--resume {path}: no such checkpoint")
    return p


def _save(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)     # a reader never sees half a checkpoint


# -- the job ---------------------------------------------------------------------------------

def train(cfg: TrainConfig, dd: Dist | None = None) -> dict[str, Any]:
    """Train `cfg.input` (tokens, or the pixel baseline) on cfg.data; returns the result
    (held-out accuracy, chance, samples/s, ...), which rank 0 also writes to OUT/result.json."""
    import tokshard
    from tokshard.pipeline.stream.augment import (
        ColorAdapt,
        Compose,
        EmbeddingMixup,
        EmbeddingNoise,
        TokenHFlip,
        TokenRandomResizedCrop,
    )
    cfg.check()
    dd = dd or setup_distributed(cfg.threads)
    out = Path(cfg.out)
    if not cfg.resume and any(out.glob("ckpt-*.pt")):
        # A fresh run would interleave its checkpoints with the old run's, and `--resume OUT`
        # would then pick whichever has the highest step.
        raise UsageError(f"{out} holds checkpoints of an earlier run: --resume {out} continues it, or "
                         "choose another --out")
    dd.barrier()      # (every rank has looked before rank 0 writes)
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
    ds = tokshard.open(cfg.data)
    if len(ds.grid) != 2 or ds.video is not None:
        raise UsageError(f"the reference job trains on 2-D token grids of images; {cfg.data} has samples of "
                         f"shape {ds.sample_shape}{' (video clips)' if ds.video is not None else ''}")
    held, rest = ds.split(cfg.holdout, seed=0)
    num_classes = cfg.num_classes or count_classes(ds)
    cfg.num_classes = num_classes
    # The tokenizer gives the codebook (the token embedding's initial value) and the
    # resolution the pixel baseline decodes at. A dataset whose tokenizer cannot be loaded
    # here (remote, or a format that runs code) still trains on tokens, with a learned embedding.
    try:
        tok = ds.tokenizer()
    except TokshardError as e:
        if cfg.input == "pixels":
            raise
        tok = None
        if dd.main:
            print(f"note: no codebook ({e}); the token embedding is learned from scratch", flush=True)
    book = tok.codebook() if tok is not None and cfg.input == "tokens" else None
    codebook = None if book is None else torch.as_tensor(np.asarray(book, np.float32))
    resolution = int(tok.resolution) if tok is not None else 0

    torch.manual_seed(cfg.seed)   # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = build_model(cfg, ds, num_classes, codebook, resolution).to(dd.device)
    params = sum(p.numel() for p in model.parameters())
    # Weight decay on the matrices only: not on biases, norms, position embeddings, nor the
    # code embeddings (decay would pull the codebook it starts from towards zero).
    decayed = {n for n, p in model.named_parameters() if p.ndim >= 2 and n != "pos" and not n.startswith("stem.embed")}
    decay = [p for n, p in model.named_parameters() if n in decayed]
    no_decay = [p for n, p in model.named_parameters() if n not in decayed]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))
    ddp: nn.Module = model
    if dd.world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[dd.device.index] if dd.device.type == "cuda"
                                                  else None)

    # Stage 1 (loader workers): crop + flip of the token grid, or of the pixels.
    train_aug: Callable[[dict, torch.Generator], dict]
    eval_aug: Callable[[dict, torch.Generator], dict] | None
    if cfg.input == "tokens":
        train_aug = Compose([TokenRandomResizedCrop(ds.grid, scale=(cfg.crop_scale, 1.0)), TokenHFlip()])
        eval_aug = None
    else:
        keys = sorted(set(rest.keys) | set(held.keys))
        cache = out / f"pixels-{resolution}.npy"
        if dd.main and not cache.exists():
            np.save(cache.with_name(cache.name + ".tmp.npy"),
                    source_pixels(ds, keys, resolution, cfg.pixel_sources or None))
            os.replace(cache.with_name(cache.name + ".tmp.npy"), cache)
        dd.barrier()
        train_aug = PixelBatch(str(cache), keys, True, cfg.crop_scale)
        eval_aug = PixelBatch(str(cache), keys, False, cfg.crop_scale)
    loader = rest.loader(cfg.batch_size, rank=dd.rank, world_size=dd.world, seed=cfg.seed,
                         shuffle_buffer=cfg.shuffle_buffer, augment=train_aug, num_workers=cfg.num_workers)
    # Stage 2 (device): embedding-space augmentations between lookup and projection.
    embed_aug: list = []
    if isinstance(model.stem, TokenStem):
        if cfg.color_adapt:
            embed_aug.append(ColorAdapt(p=cfg.color_adapt))
        if cfg.emb_noise:
            embed_aug.append(EmbeddingNoise(model.stem.embed.weight.detach().cpu(), rel_std=cfg.emb_noise))
        if cfg.mixup:
            embed_aug.append(EmbeddingMixup(num_classes, alpha=cfg.mixup))
    device_aug = Compose(embed_aug) if embed_aug else None

    if len(loader) == 0:
        raise UsageError(f"{cfg.data}: the training part has fewer samples than one batch per rank")
    step, epoch, resumed_at = 0, 0, None
    if cfg.resume:
        path = find_checkpoint(cfg.resume)
        state = torch.load(path, map_location=dd.device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"{path} is not a checkpoint of this job")
        diff = {k: (state["config"].get(k), getattr(cfg, k)) for k in MUST_MATCH
                if state["config"].get(k) != getattr(cfg, k)}
        if diff:
            raise UsageError(f"{path} was saved with other settings, so the run would not continue: " +
                             ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items()))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        step, epoch = int(state["step"]), int(state["epoch"])
        resumed_at = step
        if dd.main:
            print(f"resumed from {path} at step {step} (epoch {epoch})", flush=True)

    use_bf16 = _bf16(cfg, dd.device)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    # A local dataset path is kept absolute: `--resume` takes it from here when --data is not given.
    saved_config = {**asdict(cfg), "data": cfg.data if "://" in cfg.data else str(Path(cfg.data).resolve())}

    def save(at: int) -> None:
        if dd.main:
            _save(out / f"ckpt-{at:07d}.pt", {
                "format": CHECKPOINT_FORMAT, "step": at, "epoch": loader.epoch, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "loader": loader.state_dict(), "config": saved_config})

    # A resumed run appends (lines after its checkpoint's step, from before an interruption,
    # are then followed by the same steps again: the later lines are the run's).
    log = (out / f"log-rank{dd.rank}.jsonl").open("a" if cfg.resume else "w")
    ddp.train()
    samples, losses, ckpt_s = 0, [], 0.0
    t0 = time.perf_counter()
    while step < cfg.steps:
        for batch in loader:
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            labels = batch["label"].to(dd.device, non_blocking=True)
            holder: dict[str, torch.Tensor | None] = {"target": None}
            augment = None
            if cfg.input == "tokens":
                x = batch["tokens"].to(dd.device, non_blocking=True)
                if device_aug is not None:
                    # One CPU generator per (seed, step, rank): replayable after a resume.
                    gen = torch.Generator().manual_seed(_seed64(cfg.seed, step, dd.rank))

                    def augment(maps: torch.Tensor, gen: torch.Generator = gen, labels: torch.Tensor = labels,
                                x: torch.Tensor = x, holder: dict = holder) -> torch.Tensor:
                        got = device_aug({"tokens": x, "label": labels, "embeddings": maps}, gen)
                        holder["target"] = got.get("target")
                        return got["embeddings"]
            else:
                x = (batch["pixels"].to(dd.device, non_blocking=True).float() - _MEAN.to(dd.device)) \
                    / _STD.to(dd.device)
            with autocast():
                logits = ddp(x, augment)
            target = holder["target"]
            if target is not None:
                loss = torch.sum(-target.to(logits.device) * F.log_softmax(logits.float(), -1), -1).mean()
            else:
                loss = F.cross_entropy(logits.float(), labels, ignore_index=-1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            samples += len(labels)
            losses.append(loss.item())
            log.write(json.dumps({"step": step, "epoch": loader.epoch, "loss": losses[-1],
                                  "ids": batch["id"].tolist()}) + "\n")
            log.flush()
            if dd.main and (step % cfg.log_every == 0 or step == cfg.steps):
                rate = samples * dd.world / (time.perf_counter() - t0)
                print(f"step {step}/{cfg.steps} epoch {loader.epoch} loss {np.mean(losses[-cfg.log_every:]):.4f} "
                      f"lr {lr_at(cfg, step - 1):.2e} {rate:.0f} samples/s", flush=True)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                t_ckpt = time.perf_counter()
                save(step)
                ckpt_s += time.perf_counter() - t_ckpt
            if step >= cfg.steps:
                break
    train_s = time.perf_counter() - t0 - ckpt_s
    log.close()
    total = dd.sum([float(samples)])[0]

    acc, seen = evaluate(model, held, cfg, dd, eval_aug, autocast)
    result = {"input": cfg.input, "accuracy": acc, "chance": 1 / num_classes, "num_classes": num_classes,
              "held_out": int(seen), "train_samples": len(rest), "steps": cfg.steps, "resumed_at": resumed_at,
              "batch_size": cfg.batch_size, "world_size": dd.world,
              "params": params, "train_s": train_s, "samples_per_s": total / train_s if train_s else 0.0,
              "final_loss": float(np.mean(losses[-cfg.log_every:])) if losses else None, "bf16": use_bf16,
              "device": dd.device.type, "grid": list(ds.grid), "resolution": resolution}
    if dd.main:
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"{cfg.input}: held-out accuracy {acc:.3f} on {int(seen)} samples (chance {1 / num_classes:.3f}), "
              f"{result['samples_per_s']:.0f} samples/s", flush=True)
    return result


@torch.no_grad()
def evaluate(model: ViT, held: TokenSubset, cfg: TrainConfig, dd: Dist,
             augment: Callable[[dict, torch.Generator], dict] | None,
             autocast: Callable[[], contextlib.AbstractContextManager]) -> tuple[float, float]:
    """(accuracy, samples counted) on the held-out part, over every rank, pad samples left out."""
    model.eval()
    loader = held.loader(cfg.eval_batch_size, rank=dd.rank, world_size=dd.world, shuffle=False, augment=augment)
    correct = count = 0.0
    for batch in loader:
        if cfg.input == "tokens":
            x = batch["tokens"].to(dd.device)
        else:
            x = (batch["pixels"].to(dd.device).float() - _MEAN.to(dd.device)) / _STD.to(dd.device)
        with autocast():
            pred = model(x).argmax(-1).cpu()
        real = ~batch["pad"] & (batch["label"] >= 0)
        correct += float((pred == batch["label"])[real].sum())
        count += float(real.sum())
    model.train()
    correct, count = dd.sum([correct, count])
    return (correct / count if count else 0.0), count


def comparison_table(results: dict[str, dict]) -> str:
    """Markdown rows: held-out accuracy per input, against chance."""
    rows = ["| input | held-out accuracy | vs chance | samples/s (all ranks) | params | final train loss |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        loss = "n/a" if r["final_loss"] is None else f"{r['final_loss']:.3f}"
        rows.append(f"| {name} | {r['accuracy']:.3f} | {r['accuracy'] / r['chance']:.1f}x | "
                    f"{r['samples_per_s']:.0f} | {r['params']:,} | {loss} |")
    chance = next(iter(results.values()))["chance"]
    rows.append(f"| chance (1/{round(1 / chance)}) | {chance:.3f} | 1.0x | | | |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig | None, argparse.Namespace, set[str]]:
    """(the config, or None for --make-data alone; the arguments; the config fields given on
    the command line, which a resumed run keeps while it takes the others from its checkpoint)."""
    p = argparse.ArgumentParser(prog="python -m tokshard.jobs.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=argparse.SUPPRESS, help="a token dataset (tokshard convert's output)")
    p.add_argument("--out", default=argparse.SUPPRESS, help="the run folder: checkpoints, logs, result.json")
    p.add_argument("--make-data", metavar="DIR", help="convert the bundled photos into DIR/tokens first "
                   "(DIR/source holds the JPEG tars the pixel baseline reads); --data defaults to it")
    p.add_argument("--crops-per-photo", type=int, default=60, help="with --make-data (default 60: 1,159 images)")
    p.add_argument("--tokenizer-path", help="with --make-data: a fitted tokenizer (default: the default tokenizer)")
    p.add_argument("--compare-pixels", action="store_true",
                   help="then train the pixel baseline (same trunk, patch stem) into OUT/pixels and compare")
    defaults = TrainConfig("", "")
    choices = {"input": ("tokens", "pixels"), "precision": ("auto", "fp32", "bf16")}
    for f in TrainConfig.__dataclass_fields__.values():
        if f.name in ("data", "out", "pixel_sources"):
            continue
        value = getattr(defaults, f.name)
        kind = type(value) if value is not None else str
        what = "a checkpoint, or a run folder (its newest checkpoint); the settings not given are the " \
            "checkpoint's" if f.name == "resume" else f"default {value}"
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=argparse.SUPPRESS,
                       choices=choices.get(f.name), help=what)
    p.add_argument("--pixel-sources", nargs="+", default=argparse.SUPPRESS, help="where the pixel baseline "
                   "reads the source images (default: the sources the dataset's job spec names, announced)")
    args = p.parse_args(argv)
    given = {k for k in vars(args) if k in TrainConfig.__dataclass_fields__}
    if "out" not in given:
        if args.make_data is None:
            p.error("--out is required (or --make-data DIR alone)")
        return None, args, given
    if "data" not in given and args.make_data:
        args.data = str(Path(args.make_data) / "tokens")
        given.add("data")
    if "data" not in given and "resume" not in given:
        p.error("--data is required (or --make-data DIR, or --resume CKPT)")
    return TrainConfig(**{"data": "", **{k: getattr(args, k) for k in given}}), args, given


def inherit_settings(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """A resumed run's config: what the command line gave, the rest from the checkpoint (so
    `--out RUN --resume RUN` alone continues a run with its own model, data and schedule)."""
    if not cfg.resume:
        return cfg
    path = find_checkpoint(cfg.resume)
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("config")
    if not isinstance(saved, dict):
        raise UsageError(f"{path} is not a checkpoint of this job")
    keep = given | {"out", "resume"}
    values = {**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__ and k not in keep},
              **{k: getattr(cfg, k) for k in keep}}
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args, given = parse_args(argv)
        if cfg is not None:
            cfg = inherit_settings(cfg, given)
        dd = setup_distributed(cfg.threads if cfg else 0)
        if args.make_data:
            if dd.main:
                print(f"token dataset: {make_data(args.make_data, args.crops_per_photo, args.tokenizer_path)}",
                      flush=True)
            dd.barrier()
        if cfg is None:
            return 0
        results = {"tokens" if cfg.input == "tokens" else "pixels": train(cfg, dd)}
        if args.compare_pixels and cfg.input == "tokens":
            pixel_out = Path(cfg.out) / "pixels"
            # `--resume RUN` continues the baseline too, from its own checkpoints.
            again = str(pixel_out) if cfg.resume and any(pixel_out.glob("ckpt-*.pt")) else None
            pixels = TrainConfig(**{**asdict(cfg), "input": "pixels", "out": str(pixel_out), "resume": again,
                                    "mixup": 0.0})
            results["pixels"] = train(pixels, dd)
            if dd.main:
                table = comparison_table(results)
                (Path(cfg.out) / "comparison.md").write_text(table + "\n")
                print(table, flush=True)
        if dd.world > 1:
            dist.barrier()
            dist.destroy_process_group()
    except TokshardError as e:
        print(f"tokshard train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
