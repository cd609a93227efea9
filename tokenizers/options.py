"""Tokenizer options arrive as CLI strings (`--tokenizer-opt KEY=VALUE`) or as
Python values; these parse both, with one error style for every tokenizer."""

from __future__ import annotations

from typing import Any

from tokshard.errors import TokenizerError


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise TokenizerError(f"option {name}={value!r} is not a boolean (true/false)")


def as_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool):
        raise TokenizerError(f"option {name}={value!r} is not an integer")
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise TokenizerError(f"option {name}={value!r} is not an integer") from None
    if out < minimum:
        raise TokenizerError(f"option {name}={value!r} must be >= {minimum}")
    return out
