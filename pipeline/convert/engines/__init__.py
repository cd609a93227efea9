"""Engines: where the convert stages run. Both implement `base.Engine` and are
chosen by name here; the local engine is the reference the others must match
byte for byte.

- `local`: every stage in this process (the embedded default);
- `ray`: decode tasks, tokenizer actors and commit tasks on a Ray cluster.

Add one by writing a module with an `Engine` subclass and its line in `ENGINES`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from tokshard.errors import UsageError

if TYPE_CHECKING:  # the engines import the stages (numpy, Arrow, torch): only when one is chosen
    from tokshard.pipeline.convert.engines.base import Engine

# name -> "module:class", imported only when chosen (Ray is an optional dependency).
ENGINES: dict[str, str] = {
    "local": "tokshard.pipeline.convert.engines.local:LocalEngine",
    "ray": "tokshard.pipeline.convert.engines.ray:RayEngine",
}


def engine_class(name: str) -> type[Engine]:
    """The engine class registered as `name`."""
    target = ENGINES.get(name)
    if target is None:
        raise UsageError(f"unknown engine {name!r} (one of {', '.join(ENGINES)})")
    module, _, cls = target.partition(":")
    engine: type[Engine] = getattr(import_module(module), cls)
    return engine


def get_engine(name: str, **settings: Any) -> Engine:
    """The engine `name`, built with its own settings (e.g. Ray's `address`)."""
    return engine_class(name)(**settings)


__all__ = ["ENGINES", "engine_class", "get_engine"]
