"""Shared fixtures: a small fitted tokenizer and the bundled photos laid out as
every supported source kind."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokshard.pipeline.convert.decode import DecodeConfig, resize_array
from tokshard.pipeline.sample_data import jpeg_bytes, sample_images, write_img2dataset_shards
from tokshard.schemas.v1 import METADATA_KEY
from tokshard.tokenizers.kmeans_fit import fit_kmeans_vq

RES = 64


@pytest.fixture(scope="session")
def photos():
    """(key, RGB array, label) of the bundled photos at a size that keeps tests fast."""
    out = []
    for key, img, label in sample_images(0):
        h, w = img.shape[:2]
        s = 160 / min(h, w)
        small = resize_array(img, DecodeConfig(resolution=max(1, int(min(h, w) * s)), resize_mode="stretch"))
        out.append((key, small, label))
    return out


def fit_test_tokenizer(photos, path: Path, **fit) -> Path:
    """A k-means VQ fitted on the photos at RES pixels (`fit`: fit_kmeans_vq's settings), saved at `path`."""
    images = [resize_array(img, DecodeConfig(resolution=RES)) for _, img, _ in photos]
    fit_kmeans_vq(images, resolution=RES, **fit).save(path)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, photos):
    """A small k-means VQ (64 codes, 8x8 patches, 64 px -> 8x8 grid) fitted on the photos."""
    return fit_test_tokenizer(photos, tmp_path_factory.mktemp("tok"), codebook_size=64, patch_size=8, pca_dim=16,
                              max_patches=20_000, iters=5, seed=0)


@pytest.fixture(scope="session")
def photo_jpegs(photos):
    return [(key, jpeg_bytes(img, 90), label) for key, img, label in photos]


@pytest.fixture()
def photo_folder(tmp_path, photo_jpegs):
    root = tmp_path / "folder"
    for key, data, label in photo_jpegs:
        sub = root / ("a" if label % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{key}.jpg").write_bytes(data)
        (sub / f"{key}.txt").write_text(f"caption {key}")
        (sub / f"{key}.cls").write_text(str(label))
    return root


@pytest.fixture()
def photo_parquet(tmp_path, photo_jpegs):
    path = tmp_path / "pq" / "images.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({
        "key": [k for k, _, _ in photo_jpegs],
        "jpg": [d for _, d, _ in photo_jpegs],
        "caption": [f"caption {k}" for k, _, _ in photo_jpegs],
        "label": [lab for _, _, lab in photo_jpegs],
    }), path)
    return path.parent


@pytest.fixture()
def photo_tars(tmp_path):
    return write_img2dataset_shards(tmp_path / "wds", crops_per_photo=0, shard_size=8)[0].parent


def convert_config(sources, out, tokenizer_dir, **kw):
    from tokshard.pipeline.convert.config import ConvertConfig
    return ConvertConfig(sources=[str(s) for s in sources], out=str(out),
                         tokenizer_options={"path": str(tokenizer_dir)}, decode_workers=2, **kw)


# Uneven source files so the shards come out uneven (30-row units cut per file).
LOADER_SOURCE_SIZES = (50, 23, 71, 9, 60)
LOADER_VARIANTS = (("parquet", "zstd"), ("wds", "raw"), ("parquet", "raw"), ("wds", "bitpack"),
                   ("parquet", "zstd-dict"), ("parquet", "rans-ctx"))


@pytest.fixture(scope="session")
def loader_datasets(tmp_path_factory, tokenizer_dir):
    """{(format, codec): dataset dir} of 213 real photo crops in 9 uneven shards."""
    from tokshard.pipeline.convert.job import convert
    root = tmp_path_factory.mktemp("loader")
    images = [(k, resize_array(img, DecodeConfig(resolution=RES)), lab)
              for k, img, lab in sample_images(crops_per_photo=12, seed=0)]
    src, i = root / "src", 0
    src.mkdir()
    for f, n in enumerate(LOADER_SOURCE_SIZES):
        part, i = images[i:i + n], i + n
        pq.write_table(pa.table({"key": [k for k, _, _ in part],
                                 "jpg": [jpeg_bytes(im, 90) for _, im, _ in part],
                                 "label": [lab for _, _, lab in part]}), src / f"{f}.parquet")
    out = {}
    for fmt, codec in LOADER_VARIANTS:
        dest = root / f"{fmt}-{codec}"
        convert(convert_config([src], dest, tokenizer_dir, format=fmt, codec=codec, shard_size=30), quiet=True)
        out[(fmt, codec)] = dest
    return out


@pytest.fixture()
def dataset_copy(tmp_path, loader_datasets):
    """make(variant=(format, codec)): a private copy of one of the loader datasets, to tamper with."""
    import shutil

    def make(variant=("parquet", "zstd")):
        dest = tmp_path / "-".join(variant)
        shutil.copytree(loader_datasets[variant], dest)
        return dest
    return make


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1.

    Yields the storage_options that point s3fs at it."""
    import os
    import socket

    from moto.server import ThreadedMotoServer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh bucket: (s3fs filesystem, bucket name, storage_options)."""
    import re
    import uuid

    import s3fs
    fs = s3fs.S3FileSystem(**s3_server, skip_instance_cache=True)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    fs.mkdir(name)
    return fs, name, s3_server


def rewrite_manifest(ds: Path, rows=None, record=None) -> None:
    """Tamper with a dataset's manifest: `rows(list of shard-row dicts)` and `record(dict)`
    edit them in place before it is written back."""
    table = pq.read_table(ds / "manifest.parquet")
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    pylist = table.to_pylist()
    if rows:
        rows(pylist)
    if record:
        record(meta)
    out = pa.Table.from_pylist(pylist, schema=table.schema.with_metadata({METADATA_KEY: json.dumps(meta).encode()}))
    pq.write_table(out, ds / "manifest.parquet")


def break_one_payload(shard: Path, row: int) -> int:
    """Cut two bytes off the coded payload of `row` in a Parquet shard: the file still parses
    (its checksum is then the tamperer's business), the codec catches the payload. Returns the
    file's new size."""
    table = pq.read_table(shard)
    tokens = table.column("tokens").to_pylist()
    tokens[row] = tokens[row][:-2]
    table = table.set_column(1, table.schema.field("tokens"), pa.array(tokens, pa.binary()))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    shard.write_bytes(buf.getvalue())
    return len(buf.getvalue())
