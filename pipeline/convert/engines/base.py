"""The engine contract: run a job's units, report each one committed or failed.

An engine decides only *where* the stages run (`convert/stages.py`); what a
unit writes is decided by the unit and the job alone, so every engine writes
the same bytes. Both report through the same two callbacks, and retry
through the same `RetryPolicy`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from tokshard.pipeline.convert.engines.retry import RetryPolicy, UnitFailure
from tokshard.pipeline.convert.sources import WorkUnit
from tokshard.pipeline.convert.stages import UnitContext
from tokshard.schemas.records import Receipt
from tokshard.tokenizers.base import Tokenizer

if TYPE_CHECKING:  # config imports the engine registry
    from tokshard.pipeline.convert.config import ConvertConfig

OnReceipt = Callable[[Receipt], None]
OnFailure = Callable[[WorkUnit, UnitFailure], None]


@dataclass
class EngineJob:
    """What every engine gets: the stages' context, the tokenizer the driver loaded, and
    how to rebuild it elsewhere (by name and options, from its artifact files)."""
    ctx: UnitContext
    tokenizer: Tokenizer
    tokenizer_name: str
    tokenizer_options: dict[str, Any] = field(default_factory=dict)   # without `path`
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(2))


class Engine(abc.ABC):
    name: ClassVar[str]

    @classmethod
    def from_config(cls, cfg: ConvertConfig) -> Engine:
        """The engine with the settings `cfg` has for it (none, unless the engine says so)."""
        return cls()

    @abc.abstractmethod
    def run(self, units: list[WorkUnit], job: EngineJob, on_receipt: OnReceipt, on_failure: OnFailure) -> None:
        """Convert `units`; call `on_receipt` for each committed one and `on_failure` for each that
        failed for good. One unit's failure never stops the others."""
