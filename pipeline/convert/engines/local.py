"""The embedded engine: every stage of every unit in this process, one unit at a time.

Decode threads (`--decode-workers`) overlap with encoding inside a unit;
nothing else runs in parallel, which keeps it simple, debuggable and the
reference the Ray engine must match byte for byte.
"""

from __future__ import annotations

from tokshard.pipeline.convert.stages import process_unit


def run(units, ctx, tok, *, retries: int, on_receipt, on_failure) -> None:
    for unit in units:
        error = None
        for _ in range(retries + 1):
            try:
                receipt = process_unit(unit, ctx, tok)
            except Exception as e:  # one unit's failure must not end the others
                error = e
                continue
            on_receipt(receipt)
            break
        else:
            on_failure(unit, f"{type(error).__name__}: {error}")
