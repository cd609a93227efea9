"""Tokenizers by name: the built-ins plus any that installed packages declare
in the `tokshard.tokenizers` entry-point group."""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

from tokshard.pipeline.errors import TokenizerError, UsageError
from tokshard.tokenizers.base import Tokenizer

GROUP = "tokshard.tokenizers"
BUILTIN = {"kmeans-vq": "tokshard.tokenizers.kmeans_vq:KMeansVQ"}


def available() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def tokenizer_class(name: str) -> type[Tokenizer]:
    targets = available()
    if name not in targets:
        raise UsageError(f"unknown tokenizer {name!r} (available: {', '.join(sorted(targets))})")
    module, _, attr = targets[name].partition(":")
    return getattr(import_module(module), attr)


def load_tokenizer(name: str, options: dict | None = None) -> Tokenizer:
    cls = tokenizer_class(name)
    try:
        return cls.from_options(**(options or {}))
    except TypeError as e:
        raise UsageError(f"bad options for tokenizer {name!r}: {e}") from None
    except TokenizerError as e:
        raise UsageError(str(e)) from None
