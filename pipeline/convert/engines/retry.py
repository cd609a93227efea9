"""The one retry rule both engines follow: which failures of a unit are worth
another attempt, and how a failure is reported.

A *deterministic* failure (a bad predicate, a config or usage error, a
tokenizer or codec that refuses its input, a bug) gives the same result on
every attempt: it fails once, clearly. A *transient* one (I/O, a network
hiccup, a lost worker or node) may not recur: it is retried up to the job's
`retries`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokshard.errors import JobError, TokshardError
from tokshard.pipeline.storage import redact_text

# Errors of the code or of its input, not of the machine it ran on. OSError (I/O,
# sockets, timeouts) and anything unknown count as transient.
DETERMINISTIC: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, AttributeError, ArithmeticError, AssertionError,
    NotImplementedError, RecursionError, ImportError,
)


def cause_of(error: BaseException) -> BaseException:
    """The exception a task raised, unwrapped from the engine's wrapper (Ray's
    RayTaskError carries it as `cause`)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def is_transient(error: BaseException) -> bool:
    cause = cause_of(error)
    if isinstance(cause, TokshardError):
        return isinstance(cause, JobError)
    if isinstance(cause, OSError):
        return True
    if isinstance(cause, DETERMINISTIC):
        return False
    return True


def describe(error: BaseException) -> str:
    """One line naming the error: its type and the last line of its message, with the
    credentials of any URL in it redacted (an I/O error quotes the source URL)."""
    cause = cause_of(error)
    text = redact_text(f"{type(cause).__name__}: {cause}".strip())
    return text.splitlines()[-1][:500] if text else type(cause).__name__


@dataclass(frozen=True)
class UnitFailure:
    """How a unit finally failed."""
    error: str          # describe() of the last error
    attempts: int
    transient: bool     # False: deterministic, so it was not retried


@dataclass(frozen=True)
class RetryPolicy:
    retries: int        # extra attempts after the first, for transient failures

    def again(self, error: BaseException, attempt: int) -> bool:
        """Whether a unit whose attempt number `attempt` (0-based) raised `error` runs again."""
        return attempt < self.retries and is_transient(error)

    def failure(self, error: BaseException, attempt: int) -> UnitFailure:
        return UnitFailure(describe(error), attempt + 1, is_transient(error))
