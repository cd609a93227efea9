"""The embedded engine: every stage of every unit in this process, units in order.

Where the tokenizer runs on a GPU, decoding runs ahead of encoding, across units: a
reader thread decodes the units in order (its `--decode-workers` threads overlap inside
a unit) into a queue of two batches, while this thread encodes each batch and commits
each unit when its tail arrives, so the GPU is not left waiting while a unit's first
batch is decoded or while the previous unit is coded and written. On a CPU the cores are
the tokenizer's too and running ahead only adds contention (measured: 25% slower on 2
cores), so units go one at a time, decode threads overlapping encoding inside a unit.
Either way what a unit writes depends on the unit alone: the output is byte-identical,
and this engine is the reference the Ray engine must match. (On an H200, taming's VQGAN
in bf16: 368 images/s decoding ahead against 344 one unit at a time, bench/gpu.py.)

A unit that fails while read ahead is retried by itself, synchronously (`process_unit`),
under the job's retry policy; the reader goes on with the next units meanwhile.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

from tokshard.pipeline.convert.engines.base import Engine, EngineJob, OnFailure, OnReceipt
from tokshard.pipeline.convert.sources import WorkUnit
from tokshard.pipeline.convert.stages import (
    DecodedBatch,
    EncodedBatch,
    UnitTail,
    commit_unit,
    decode_unit,
    encode_batch,
    process_unit,
)

_AHEAD = 2          # decoded batches waiting for the tokenizer, at most
_DONE = object()


class _Failed:
    """A unit whose decoding raised: the rest of it is not read."""

    def __init__(self, error: BaseException):
        self.error = error


class _Reader:
    """Decode items of every unit, in order, from a background thread."""

    def __init__(self, units: list[WorkUnit], job: EngineJob):
        self.units, self.ctx = units, job.ctx
        self.items: queue.Queue[Any] = queue.Queue(_AHEAD)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tokshard-decode", daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        for i, unit in enumerate(self.units):
            try:
                for item in decode_unit(unit, self.ctx):
                    if not self._put((i, item)):
                        return
            except BaseException as e:   # the unit's; the consumer decides what it means
                if not self._put((i, _Failed(e))):
                    return
        self._put((len(self.units), _DONE))

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        while True:
            i, item = self.items.get()
            if item is _DONE:
                return
            yield i, item

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class LocalEngine(Engine):
    name = "local"
    # Decode ahead of the tokenizer across units: None = where the tokenizer is on a GPU.
    ahead: ClassVar[bool | None] = None

    def run(self, units: list[WorkUnit], job: EngineJob, on_receipt: OnReceipt, on_failure: OnFailure) -> None:
        device = getattr(job.tokenizer, "device", None)
        ahead = self.ahead if self.ahead is not None else getattr(device, "type", None) == "cuda"
        if ahead:
            self._run_ahead(units, job, on_receipt, on_failure)
            return
        for unit in units:
            try:
                receipt = process_unit(unit, job.ctx, job.tokenizer)
            except Exception as e:  # one unit's failure must not end the others
                self._retry(unit, job, e, on_receipt, on_failure)
                continue
            on_receipt(receipt)

    def _run_ahead(self, units: list[WorkUnit], job: EngineJob, on_receipt: OnReceipt,
                   on_failure: OnFailure) -> None:
        if not units:
            return
        ctx, tok = job.ctx, job.tokenizer
        clip_frames = ctx.clip.frames if ctx.clip is not None else None
        reader = _Reader(units, job)
        batches: list[EncodedBatch] = []
        failed: BaseException | None = None     # of the unit being read
        try:
            for i, item in reader:
                if failed is None and not isinstance(item, _Failed):
                    try:
                        out = encode_batch(tok, item, ctx.sample_shape, clip_frames)
                        if isinstance(out, EncodedBatch):
                            batches.append(out)
                            continue
                        receipt = commit_unit(units[i], ctx, batches, out)
                    except Exception as e:     # this unit's failure must not end the others
                        failed = e
                    else:
                        on_receipt(receipt)
                        batches = []
                        continue
                if isinstance(item, _Failed):
                    failed = failed or item.error
                elif not isinstance(item, UnitTail):
                    assert isinstance(item, DecodedBatch)
                    continue                  # the failed unit's remaining batches
                assert failed is not None
                self._retry(units[i], job, failed, on_receipt, on_failure)
                batches, failed = [], None
        finally:
            reader.close()

    @staticmethod
    def _retry(unit: WorkUnit, job: EngineJob, error: BaseException, on_receipt: OnReceipt,
               on_failure: OnFailure) -> None:
        """After a unit's first attempt failed with `error`: the unit again, by itself, while
        the policy calls the last error transient; then its failure, counted."""
        if not isinstance(error, Exception):
            raise error                      # KeyboardInterrupt, SystemExit: not the unit's
        attempt = 0
        while job.retry.again(error, attempt):
            attempt += 1
            try:
                receipt = process_unit(unit, job.ctx, job.tokenizer)
            except Exception as e:
                error = e
                continue
            on_receipt(receipt)
            return
        on_failure(unit, job.retry.failure(error, attempt))
