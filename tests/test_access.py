"""Random access and subsets (issue 16): `ds[i]`, `ds.get(key)`, the map-style view, and
`subset`/`split` by a hash of the key, as datasets of their own (len, [i], get, loader)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import convert_config

import tokshard
from tokshard.errors import UsageError
from tokshard.pipeline.convert.job import convert


def reference(ds):
    return {i: (k, t.copy(), lab) for i, k, t, lab in ds}


@pytest.mark.parametrize("variant", [("parquet", "zstd"), ("wds", "raw")], ids=lambda v: "-".join(v))
def test_every_sample_by_index_and_by_key(loader_datasets, variant):
    ds = tokshard.open(loader_datasets[variant])
    ref = reference(ds)
    order = np.random.default_rng(0).permutation(len(ds)).tolist()
    for i in order:
        s = ds[i]
        key, tokens, label = ref[i]
        assert (s["id"], s["key"], s["label"]) == (i, key, label)
        assert s["tokens"].shape == ds.sample_shape and np.array_equal(s["tokens"], tokens)
        assert s["width"] > 0 and s["height"] > 0 and isinstance(s["source"], str)
    for i in order[:40]:
        assert ds.get(ref[i][0])["id"] == i
    assert ds[-1]["id"] == len(ds) - 1 and ds[-len(ds)]["id"] == 0
    for bad in (len(ds), -len(ds) - 1):
        with pytest.raises(IndexError):
            ds[bad]
    for bad in (1.0, True, "0"):
        with pytest.raises(TypeError):
            ds[bad]
    with pytest.raises(KeyError):
        ds.get("no-such-key")
    assert ds.keys == [ref[i][0] for i in range(len(ds))]
    # What a caller changes in a returned sample does not change the next lookup's.
    s = ds[3]
    s["tokens"][:] = 0
    assert np.array_equal(ds[3]["tokens"], ref[3][1])


def test_the_sample_cache_is_bounded(loader_datasets):
    ds = tokshard.open(loader_datasets[("parquet", "zstd")], sample_cache_bytes=1)
    for i in range(0, len(ds), 7):
        ds[i]
    assert len(ds.samples.shards) == 1            # a bound below one shard keeps one shard
    roomy = tokshard.open(loader_datasets[("parquet", "zstd")])
    for i in range(0, len(roomy), 7):
        roomy[i]
    assert len(roomy.samples.shards) == roomy.num_shards
    assert roomy.samples.bytes <= roomy.samples.max_bytes


def test_split_is_a_deterministic_hash_of_the_key(loader_datasets, photo_folder, tokenizer_dir, tmp_path):
    ds = tokshard.open(loader_datasets[("parquet", "zstd")])
    part, rest = ds.split(0.25, seed=7)
    assert len(part) + len(rest) == len(ds) and not set(part.ids.tolist()) & set(rest.ids.tolist())
    assert 0.1 < len(part) / len(ds) < 0.4
    again, _ = tokshard.open(loader_datasets[("wds", "raw")]).split(0.25, seed=7)
    assert again.keys == part.keys                 # the same keys, another format and layout
    assert ds.split(0.25, seed=8)[0].keys != part.keys
    assert len(ds.subset(0)) == 0 and len(ds.subset(1)) == len(ds)
    # A part is a dataset: [i], get, and split again (inside the part).
    for j in range(len(part)):
        assert part[j]["key"] == part.keys[j] == ds[int(part.ids[j])]["key"]
    assert part.get(part.keys[0])["key"] == part.keys[0]
    with pytest.raises(KeyError):
        part.get(rest.keys[0])
    inner, outer = part.split(0.5, seed=1)
    assert sorted(inner.keys + outer.keys) == sorted(part.keys)
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(UsageError, match="fraction"):
            ds.subset(bad)
    # The same keys split the same way in another conversion of them (other shard sizes).
    for name, size in (("a", 3), ("b", 5)):
        convert(convert_config([photo_folder], tmp_path / name, tokenizer_dir, shard_size=size), quiet=True)
    a, b = tokshard.open(tmp_path / "a"), tokshard.open(tmp_path / "b")
    assert a.shard_sizes.tolist() != b.shard_sizes.tolist()
    assert sorted(a.split(0.5, seed=3)[0].keys) == sorted(b.split(0.5, seed=3)[0].keys)


def test_a_part_streams_with_every_loader_guarantee(loader_datasets):
    ds = tokshard.open(loader_datasets[("parquet", "zstd")])
    part, rest = ds.split(0.3, seed=2)
    seen = Counter()
    for rank in range(2):
        for b in part.loader(8, rank=rank, world_size=2, seed=1, shuffle_buffer=16):
            seen.update(i for i, pad in zip(b["id"].tolist(), b["pad"].tolist()) if not pad)
    assert seen == Counter(part.ids.tolist())
    assert len(part.loader(8, rank=0, world_size=1)) == -(-len(part) // 8)
    # Resume: exact within the part; a state of another part is refused.
    loader = part.loader(8, rank=0, world_size=1, seed=1)
    full = [b["id"].tolist() for b in loader]
    first = part.loader(8, rank=0, world_size=1, seed=1)
    head = [b["id"].tolist() for _, b in zip(range(2), first)]
    state = first.state_dict()
    second = part.loader(8, rank=0, world_size=1, seed=1)
    second.load_state_dict(state)
    assert head + [b["id"].tolist() for b in second] == full
    with pytest.raises(UsageError, match="subset"):
        rest.loader(8, rank=0, world_size=1, seed=1).load_state_dict(state)
    # where= within a part: the samples in both.
    labelled = part.loader(8, rank=0, world_size=1, where="label = 1")
    got = sorted(i for b in labelled for i in b["id"].tolist())
    assert got == sorted(i for i in part.ids.tolist() if ds[i]["label"] == 1)


def test_map_style_view_with_a_torch_dataloader(loader_datasets):
    ds = tokshard.open(loader_datasets[("wds", "raw")])
    view = ds.map_dataset()
    assert isinstance(view, torch.utils.data.Dataset) and len(view) == len(ds)
    sampler = torch.utils.data.RandomSampler(view, generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in torch.utils.data.DataLoader(view, batch_size=32, sampler=sampler, num_workers=1):
        assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape[1:] == ds.sample_shape
        for i, t in zip(batch["id"].tolist(), batch["tokens"]):
            assert np.array_equal(t.numpy(), ds[i]["tokens"])
        seen += batch["id"].tolist()
    assert sorted(seen) == list(range(len(ds)))
    part, _ = ds.split(0.5)
    assert len(part.map_dataset()) == len(part)
    with pytest.raises(UsageError, match="unknown columns"):
        ds.map_dataset(columns=["similarity"])
