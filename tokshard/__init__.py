"""tokshard: image and video corpora to storage-efficient token datasets."""

__version__ = "0.1.0"
