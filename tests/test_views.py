"""Stored views (hflip, ten-crop) at convert time, picked by the loader."""

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import RES, convert_config

import tokshard
from tokshard.errors import UsageError
from tokshard.pipeline.convert.decode import DecodeConfig, decode_image
from tokshard.pipeline.convert.job import convert
from tokshard.pipeline.convert.views import make_views
from tokshard.tokenizers.kmeans_vq import KMeansVQ


def expected_codes(photo_jpegs, tokenizer_dir, views, resolution):
    """key -> codes of every view, computed without the pipeline: decode, cut, encode."""
    tok = KMeansVQ.load(tokenizer_dir)
    out = {}
    for key, data, _ in photo_jpegs:
        image = decode_image(data, DecodeConfig(resolution=resolution)).image
        out[key] = tok.encode(np.stack(make_views(image, views, RES)))
    return out


@pytest.mark.parametrize("fmt,codec", [("parquet", "zstd"), ("wds", "raw")])
def test_hflip_view_holds_the_tokens_of_the_flipped_image(tmp_path, photo_folder, photo_jpegs, tokenizer_dir,
                                                           fmt, codec):
    dest = tmp_path / "ds"
    convert(convert_config([photo_folder], dest, tokenizer_dir, views="hflip", format=fmt, codec=codec), quiet=True)
    ds = tokshard.open(dest)
    assert ds.views == ("orig", "hflip") and ds.sample_shape == (2, 8, 8)
    want = expected_codes(photo_jpegs, tokenizer_dir, "hflip", RES)
    seen = 0
    for _, key, tokens, _ in ds:
        assert np.array_equal(tokens, want[key.split("/")[-1]]), key
        seen += 1
    assert seen == len(photo_jpegs)
    # The flipped image's tokens are not the flipped tokens: why views are stored.
    assert any(not np.array_equal(w[1], w[0][:, ::-1]) for w in want.values())


def test_tencrop_stores_ten_views_of_the_enlarged_image(tmp_path, photo_folder, photo_jpegs, tokenizer_dir):
    dest = tmp_path / "ds"
    convert(convert_config([photo_folder], dest, tokenizer_dir, views="tencrop"), quiet=True)
    ds = tokshard.open(dest)
    assert len(ds.views) == 10 and ds.sample_shape == (10, 8, 8)
    assert ds.record["decode"]["resolution"] == int(RES * 1.1)
    want = expected_codes(photo_jpegs, tokenizer_dir, "tencrop", int(RES * 1.1))
    for _, key, tokens, _ in ds:
        assert np.array_equal(tokens, want[key.split("/")[-1]]), key


def test_loader_picks_views_reproducibly(tmp_path, photo_folder, tokenizer_dir):
    dest = tmp_path / "ds"
    convert(convert_config([photo_folder], dest, tokenizer_dir, views="hflip"), quiet=True)
    ds = tokshard.open(dest)
    stored = {i: t for i, _, t, _ in ds}

    def run(**kw):
        return [b for b in ds.loader(4, rank=0, world_size=1, seed=1, **kw)]

    batches = run()
    views = torch.cat([b["view"] for b in batches])
    assert set(Counter(views.tolist())) == {0, 1}
    for b in batches:
        for i, v, t in zip(b["id"].tolist(), b["view"].tolist(), b["tokens"]):
            assert np.array_equal(t.numpy(), stored[i][v])
    again = run()
    assert all(torch.equal(a["view"], b["view"]) for a, b in zip(batches, again))
    for b in run(view=1):
        assert (b["view"] == 1).all()
        assert all(np.array_equal(t.numpy(), stored[i][1]) for i, t in zip(b["id"].tolist(), b["tokens"]))
    everything = run(view="all")
    assert everything[0]["tokens"].shape[1:] == (2, 8, 8) and "view" not in everything[0]
    with pytest.raises(UsageError, match="view must be"):
        ds.loader(4, view=2)
    with pytest.raises(UsageError, match="unknown views"):
        convert(convert_config([photo_folder], tmp_path / "x", tokenizer_dir, views="fivecrop"), quiet=True)
