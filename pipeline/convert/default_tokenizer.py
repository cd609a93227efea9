"""The default tokenizer and `tokshard fit-tokenizer`: patch k-means VQ fitted
on the bundled photos (once, then cached) or on the user's own sources.

The fit itself is the tokenizer's (`tokenizers/kmeans_fit.py`); the images it
is fitted on are decoded and resized here, exactly as the convert job decodes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tokshard.errors import UsageError
from tokshard.pipeline.convert.config import FIT_MAX_IMAGES
from tokshard.pipeline.convert.decode import DecodeConfig, resize_array
from tokshard.pipeline.convert.sources import plan_units, read_unit
from tokshard.pipeline.convert.stages import decode_records
from tokshard.pipeline.sample_data import sample_images
from tokshard.pipeline.storage import redact_url
from tokshard.tokenizers.base import canonical_json, sha256_hex
from tokshard.tokenizers.kmeans_fit import DEFAULT_FIT, fit_kmeans_vq
from tokshard.tokenizers.kmeans_vq import KMeansVQ


def cache_dir() -> Path:
    root = os.environ.get("TOKSHARD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tokshard")
    return Path(root)


def default_artifact() -> Path:
    """The default tokenizer: fitted once on the bundled photos, then cached."""
    key = sha256_hex(canonical_json({"fit": DEFAULT_FIT, "data": "bundled-photos/2"}))[:16]
    path = cache_dir() / "tokenizers" / f"kmeans-vq-default-{key}"
    if (path / "config.json").exists():
        return path
    fit = dict(DEFAULT_FIT)
    cfg = DecodeConfig(resolution=fit["resolution"])
    images = [resize_array(img, cfg) for _, img, _ in sample_images(crops_per_photo=24, seed=fit["seed"])]
    tok = fit_kmeans_vq(images, **fit, provenance={"data": "bundled-photos/2", "images": len(images)})
    path.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent first uses (workers, tests) each fit; the first rename wins.
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    try:
        tok.save(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def fit_tokenizer_from_sources(sources: list[str], out: str, *, max_images: int = FIT_MAX_IMAGES,
                               **fit_kwargs: Any) -> KMeansVQ:
    """`tokshard fit-tokenizer`: decode up to `max_images` source images and fit k-means VQ
    (settings not given: those of the default tokenizer)."""
    fit_kwargs = {**DEFAULT_FIT, **fit_kwargs}
    resolution, seed = fit_kwargs.pop("resolution"), fit_kwargs.pop("seed")

    units = plan_units(sources, 10_000)
    decode = DecodeConfig(resolution=resolution)
    images = []
    for unit in units:
        for _, dec in decode_records(read_unit(unit), decode, 2):
            if dec is not None:
                images.append(dec.image)
            if len(images) >= max_images:
                break
        if len(images) >= max_images:
            break
    if not images:
        raise UsageError("no decodable images in " + " ".join(redact_url(s) for s in sources))
    tok = fit_kmeans_vq(images, resolution=resolution, seed=seed,
                        provenance={"images": len(images), "sources": [redact_url(s) for s in sources]},
                        **fit_kwargs)
    tok.save(out)
    return tok
