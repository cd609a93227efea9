"""tokshard: image and video corpora to storage-efficient token datasets."""

__version__ = "0.1.0"


def open(url, **options):  # noqa: A001 - tokshard.open(URL), like gzip.open
    """Open a converted token dataset (local path or any fsspec URL, e.g. s3://).

    Returns a `tokshard.pipeline.dataset.TokenDataset`; see its `loader()`.
    """
    from tokshard.pipeline.stream.dataset import open_dataset
    return open_dataset(url, **options)
