"""Gathering a batch's rows out of packed shards (pipeline/stream/shard_rows.py)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokshard.pipeline.stream.shard_rows import PackedRows, gather


def shard(seed: int, n: int, tokens_dtype=np.uint16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, 1024, (n, 6)).astype(tokens_dtype),
            "label": rng.integers(-1, 9, n), "valid": rng.random(n) < 0.9,
            "key": np.array([f"s{seed}/{i}" for i in range(n)], object),
            "caption": np.array([None if i % 3 == 0 else f"caption {seed}.{i}" for i in range(n)], object),
            "width": rng.integers(1, 5000, n).astype(np.int64)}


def reference(shards: list[dict], picks: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    return {c: np.array([shards[s][c][r] for s, r in picks], dtype=shards[0][c].dtype)
            .reshape(len(picks), *shards[0][c].shape[1:]) for c in shards[0]}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=5), st.data())
def test_gather_returns_the_picked_rows_in_position_order(sizes, data):
    shards = [shard(i, n) for i, n in enumerate(sizes)]
    packed = [PackedRows(s) for s in shards]
    picks = data.draw(st.lists(st.integers(0, len(sizes) - 1).flatmap(
        lambda s: st.tuples(st.just(s), st.integers(0, sizes[s] - 1))), min_size=1, max_size=30))
    # As ShardRows.rows does: positions grouped by shard (stable), then put back.
    keys = np.array([s for s, _ in picks])
    order = np.argsort(keys, kind="stable")
    parts, at = [], 0
    for s in np.unique(keys).tolist():
        count = int((keys == s).sum())
        parts.append((packed[s], np.array([picks[i][1] for i in order[at:at + count]], np.int64)))
        at += count
    out, want = gather(parts, order), reference(shards, picks)
    torch.from_numpy(out["label"]), torch.from_numpy(out["tokens"].astype(np.int64))   # one row too
    assert out.keys() == want.keys()
    for c, v in want.items():
        assert out[c].dtype == v.dtype and out[c].shape == v.shape and out[c].flags.c_contiguous
        assert out[c].strides[-1:] in ((), (v.itemsize,)) if v.ndim == 1 else True   # torch takes it
        assert out[c].tolist() == v.tolist(), c


def test_shards_of_other_layouts_gather_column_by_column():
    # e.g. the stand-in rows of an unreadable shard next to real ones, or streams whose
    # tokens are stored in other dtypes.
    shards = [shard(0, 4), shard(1, 3, tokens_dtype=np.uint32)]
    a, b = PackedRows(shards[0]), PackedRows(shards[1])
    assert a.layout is not b.layout and PackedRows(shard(2, 2)).layout is a.layout
    order = np.array([1, 2, 0])          # positions 1, 2 from shard 0 rows 3, 0; position 0 from shard 1 row 2
    out = gather([(a, np.array([3, 0])), (b, np.array([2]))], order)
    assert out["key"].tolist() == ["s1/2", "s0/3", "s0/0"]
    assert out["tokens"].tolist() == [shards[1]["tokens"][2].tolist(), shards[0]["tokens"][3].tolist(),
                                      shards[0]["tokens"][0].tolist()]
    assert out["label"].tolist() == [shards[1]["label"][2], shards[0]["label"][3], shards[0]["label"][0]]


def test_a_shard_parsed_for_some_rows_is_those_rows_of_the_whole(loader_datasets):
    """What a loader worker reads (`select`): the rows it delivers, as the whole shard has them,
    in both formats, coded and raw; a shard shorter than the manifest still fails its count."""
    import pytest

    import tokshard
    from tokshard.errors import ShardError
    from tokshard.pipeline.format.shards.registry import parse_shard
    for variant in (("parquet", "zstd"), ("wds", "raw"), ("parquet", "raw")):
        ds = tokshard.open(loader_datasets[variant])
        n = int(ds.shard_sizes[0])
        rows = np.array([0, 2, n - 1])
        whole = ds.read_shard(0, ("caption", "meta", "width"))
        part = ds.read_shard(0, ("caption", "meta", "width"), rows)
        assert part.rows_in_shard == n and len(part) == 3
        for c in whole:
            assert np.array_equal(np.asarray(list(part[c])), np.asarray(list(whole[c][rows]))), (variant, c)
        kw = dict(shard="s", fmt=ds.format, codec=ds.codec.name, n_tokens=ds.tokens_per_sample,
                  dtype=ds.token_dtype)
        data = ds._shard_bytes(0)
        with pytest.raises(ShardError, match=f"holds {n} samples, the manifest says {n + 5}"):
            parse_shard(data, samples=n + 5, rows=np.array([n + 1]), **kw)
        with pytest.raises(ValueError, match="sorted, unique"):
            parse_shard(data, samples=n, rows=np.array([2, 1]), **kw)
