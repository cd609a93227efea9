"""The Ray engine: decode tasks on CPUs, a pool of tokenizer actors (one GPU
each where there are GPUs), commit tasks for coding and writing.

Per unit: a streaming decode task yields image batches; the driver hands
each to a tokenizer actor; a commit task receives the encoded batches and
writes the shard and, last, its receipt. The driver only moves references
and bounds what is in flight (units being decoded, batches waiting for a
tokenizer), which is the backpressure that lets decode and encode overlap
without filling the object store. Ray schedules, restarts dead actors and
re-runs lost tasks; a unit whose tasks fail is retried as a whole, and one
that still fails is reported and left out of the manifest.

A cluster without GPUs gets no actors unless asked (`encoders`): there the
tokenizer is CPU work like decoding, and shipping every decoded pixel to
another process on the same node only adds copies and an actor start-up
(a new process importing torch) to the job. Each unit runs whole in one
task instead (the local engine's `process_unit`), the tokenizer loaded once
per worker process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, cast

from tokshard.errors import TokenizerError, UsageError
from tokshard.pipeline.convert.engines.base import Engine, EngineJob, OnFailure, OnReceipt
from tokshard.pipeline.convert.engines.retry import RetryPolicy
from tokshard.pipeline.convert.sources import WorkUnit
from tokshard.pipeline.convert.stages import (
    DecodedBatch,
    EncodedBatch,
    UnitContext,
    UnitTail,
    commit_unit,
    decode_unit,
    encode_batch,
    process_unit,
)
from tokshard.tokenizers.base import Tokenizer, TokenizerIdentity, artifact_files

if TYPE_CHECKING:  # Ray is an optional dependency: imported only when this engine runs
    from ray import ObjectRef, ObjectRefGenerator

    from tokshard.pipeline.convert.config import ConvertConfig
    from tokshard.schemas.records import Receipt

ENCODER_CPUS = 0.5     # fractional: actors holding every CPU would starve the decode tasks
COMMIT_CPUS = 0.5
BATCHES_PER_ENCODER = 3
# While the tokenizer actors start (a new process importing torch and loading
# weights: ~1-2 s, a fifth of a 5k-image job on 2 cores) the decode tasks need
# not wait: up to this many decoded batches per actor may queue for them.
WARMUP_BATCHES_PER_ENCODER = 16


def init_ray(address: str | None) -> ModuleType:
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'tokshard[ray]'") from None
    if not ray.is_initialized():
        if not address:
            # A local cluster: bind loopback only, no auth token needed.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address=address or None, include_dashboard=False,
                 logging_level="WARNING",  # type: ignore[arg-type]  # Ray takes a level name too
                 log_to_driver=False, configure_logging=True)
    return ray


def _decode_task(unit: WorkUnit, ctx: UnitContext) -> Iterator[DecodedBatch | UnitTail]:
    yield from decode_unit(unit, ctx)


def _commit_task(unit: WorkUnit, ctx: UnitContext, *items: EncodedBatch | UnitTail) -> Receipt:
    *batches, tail = items
    if not isinstance(tail, UnitTail):
        raise RuntimeError(f"unit {unit.index}: decode ended without its tail")
    # Every item before the tail is an encoded batch: decode yields one tail, last.
    return commit_unit(unit, ctx, cast("list[EncodedBatch]", list(batches)), tail)


# Per worker process: the tokenizer of the current job, by the ref of its spec.
_LOADED: dict[tuple[str], Tokenizer] = {}


def _load_tokenizer(name: str, options: dict, files: dict[str, bytes], identity: TokenizerIdentity,
                    threads: int) -> Tokenizer:
    """The job's tokenizer, rebuilt from the artifact files the driver shipped.

    The files are written to a temporary folder that is removed once `load`
    returns (a worker would otherwise leave a copy per job: hundreds of MB for a
    VQGAN). Tokenizers read their artifact in `load` (docs/tokenizers.md); files
    they keep open or memory-mapped stay readable after the unlink."""
    import torch

    from tokshard.tokenizers.registry import tokenizer_class
    # Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors; on CPU-only nodes
    # the tokenizer is the heavy stage and may use more cores than it reserves.
    torch.set_num_threads(threads)
    directory = tempfile.mkdtemp(prefix="tokshard-tok-")
    try:
        for rel, data in files.items():
            path = Path(directory, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        tok = tokenizer_class(name).from_options(path=directory, **options)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if tok.identity() != identity:
        raise TokenizerError(f"tokenizer on {os.uname().nodename} has identity {tok.identity()}, "
                             f"the job expects {identity}")
    return tok


class _Encoder:
    """A tokenizer, loaded once per actor from the artifact the driver shipped."""

    def __init__(self, name: str, options: dict, files: list[ObjectRef], identity: TokenizerIdentity,
                 shape: tuple[int, ...], clip_frames: int | None, threads: int):
        import ray
        # files is [ref]: the artifact is fetched here, not passed by value, so a
        # restarted actor re-reads it from the object store (the driver holds the ref).
        self.tok = _load_tokenizer(name, options, ray.get(files[0]), identity, threads)
        self.shape, self.clip_frames = shape, clip_frames

    def encode(self, item: DecodedBatch | UnitTail) -> EncodedBatch | UnitTail:
        return encode_batch(self.tok, item, self.shape, self.clip_frames)

    def ready(self) -> bool:
        return True


def _unit_task(unit: WorkUnit, ctx: UnitContext, spec: list[ObjectRef]) -> Receipt:
    """A whole unit in this worker (clusters without GPUs). `spec` is [ref] to
    (name, options, files, identity): fetched only by a process that has not
    loaded this tokenizer yet."""
    import ray
    key = (spec[0].hex(),)
    tok = _LOADED.get(key)
    if tok is None:
        name, options, files, identity = ray.get(spec[0])
        _LOADED.clear()         # a long-lived worker keeps only the current job's tokenizer
        tok = _LOADED[key] = _load_tokenizer(name, options, files, identity, threads=1)
    return process_unit(unit, ctx, tok)


class _UnitRun:
    def __init__(self, unit: WorkUnit, attempt: int):
        self.unit, self.attempt = unit, attempt
        self.gen: ObjectRefGenerator | None = None
        self.encoded: list[ObjectRef] = []
        self.commit: ObjectRef | None = None


class RayEngine(Engine):
    """`address`: the cluster (None: $RAY_ADDRESS, else a local one on loopback);
    `encoders`: tokenizer actors (0: one per GPU, none without GPUs);
    `gpus_per_encoder`: None: 1 where the cluster has GPUs, else 0."""

    name = "ray"

    def __init__(self, address: str | None = None, encoders: int = 0, gpus_per_encoder: float | None = None):
        self.address, self.encoders, self.gpus_per_encoder = address, encoders, gpus_per_encoder

    @classmethod
    def from_config(cls, cfg: ConvertConfig) -> RayEngine:
        return cls(address=cfg.address, encoders=cfg.encoders, gpus_per_encoder=cfg.gpus_per_encoder)

    def run(self, units: list[WorkUnit], job: EngineJob, on_receipt: OnReceipt, on_failure: OnFailure) -> None:
        if units:
            _run(units, job, on_receipt, on_failure, self.address, self.encoders, self.gpus_per_encoder)


def _run(units: list[WorkUnit], job: EngineJob, on_receipt: OnReceipt, on_failure: OnFailure,
         address: str | None, encoders: int, gpus_per_encoder: float | None) -> None:
    ray = init_ray(address)
    from ray.exceptions import RayError

    ctx, tok, retry = job.ctx, job.tokenizer, job.retry
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    options = {k: v for k, v in job.tokenizer_options.items() if k != "path"}
    if encoders <= 0 and not gpus and not gpus_per_encoder:
        spec = ray.put((job.tokenizer_name, options, artifact_files(tok), tok.identity()))
        _run_whole_units(ray, units, ray.put(ctx), spec, int(resources.get("CPU", 1)),
                         retry=retry, on_receipt=on_receipt, on_failure=on_failure)
        return
    if gpus_per_encoder is None:
        gpus_per_encoder = 1 if gpus else 0
    if encoders <= 0:
        encoders = max(1, int(gpus // gpus_per_encoder)) if gpus_per_encoder else 1
    encoder_cls = ray.remote(_Encoder).options(num_cpus=ENCODER_CPUS, num_gpus=gpus_per_encoder,
                                               max_restarts=3, max_task_retries=3)
    threads = 1 if gpus_per_encoder else max(1, int(resources.get("CPU", 1) // (encoders + 1)))
    clip_frames = ctx.clip.frames if ctx.clip is not None else None
    files = ray.put(artifact_files(tok))
    pool = [encoder_cls.remote(job.tokenizer_name, options, [files], tok.identity(), ctx.sample_shape,
                               clip_frames, threads) for _ in range(encoders)]
    decode = ray.remote(_decode_task).options(num_cpus=1, max_retries=0,
                                              _generator_backpressure_num_objects=2)
    commit = ray.remote(_commit_task).options(num_cpus=COMMIT_CPUS, max_retries=0)
    ctx_ref = ray.put(ctx)
    decode_slots = max(1, int(resources.get("CPU", 1) - encoders * ENCODER_CPUS - COMMIT_CPUS))
    max_active = decode_slots + 2
    max_encoding = BATCHES_PER_ENCODER * encoders
    warming = [actor.ready.remote() for actor in pool]

    pending = deque((u, 0) for u in units)
    active: dict[int, _UnitRun] = {}
    owner: dict[int, _UnitRun] = {}
    encoding: list = []
    turn = 0

    def start(unit: WorkUnit, attempt: int) -> None:
        r = _UnitRun(unit, attempt)
        r.gen = decode.remote(unit, ctx_ref)
        active[unit.index] = r
        owner[id(r.gen)] = r

    def finish(r: _UnitRun, error: BaseException | None) -> None:
        del active[r.unit.index]
        if error is None:
            return
        if retry.again(error, r.attempt):
            pending.appendleft((r.unit, r.attempt + 1))
        else:
            on_failure(r.unit, retry.failure(error, r.attempt))

    while pending or active:
        while pending and len(active) < max_active:
            start(*pending.popleft())
        if encoding:
            _, encoding = ray.wait(encoding, num_returns=len(encoding), timeout=0, fetch_local=False)
        if warming:
            _, warming = ray.wait(warming, num_returns=len(warming), timeout=0, fetch_local=False)
        saturated = len(encoding) >= (WARMUP_BATCHES_PER_ENCODER * encoders if warming else max_encoding)
        waitables = [r.commit for r in active.values() if r.commit is not None]
        if saturated:
            waitables += encoding
        else:
            waitables += [r.gen for r in active.values() if r.gen is not None]
        if not waitables:
            continue
        ready, _ = ray.wait(waitables, num_returns=1, timeout=1.0, fetch_local=False)
        for w in ready:
            r = owner.pop(id(w), None)
            if r is None:
                continue            # an encode finished: capacity is back
            if w is r.commit:
                try:
                    receipt = ray.get(w)
                except RayError as e:
                    finish(r, e)
                    continue
                on_receipt(receipt)
                finish(r, None)
                continue
            gen = r.gen
            assert gen is not None  # w is not the commit, so it is this unit's live decode generator
            try:
                ref = next(gen)
            except StopIteration:
                r.gen = None
                r.commit = commit.remote(r.unit, ctx_ref, *r.encoded)
                owner[id(r.commit)] = r
                continue
            except RayError as e:
                finish(r, e)
                continue
            owner[id(r.gen)] = r
            enc = pool[turn % len(pool)].encode.remote(ref)
            turn += 1
            r.encoded.append(enc)
            encoding.append(enc)
    for actor in pool:
        ray.kill(actor)


def _run_whole_units(ray: ModuleType, units: list[WorkUnit], ctx_ref: ObjectRef, spec: ObjectRef, cpus: int, *,
                     retry: RetryPolicy, on_receipt: OnReceipt, on_failure: OnFailure) -> None:
    from ray.exceptions import RayError
    task = ray.remote(_unit_task).options(num_cpus=1, max_retries=0)
    pending = deque((u, 0) for u in units)
    running: dict = {}
    while pending or running:
        # One queued task beyond the CPUs, so a finishing task is replaced at once.
        while pending and len(running) <= cpus:
            unit, attempt = pending.popleft()
            running[task.remote(unit, ctx_ref, [spec])] = (unit, attempt)
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            unit, attempt = running.pop(ref)
            try:
                receipt = ray.get(ref)
            except RayError as e:
                if retry.again(e, attempt):
                    pending.appendleft((unit, attempt + 1))
                else:
                    on_failure(unit, retry.failure(e, attempt))
                continue
            on_receipt(receipt)
