"""Codecs by name: the one table that shard writers, readers and the manifest's
codec description go through.

A codec module registers its classes with `@register_codec`; this package's
`__init__` imports the built-in modules, so importing anything from
`tokshard.pipeline.format.codecs` sees all of them. Adding a codec is one new
module plus its line there.
"""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar

from tokshard.errors import CodecError
from tokshard.pipeline.format.codecs.base import TokenCodec, _bytes_view

CODECS: dict[str, type[TokenCodec]] = {}

C = TypeVar("C", bound=type[TokenCodec])


def register_codec(cls: C) -> C:
    """Class decorator: make `cls` available under its `name` (names are unique)."""
    previous = CODECS.get(cls.name)
    if previous is not None and previous is not cls:
        raise ValueError(f"codec name {cls.name!r} is already taken by {previous.__qualname__}")
    CODECS[cls.name] = cls
    return cls


def get_codec(name: str, vocab_size: int, **params: Any) -> TokenCodec:
    try:
        cls = CODECS[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}") from None
    return cls(vocab_size, **params)


def codec_from_description(desc: dict, vocab_size: int, state: bytes | None) -> TokenCodec:
    """Rebuild the codec that `describe()` described, verifying its state."""
    if not isinstance(desc, dict):
        raise CodecError(f"codec description must be a dict, got {type(desc).__name__}")
    name, version = desc.get("name"), desc.get("version")
    params = desc.get("params", {})
    if not isinstance(name, str) or name not in CODECS:
        raise CodecError(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}")
    cls = CODECS[name]
    if isinstance(version, bool) or not isinstance(version, int):
        raise CodecError(f"codec {name!r}: version must be an int, got {version!r}")
    if version > cls.version:
        raise CodecError(f"codec {name!r} version {version} is newer than supported "
                         f"(this tokshard reads version {cls.version}); upgrade tokshard")
    if version != cls.version:
        raise CodecError(f"codec {name!r} version {version} is not readable "
                         f"(this tokshard reads version {cls.version})")
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise CodecError(f"codec {name!r}: params must be a dict with string keys, got {params!r}")
    codec = cls(vocab_size, **params)
    want = desc.get("state_sha256")
    if want is not None and not isinstance(want, str):
        raise CodecError(f"codec {name!r}: state_sha256 must be a hex string, got {want!r}")
    if want is None:
        if state is not None:
            raise CodecError(f"codec {name!r}: a state was given but the description records none")
        if cls.needs_fit:
            raise CodecError(f"codec {name!r} needs a trained state; the description has none")
        return codec
    if state is None:
        raise CodecError(f"codec {name!r}: state missing (description expects sha256 {want})")
    got = hashlib.sha256(_bytes_view(state)).hexdigest()
    if got != want:
        raise CodecError(f"codec {name!r}: state sha256 {got} does not match "
                         f"the description's {want}")
    codec.load_state(state)
    return codec
