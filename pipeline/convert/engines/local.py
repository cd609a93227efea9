"""The embedded engine: every stage of every unit in this process, one unit at a time.

Decode threads (`--decode-workers`) overlap with encoding inside a unit;
nothing else runs in parallel, which keeps it simple, debuggable and the
reference the Ray engine must match byte for byte.
"""

from __future__ import annotations

from tokshard.pipeline.convert.engines.base import Engine, EngineJob, OnFailure, OnReceipt
from tokshard.pipeline.convert.sources import WorkUnit
from tokshard.pipeline.convert.stages import process_unit


class LocalEngine(Engine):
    name = "local"

    def run(self, units: list[WorkUnit], job: EngineJob, on_receipt: OnReceipt, on_failure: OnFailure) -> None:
        for unit in units:
            attempt = 0
            while True:
                try:
                    receipt = process_unit(unit, job.ctx, job.tokenizer)
                except Exception as e:  # one unit's failure must not end the others
                    if job.retry.again(e, attempt):
                        attempt += 1
                        continue
                    on_failure(unit, job.retry.failure(e, attempt))
                    break
                on_receipt(receipt)
                break
