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
