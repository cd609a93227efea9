"""Shared fixtures: a small fitted tokenizer and the bundled photos laid out as
every supported source kind."""

from __future__ import annotations


import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokshard.pipeline.decode import DecodeConfig, resize_array
from tokshard.pipeline.sample_data import jpeg_bytes, sample_images, write_img2dataset_shards
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


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, photos):
    """A small k-means VQ (64 codes, 8x8 patches, 64 px -> 8x8 grid) fitted on the photos."""
    images = [resize_array(img, DecodeConfig(resolution=RES)) for _, img, _ in photos]
    tok = fit_kmeans_vq(images, codebook_size=64, patch_size=8, resolution=RES, pca_dim=16,
                        max_patches=20_000, iters=5, seed=0)
    path = tmp_path_factory.mktemp("tok")
    tok.save(path)
    return path


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
    from tokshard.pipeline.convert import ConvertConfig
    return ConvertConfig(sources=[str(s) for s in sources], out=str(out),
                         tokenizer_options={"path": str(tokenizer_dir)}, decode_workers=2, **kw)
