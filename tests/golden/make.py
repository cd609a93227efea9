"""Write the golden datasets: tiny inputs converted by a fixed tokshard, kept as bytes.

`tests/test_golden.py` converts the same inputs with today's code and compares
every file byte for byte, so a refactor that changes what is written (a column,
a key order, a path, a hash input) fails loudly. The inputs and the tokenizer
are committed too (a few KB): nothing here depends on a JPEG encoder's version.

Regenerate only on purpose (a format change that bumps the schema), from the
repository root:

    python tests/golden/make.py

Sources are read from SOURCE_ROOT, a fixed absolute path, because source URLs
are part of a dataset (the `source` column, the job hash): the test copies the
sources there before converting.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HERE = Path(__file__).resolve().parent
SOURCE_ROOT = Path("/tmp/tokshard-golden-v1/source")

# name -> ConvertConfig fields besides sources/out (the tokenizer path is added).
CONFIGS = {
    "parquet-rans": {"format": "parquet", "codec": "rans-ctx", "shard_size": 4,
                     "where": "label IS NULL OR label < 5", "sources": ["000000.tar", "part.parquet"]},
    "wds-hflip": {"format": "wds", "codec": "zstd-dict", "views": "hflip", "sources": ["000000.tar"]},
}


def _images() -> list[tuple[str, np.ndarray, int]]:
    from tokshard.pipeline.sample_data import sample_images
    out = []
    for key, img, label in sample_images(0)[:8]:
        im = Image.fromarray(img)
        im.thumbnail((72, 56))
        out.append((key, np.asarray(im.convert("RGB")), label))
    return out


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_sources(dest: Path) -> None:
    """One img2dataset-style tar (JPEG and PNG samples with sidecars, one corrupt sample)
    and one Hugging Face-style Parquet file (Image() struct column)."""
    dest.mkdir(parents=True, exist_ok=True)
    images = _images()
    with tarfile.open(dest / "000000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
        for i, (name, img, label) in enumerate(images[:6]):
            key = f"0000{i:04d}"
            add(f"{key}.{'png' if i % 3 == 2 else 'jpg'}", _encode(img, "PNG" if i % 3 == 2 else "JPEG"))
            add(f"{key}.txt", f"a photo: {name}".encode())
            add(f"{key}.json", json.dumps({"key": key, "similarity": 0.25 + i / 20, "url": f"x://{name}"}).encode())
            add(f"{key}.cls", str(label).encode())
        add("00000006.jpg", b"\xff\xd8 not really a jpeg")
    rows = [{"image": {"bytes": _encode(img, "JPEG"), "path": f"{name}.jpg"}, "label": label,
             "text": f"hf {name}"} for name, img, label in images[2:8]]
    pq.write_table(pa.Table.from_pylist(rows), dest / "part.parquet")


def write_tokenizer(dest: Path) -> None:
    from tokshard.pipeline.convert.decode import DecodeConfig, resize_array
    from tokshard.tokenizers.kmeans_fit import fit_kmeans_vq
    images = [resize_array(img, DecodeConfig(resolution=32)) for _, img, _ in _images()]
    tok = fit_kmeans_vq(images, codebook_size=32, patch_size=8, resolution=32, pca_dim=8,
                        max_patches=5_000, iters=5, seed=0, provenance={"data": "golden"})
    tok.save(dest)


def convert_golden(name: str, out: Path, tokenizer: Path, quiet: bool = True) -> dict:
    from tokshard.pipeline.convert.job import ConvertConfig, convert
    cfg = dict(CONFIGS[name])
    sources = [str(SOURCE_ROOT / s) for s in cfg.pop("sources")]
    return convert(ConvertConfig(sources=sources, out=str(out), tokenizer="kmeans-vq",
                                 tokenizer_options={"path": str(tokenizer)}, **cfg), quiet=quiet)


def main() -> None:
    if not (HERE / "source").exists():
        write_sources(HERE / "source")
    if not (HERE / "tokenizer").exists():
        write_tokenizer(HERE / "tokenizer")
    if SOURCE_ROOT.exists():
        shutil.rmtree(SOURCE_ROOT)
    shutil.copytree(HERE / "source", SOURCE_ROOT)
    for name in CONFIGS:
        out = HERE / "datasets" / name
        if out.exists():
            shutil.rmtree(out)
        convert_golden(name, out, HERE / "tokenizer")
        # Run statistics are not part of what a dataset says (wall times differ run to run).
        (out / "timings.parquet").unlink()
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
