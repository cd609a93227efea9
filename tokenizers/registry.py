"""Tokenizers by name: the built-ins, those registered in this process with
`register()`, and any that installed packages declare in the
`tokshard.tokenizers` entry-point group (in that order of precedence).

A target is a `Tokenizer` subclass or a "module:attr" string, imported only
when the name is looked up. Register a class under its own `name`: a dataset
records `tok.name` and `TokenDataset.tokenizer()` looks the class up by it.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

from tokshard.errors import TokenizerError, UsageError
from tokshard.tokenizers.base import Tokenizer

GROUP = "tokshard.tokenizers"
BUILTIN = {
    "kmeans-vq": "tokshard.tokenizers.kmeans_vq:KMeansVQ",
    "cosmos-di": "tokshard.tokenizers.cosmos:CosmosImageTokenizer",
    "cosmos-dv": "tokshard.tokenizers.cosmos:CosmosVideoTokenizer",
    "vqgan-taming": "tokshard.tokenizers.vqgan:TamingVQGAN",
    "llamagen-vq16": "tokshard.tokenizers.vqgan:LlamaGenVQ",
    "maskgit-vqgan": "tokshard.tokenizers.maskgit_vqgan:MaskGitVQGAN",
}
_registered: dict[str, str | type] = {}


def register(name: str, target: str | type) -> None:
    """Make `target` available as tokenizer `name` in this process (no entry point needed).

    It wins over an entry point of the same name. Re-registering the identical
    target is a no-op; a different target for a built-in or an already
    registered name is a UsageError.
    """
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"a tokenizer name must be a non-empty string, got {name!r}")
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        if not module or not attr:
            raise UsageError(f"tokenizer target {target!r} is not 'module:attr'")
    elif not (isinstance(target, type) and issubclass(target, Tokenizer)):
        raise UsageError(f"tokenizer target {target!r} is neither a Tokenizer subclass nor 'module:attr'")
    previous = BUILTIN.get(name, _registered.get(name))
    if previous is not None:
        if not _same(previous, target):
            what = "built-in" if name in BUILTIN else "registered"
            raise UsageError(f"tokenizer {name!r} is already {what} as {_spec(previous)}; "
                             f"not replacing it with {_spec(target)}")
        return
    _registered[name] = target


def available() -> dict[str, str]:
    """name -> "module:attr" of every tokenizer that can be looked up."""
    found = {**BUILTIN, **{n: _spec(t) for n, t in _registered.items() if n not in BUILTIN}}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def tokenizer_class(name: str) -> type[Tokenizer]:
    target = BUILTIN.get(name) or _registered.get(name)
    if target is None:
        target = next((ep.value for ep in entry_points(group=GROUP) if ep.name == name), None)
    if target is None:
        raise UsageError(f"unknown tokenizer {name!r} (available: {', '.join(sorted(available()))})")
    return _resolve(target, name)


def load_tokenizer(name: str, options: dict | None = None) -> Tokenizer:
    cls = tokenizer_class(name)
    try:
        return cls.from_options(**(options or {}))
    except TypeError as e:
        raise UsageError(f"bad options for tokenizer {name!r}: {e}") from None
    except TokenizerError as e:
        raise UsageError(str(e)) from None


def _resolve(target: str | type, name: str) -> type[Tokenizer]:
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        try:
            target = getattr(import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"tokenizer {name!r}: cannot import {module}:{attr} ({e})") from None
    if not (isinstance(target, type) and issubclass(target, Tokenizer)):
        raise UsageError(f"tokenizer {name!r}: {target!r} is not a Tokenizer subclass")
    return target


def _same(a: str | type, b: str | type) -> bool:
    if a is b or (isinstance(a, str) and a == b):
        return True
    if isinstance(a, str) == isinstance(b, str):
        return False          # two different classes, or two different strings
    try:
        return _resolve(a, "") is _resolve(b, "")
    except UsageError:
        return False


def _spec(target: str | type) -> str:
    return target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"
