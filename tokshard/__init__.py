"""tokshard: image and video corpora to storage-efficient token datasets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokshard.pipeline.stream.dataset import TokenDataset

__version__ = "0.1.0"


def open(url: str, **options: Any) -> TokenDataset:  # noqa: A001 - tokshard.open(URL), like gzip.open
    """Open a converted token dataset (local path or any fsspec URL, e.g. s3://).

    Returns a `tokshard.pipeline.dataset.TokenDataset`; see its `loader()`.
    """
    from tokshard.pipeline.stream.dataset import open_dataset
    return open_dataset(url, **options)


def mix(streams: Any, weights: Any = None, **options: Any) -> Any:
    """Several token datasets streamed as one (`tokshard.pipeline.stream.mixture.mix`):
    `tokshard.mix([ds_a, "s3://b/ds", tokshard.Stream(ds_c, choose=10_000)], weights=[...])`,
    with a dataset's `loader(...)`, `state_dict()` and `load_state_dict()`."""
    from tokshard.pipeline.stream.mixture import mix as _mix
    return _mix(streams, weights, **options)


def codec(name: str, vocab_size: int, **params: Any) -> Any:
    """A token codec for code outside tokshard (`tokshard.pipeline.format.codecs.public`):
    `fit(tokens)`, `encode_batch(tokens) -> list[bytes]`, `decode_batch(payloads, shape)`."""
    from tokshard.pipeline.format.codecs.public import codec as _codec
    return _codec(name, vocab_size, **params)


def codec_from(description: dict, vocab_size: int, state: bytes | None = None) -> Any:
    """A `codec` rebuilt from its `describe()` and `state()`."""
    from tokshard.pipeline.format.codecs.public import codec_from as _codec_from
    return _codec_from(description, vocab_size, state)


def __getattr__(name: str) -> Any:
    if name == "Stream":   # (imported on first use: `import tokshard` stays light)
        from tokshard.pipeline.stream.mixture import Stream
        return Stream
    if name == "Vocab":    # the joint vocabulary of packed sequences (loader(..., pack=N))
        from tokshard.pipeline.stream.packing import Vocab
        return Vocab
    raise AttributeError(f"module 'tokshard' has no attribute {name!r}")
