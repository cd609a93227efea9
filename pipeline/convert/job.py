"""The convert job: plan units, fit the codec if it needs it, run the units on
an engine, and commit the manifest last.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from tokshard import __version__
from tokshard.pipeline.format.codecs import get_codec, token_dtype
from tokshard.pipeline.convert.decode import DecodeConfig
from tokshard.errors import JobError, UsageError
from tokshard.pipeline.format.manifest import LABELS_FILE, write_labels, write_manifest, write_timings
from tokshard.pipeline.format.shards import FORMATS
from tokshard.pipeline.convert.sources import plan_units
from tokshard.pipeline.storage import atomic_write, clean_temporaries, filesystem, join
from tokshard.pipeline.convert.select import check_predicate
from tokshard.pipeline.convert.video import ClipConfig
from tokshard.pipeline.convert.views import decode_resolution, view_names
from tokshard.pipeline.convert.stages import TokenizerInfo, UnitContext, load_receipt, tokenize_unit
from tokshard.tokenizers.base import artifact_files, canonical_json, sha256_hex
from tokshard.tokenizers.registry import load_tokenizer


@dataclass
class ConvertConfig:
    sources: list[str]
    out: str
    format: str = "parquet"
    codec: str = "zstd"
    codec_params: dict = field(default_factory=dict)
    tokenizer: str = "kmeans-vq"
    tokenizer_options: dict = field(default_factory=dict)
    shard_size: int = 10_000
    resolution: int | None = None
    resize_mode: str = "center_crop"
    input_format: str = "auto"
    max_pixels: int = 89_478_485
    min_image_size: int = 0
    codec_fit_samples: int = 2048
    decode_workers: int = 2
    storage_options: dict | None = None
    columns: dict = field(default_factory=dict)   # image/caption/label/key column names for Parquet sources
    views: str = "none"                           # none | hflip | tencrop: stored views per image
    clip_frames: int | None = None                # set: a video job, one sample per clip of this many frames
    clip_fps: float | None = None                 # sample frames at this rate (default: the source's)
    clip_stride: int | None = None                # sampled frames between clip starts (default: clip_frames)
    max_clips: int = 64                           # clips per video at most
    where: str | None = None                      # keep only source samples this SQL predicate selects
    engine: str = "local"                         # local | ray
    address: str | None = None                    # Ray cluster address ("auto" inside `ray job submit`)
    encoders: int = 0                             # Ray tokenizer actors (0: one per GPU; no GPU: whole-unit tasks)
    gpus_per_encoder: float | None = None         # None: 1 where the cluster has GPUs, else 0
    retries: int = 2                              # extra attempts for a unit that fails

    def job_identity(self) -> dict:
        """What decides the output bytes (not where it goes or how fast)."""
        d = asdict(self)
        for k in ("out", "decode_workers", "storage_options", "engine", "address", "encoders",
                  "gpus_per_encoder", "retries"):
            d.pop(k)
        d["tokenizer_options"] = {k: v for k, v in d["tokenizer_options"].items()
                                  if k not in ("device", "path")}
        return d


ENGINES = ("local", "ray")
RECEIPT_READERS = 16


class _Progress:
    """A live bar: shards done/failed, images/s, skips by reason; and the totals."""

    def __init__(self, total: int, done: int, quiet: bool):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=done, unit="shard", disable=quiet, file=sys.stderr,
                        dynamic_ncols=True)
        self.receipts: list[dict] = []
        self.failures: list[tuple] = []
        self.samples, self.skips, self.started = 0, Counter(), time.perf_counter()

    def receipt(self, r: dict) -> None:
        self.receipts.append(r)
        # Running totals: summing all receipts per update is quadratic at 100k+ shards.
        self.samples += r["shard"]["samples"]
        for item in r["shard"]["skipped_by_reason"]:
            self.skips[item["reason"]] += item["count"]
        self._update()

    def failure(self, unit, error: str) -> None:
        self.failures.append((unit, error))
        self._update()

    def _update(self) -> None:
        rate = self.samples / max(time.perf_counter() - self.started, 1e-9)
        post = {"img/s": f"{rate:.0f}", "failed": len(self.failures)}
        post.update(self.skips.most_common(3))
        self.bar.update(1)
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        self.bar.close()


def convert(cfg: ConvertConfig, quiet: bool = False) -> dict:
    if cfg.format not in FORMATS:
        raise UsageError(f"unknown format {cfg.format!r} (one of {', '.join(FORMATS)})")
    if cfg.shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    if cfg.engine not in ENGINES:
        raise UsageError(f"unknown engine {cfg.engine!r} (one of {', '.join(ENGINES)})")
    started = time.perf_counter()
    opts = dict(cfg.tokenizer_options)
    if cfg.resolution:
        opts["resolution"] = cfg.resolution
    tok = load_tokenizer(cfg.tokenizer, opts)
    views = view_names(cfg.views)
    clip = _clip_config(cfg)
    if cfg.where:
        check_predicate(cfg.where)
    try:
        decode = DecodeConfig(resolution=decode_resolution(cfg.views, tok.resolution), resize_mode=cfg.resize_mode,
                              max_pixels=cfg.max_pixels, min_image_size=cfg.min_image_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    codec = get_codec(cfg.codec, tok.vocab_size, **cfg.codec_params)
    units = plan_units(cfg.sources, cfg.shard_size, cfg.input_format, cfg.storage_options)
    if not units:
        raise UsageError("no input found in " + " ".join(cfg.sources))
    fs, root = filesystem(cfg.out, cfg.storage_options)
    identity = tok.identity()
    job = {"tokshard": __version__, "config": cfg.job_identity(), **identity.as_dict()}
    job_hash = sha256_hex(canonical_json(job))
    _claim_destination(fs, root, job, job_hash)
    clean_temporaries(fs, root)

    ctx = UnitContext(fs=fs, root=root, format=cfg.format, tokenizer=TokenizerInfo.of(tok), codec=codec,
                      decode=decode,
                      job_hash=job_hash, decode_workers=cfg.decode_workers,
                      storage_options=cfg.storage_options, columns=cfg.columns, views=cfg.views, clip=clip,
                      where=cfg.where,
                      clip_shape=_clip_shape(tok, clip))
    if codec.needs_fit:
        _fit_codec(ctx, tok, units, cfg.codec_fit_samples)
    _save_tokenizer(tok, fs, root)

    committed, todo = {}, []
    # Receipts are small objects, one per shard: on an object store, reading 100k+ of them
    # one after the other takes minutes, so they are read concurrently.
    with ThreadPoolExecutor(RECEIPT_READERS) as pool:
        found = list(pool.map(lambda u: load_receipt(u, ctx), units))
    for unit, receipt in zip(units, found):
        if receipt is None:
            todo.append(unit)
        else:
            committed[unit.index] = receipt
    progress = _Progress(len(units), len(committed), quiet)
    try:
        if cfg.engine == "ray":
            from tokshard.pipeline.convert.engines import ray as engine_ray
            engine_ray.run(todo, ctx, tok, retries=cfg.retries, on_receipt=progress.receipt,
                           on_failure=progress.failure, address=cfg.address, tokenizer_name=cfg.tokenizer,
                           tokenizer_options=opts, encoders=cfg.encoders, gpus_per_encoder=cfg.gpus_per_encoder)
        else:
            from tokshard.pipeline.convert.engines import local as engine_local
            engine_local.run(todo, ctx, tok, retries=cfg.retries, on_receipt=progress.receipt,
                             on_failure=progress.failure)
    finally:
        progress.close()
    if progress.failures:
        unit, error = progress.failures[0]
        raise JobError(f"{len(progress.failures)} of {len(units)} shards failed after {cfg.retries + 1} "
                       f"attempts (first: shard {unit.index:06d} from {unit.url}: {error}); "
                       f"{len(committed) + len(progress.receipts)} are committed and kept. "
                       "Re-run the same command to retry the failed ones; the manifest is written "
                       "when every shard is committed")
    for r in progress.receipts:
        committed[r["shard"]["unit"]] = r
    receipts = [committed[u.index] for u in units]
    done_before = len(units) - len(progress.receipts)

    rows = [r["shard"] for r in receipts]
    totals = {k: int(sum(r[k] for r in rows)) for k in
              ("samples", "tokens", "raw_bytes", "payload_bytes", "stored_bytes", "source_bytes", "skipped")}
    skips: dict[str, int] = {}
    for r in rows:
        for item in r["skipped_by_reason"]:
            skips[item["reason"]] = skips.get(item["reason"], 0) + item["count"]
    state = codec.state()
    dataset = {
        "tokshard_version": __version__, "format": cfg.format, "codec": codec.describe(),
        "tokenizer": {"name": tok.name, **identity.as_dict(), "config": tok.config(),
                      "vocab_size": tok.vocab_size, "path": "tokenizer"},
        "grid": list(tok.grid_shape), "views": list(views), "sample_shape": list(ctx.sample_shape),
        "video": None if clip is None else {**asdict(clip), "tokenized": "per_clip" if ctx.clip_shape else "per_frame"},
        "token_dtype": token_dtype(tok.vocab_size).name,
        "decode": asdict(decode), "sources": list(cfg.sources), "job_hash": job_hash,
        "shards": len(rows), "totals": totals, "skipped_by_reason": dict(sorted(skips.items())),
        "codec_state": "codec/state.bin" if state is not None else None,
        "codec_state_bytes": len(state or b""),
        "labels": LABELS_FILE,
    }
    write_labels(fs, root, receipts)
    write_manifest(fs, root, rows, dataset)
    write_timings(fs, root, [{"shard": r["shard"]["shard"], **{
        k: float(r["timings"].get(k, 0.0)) for k in ("decode_s", "encode_s", "write_s")}} for r in receipts])
    elapsed = time.perf_counter() - started
    return {"dataset": dataset, "elapsed_s": elapsed, "units_reused": done_before}


def _clip_config(cfg: ConvertConfig) -> ClipConfig | None:
    if cfg.clip_frames is None:
        return None
    if cfg.views != "none":
        raise UsageError("--views applies to images; a video job stores clips")
    try:
        return ClipConfig(frames=cfg.clip_frames, fps=cfg.clip_fps, stride=cfg.clip_stride,
                          max_clips=cfg.max_clips)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _clip_shape(tok, clip: ClipConfig | None) -> tuple[int, ...] | None:
    """Codes of one clip from a clip (3-D) tokenizer; None: frame by frame."""
    if clip is None or not hasattr(tok, "clip_grid_shape"):
        return None
    try:
        return tuple(tok.clip_grid_shape(clip.frames))
    except ValueError as e:
        raise UsageError(f"tokenizer {tok.name}: {e}") from None


def _save_tokenizer(tok, fs, root: str) -> None:
    """A copy of the tokenizer artifact inside the dataset, so it decodes on its own."""
    for rel, data in artifact_files(tok).items():
        atomic_write(fs, join(root, "tokenizer", *rel.split("/")), data)


def _claim_destination(fs, root: str, job: dict, job_hash: str) -> None:
    """Refuse to mix two different jobs in one destination."""
    path = join(root, "_work", "job.json")
    if fs.exists(path):
        previous = json.loads(fs.cat_file(path))
        if previous.get("codebook_hash") != job.get("codebook_hash"):
            raise UsageError(f"{root} holds tokens of a different tokenizer codebook "
                             f"({previous.get('tokenizer_id')} {str(previous.get('codebook_hash'))[:12]}, now "
                             f"{job.get('tokenizer_id')} {str(job.get('codebook_hash'))[:12]}): its codes would "
                             "not mean the same; use a new --out")
        if previous.get("job_hash") != job_hash:
            raise UsageError(f"{root} holds a dataset made with a different config or tokenizer; "
                             "use a new --out (or delete it)")
        return
    atomic_write(fs, path, json.dumps({"job_hash": job_hash, **job}, sort_keys=True, indent=1).encode())


def _fit_codec(ctx: UnitContext, tok, units, limit: int) -> None:
    """Train the codec's state on the first `limit` samples, once per destination."""
    path = join(ctx.root, "codec", "state.bin")
    if ctx.fs.exists(path):
        ctx.codec.load_state(ctx.fs.cat_file(path))
        return
    samples: list[np.ndarray] = []
    dtype = token_dtype(ctx.tokenizer.vocab_size)
    for unit in units:
        batches, _ = tokenize_unit(unit, ctx, tok, limit=limit - len(samples))
        # Shaped (grid, views or frames): context-modelling codecs read the geometry from it.
        samples += [c.astype(dtype) for b in batches for c in b.codes]
        if len(samples) >= limit:
            break
    ctx.codec.fit(samples)
    atomic_write(ctx.fs, path, ctx.codec.state())


def fit_tokenizer_from_sources(sources: list[str], out: str, *, max_images: int = 5000, **fit_kwargs):
    """`tokshard fit-tokenizer`: decode up to `max_images` source images and fit k-means VQ
    (settings not given: those of the default tokenizer)."""
    from tokshard.pipeline.convert.sources import read_unit
    from tokshard.pipeline.convert.stages import decode_records
    from tokshard.tokenizers.kmeans_fit import DEFAULT_FIT, fit_kmeans_vq

    fit_kwargs = {**DEFAULT_FIT, **fit_kwargs}
    resolution, seed = fit_kwargs.pop("resolution"), fit_kwargs.pop("seed")

    units = plan_units(sources, 10_000)
    decode = DecodeConfig(resolution=resolution)
    images = []
    for unit in units:
        for _, dec in decode_records(read_unit(unit), decode, 2):
            if dec is not None:
                images.append(dec.image)
            if len(images) >= max_images:
                break
        if len(images) >= max_images:
            break
    if not images:
        raise UsageError("no decodable images in " + " ".join(sources))
    tok = fit_kmeans_vq(images, resolution=resolution, seed=seed,
                        provenance={"images": len(images), "sources": list(sources)}, **fit_kwargs)
    tok.save(out)
    return tok
