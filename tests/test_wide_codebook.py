"""A dataset of a codebook wider than 16 bits (issue 17: Open-MAGVIT2 / IBQ use 2^18 codes),
converted and read end to end: stored as uint32 through every codec and both shard formats,
and read back by ds[i], the loader (in process and through workers) and the public codec API
with the codes intact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import convert_config

import tokshard
from tokshard.errors import CodecError
from tokshard.pipeline.convert.job import convert
from tokshard.tokenizers.kmeans_vq import KMeansVQ

WIDE = 2**16 + 64          # codes 65,536 and up are the ones real patches map to


@pytest.fixture(scope="module")
def wide_tokenizer(tmp_path_factory, tokenizer_dir):
    """The tests' 64-code k-means VQ widened to 65,600 codes, written in its public layout: its
    64 centroids at codes 65,536-65,599, the codes below far from any patch. So each patch
    gets the narrow tokenizer's code + 65,536."""
    narrow = KMeansVQ.load(tokenizer_dir)
    w = {k: np.asarray(v, np.float32) for k, v in narrow._weights.items()}
    rng = np.random.default_rng(0)
    centroids = rng.normal(0, 1, (WIDE, w["centroids"].shape[1])).astype(np.float32) * 1e4 + 1e5
    centroids[-64:] = w["centroids"]
    decoder = np.zeros((WIDE, w["decoder"].shape[1]), np.float32)
    decoder[-64:] = w["decoder"]
    wide = KMeansVQ({"mean": w["mean"], "basis": w["basis"], "centroids": centroids, "decoder": decoder},
                    patch_size=narrow._cfg["patch_size"], resolution=narrow.resolution)
    path = tmp_path_factory.mktemp("wide-tok")
    wide.save(path)
    return path


@pytest.fixture(scope="module")
def narrow_codes(tmp_path_factory, tokenizer_dir, photo_jpegs):
    from tokshard.pipeline.sample_data import write_img2dataset_shards
    root = tmp_path_factory.mktemp("wide")
    src = write_img2dataset_shards(root / "src", crops_per_photo=1, shard_size=16)[0].parent
    convert(convert_config([src], root / "narrow", tokenizer_dir), quiet=True)
    ds = tokshard.open(root / "narrow")
    return src, {ds[i]["key"]: ds[i]["tokens"].astype(np.int64) for i in range(len(ds))}


# (every codec's uint32 paths: tests/test_codec_public.py; here the readers, in both formats)
@pytest.mark.parametrize("fmt,codec", [("parquet", "raw"), ("parquet", "rans-ctx"), ("wds", "bitpack")])
def test_a_wide_codebook_round_trips_through_every_reader(tmp_path, wide_tokenizer, narrow_codes, fmt, codec):
    src, narrow = narrow_codes
    dest = tmp_path / "wide"
    convert(convert_config([src], dest, wide_tokenizer, format=fmt, codec=codec, shard_size=16), quiet=True)
    ds = tokshard.open(dest)
    assert ds.vocab_size == WIDE and ds.token_dtype == np.uint32
    for i in range(len(ds)):
        sample = ds[i]
        assert np.array_equal(sample["tokens"], narrow[sample["key"]] + 65536), sample["key"]
    seen = {}
    for workers in ((0, 2) if codec == "raw" else (0,)):
        for batch in ds.loader(8, seed=1, num_workers=workers):
            assert batch["tokens"].dtype == torch.int64 and int(batch["tokens"].min()) >= 65536
            for key, codes in zip(batch["key"], batch["tokens"].numpy()):
                assert np.array_equal(codes, narrow[key] + 65536)
                seen[key] = workers
        assert set(seen) == set(narrow)
    if fmt == "parquet" and codec == "raw":
        import pyarrow.parquet as pq
        shard = sorted((dest / "shards").glob("*.parquet"))[0]
        assert str(pq.read_schema(shard).field("tokens").type.value_type) == "uint32"   # native, any tool reads it
    # The public codec API on the dataset's own payloads: uint32 back, and uint16 refused.
    if codec != "raw" and fmt == "parquet":
        import pyarrow.parquet as pq
        shard = sorted((dest / "shards").glob("*.parquet"))[0]
        payloads = pq.read_table(shard).column("tokens").to_pylist()
        c = tokshard.codec_from(ds.info.codec, WIDE, ds.codec.state())
        back = c.decode_batch(payloads, ds.grid)
        assert back.dtype == np.uint32 and int(back.min()) >= 65536
        with pytest.raises(CodecError, match="needs uint32"):
            c.decode_batch(payloads, ds.grid, dtype="uint16")
