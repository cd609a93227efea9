"""The streaming loader on real converted datasets: partitioning, order, resume."""

import os
import random
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import LOADER_VARIANTS

import tokshard
from tokshard.errors import UsageError

OPTS = dict(seed=3, shuffle_buffer=40)


def reference(ds):
    """id -> (key, tokens, label) read in manifest order, without the loader."""
    return {i: (k, t.copy(), lab) for i, k, t, lab in ds}


def rank_batches(ds, rank, world, workers=1, block=1, **kw):
    """A rank's batches with `workers` emulated in-process, in DataLoader order (blocks of
    `block` batches, one DataLoader item each, taken from the workers round-robin)."""
    it = ds.iterable(16, rank=rank, world_size=world, **{**OPTS, **kw})
    per_worker = []
    for w in range(workers):
        mine = list(it.batches(w, workers, block))
        per_worker.append([mine[j:j + block] for j in range(0, len(mine), block)])
    out = []
    for i in range(max(map(len, per_worker), default=0)):
        out += [b for p in per_worker if i < len(p) for b in p[i]]
    return out


def ids(batches):
    """The ids delivered, padding (samples repeated to even out the ranks) left out."""
    return [i for b in batches for i, pad in zip(b["id"].tolist(), b["pad"].tolist()) if not pad]


@pytest.mark.parametrize("variant", LOADER_VARIANTS, ids=lambda v: "-".join(v))
def test_every_sample_exactly_once_for_any_world_and_workers(loader_datasets, variant):
    ds = tokshard.open(loader_datasets[variant])
    ref = reference(ds)
    assert sorted(ref) == list(range(len(ds))) and len(ds) == 213
    for world in (1, 2, 3, 5, 8):
        for workers in (1, 2, 3):
            seen, counts, sizes, pads = [], set(), set(), 0
            for rank in range(world):
                batches = rank_batches(ds, rank, world, workers)
                assert all(len(b["id"]) == 16 for b in batches[:-1])
                counts.add(len(batches))
                sizes.add(sum(len(b["id"]) for b in batches))
                pads += sum(int(b["pad"].sum()) for b in batches)
                for b in batches:
                    for i, k, t, lab in zip(b["id"].tolist(), b["key"], b["tokens"].numpy(), b["label"].tolist()):
                        key, tokens, label = ref[i]
                        assert (k, lab) == (key, label) and np.array_equal(t, tokens)
                seen += ids(batches)
            assert Counter(seen) == Counter(range(len(ds))), (world, workers)
            # Even batches (the default): every rank as many samples, so as many batches.
            assert len(counts) == len(sizes) == 1 and pads == sizes.pop() * world - len(ds), (world, workers)


def test_rank_stream_does_not_depend_on_worker_count(loader_datasets):
    ds = tokshard.open(loader_datasets[("parquet", "zstd")])
    one = ids(rank_batches(ds, 1, 3, 1))
    for workers in (2, 3, 4):
        for block in (1, 2, 3):
            assert ids(rank_batches(ds, 1, 3, workers, block)) == one, (workers, block)
    # The same through real DataLoader worker processes, whatever batches travel together,
    # and from a resume in the middle of a block.
    for block in (None, 1, 3):
        loader = ds.loader(16, rank=1, world_size=3, num_workers=2, block=block, **OPTS)
        assert ids(loader) == one
    first = ds.loader(16, rank=1, world_size=3, num_workers=2, block=3, **OPTS)
    head = [b for _, b in zip(range(4), first)]
    second = ds.loader(16, rank=1, world_size=3, num_workers=3, block=2, **OPTS)
    second.load_state_dict(first.state_dict())
    assert ids(head) + ids(second) == one
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UsageError, match="block must be a positive number"):
            ds.loader(16, block=bad)


def test_order_is_a_function_of_seed_epoch_and_shards(loader_datasets):
    ds = tokshard.open(loader_datasets[("parquet", "raw")])
    a = ids(rank_batches(ds, 0, 1))
    assert ids(rank_batches(tokshard.open(loader_datasets[("parquet", "raw")]), 0, 1)) == a
    assert ids(rank_batches(ds, 0, 1, seed=4)) != a
    assert sorted(a) == list(range(len(ds))) and a != sorted(a)
    loader = ds.loader(16, rank=0, world_size=1, **OPTS)
    e0, e1 = ids(loader), ids(loader)
    assert e0 == a and e1 != e0 and sorted(e1) == sorted(e0) and loader.epoch == 2
    # No shuffle: manifest order, whatever the world size.
    plain = [ids(rank_batches(ds, r, 3, shuffle=False)) for r in range(3)]
    assert sum(plain, []) == list(range(len(ds)))
    # A shuffle buffer never reaches further ahead than its size.
    windowed = ids(rank_batches(ds, 0, 1, shuffle=False))
    assert windowed == list(range(len(ds)))


def test_drop_last_gives_every_rank_the_same_number_of_full_batches(loader_datasets):
    ds = tokshard.open(loader_datasets[("wds", "raw")])
    for world in (2, 3, 5):
        counts, seen = set(), []
        for rank in range(world):
            batches = rank_batches(ds, rank, world, drop_last=True)
            assert all(len(b["id"]) == 16 for b in batches)
            counts.add(len(batches))
            seen += ids(batches)
            assert len(ds.loader(16, rank=rank, world_size=world, drop_last=True, **OPTS)) == len(batches)
        assert counts == {(len(ds) // world) // 16}
        assert len(seen) == len(set(seen))


def roll_augment(batch, generator):
    """A tiny stand-in augmentation: random per-sample roll, from the generator only."""
    shifts = torch.randint(0, 8, (len(batch["id"]),), generator=generator)
    tokens = torch.stack([torch.roll(t, int(s), dims=-1) for t, s in zip(batch["tokens"], shifts)])
    return {**batch, "tokens": tokens}


def collect(loader, n=None):
    out = []
    if n == 0:
        return out
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def same(a, b):
    return len(a) == len(b) and all(
        x["id"].tolist() == y["id"].tolist() and torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))


@pytest.mark.parametrize("variant", [("parquet", "zstd"), ("wds", "raw")], ids=lambda v: "-".join(v))
def test_resume_mid_epoch_is_exact(loader_datasets, variant):
    ds = tokshard.open(loader_datasets[variant])
    kw = dict(rank=1, world_size=2, augment=roll_augment, **OPTS)
    loader = ds.loader(16, **kw)
    full = collect(loader) + collect(loader)          # two epochs
    per_epoch = len(full) // 2
    rng = random.Random(0)
    for k in sorted({0, 1, per_epoch - 1, per_epoch, per_epoch + 2, *rng.sample(range(2 * per_epoch), 4)}):
        first = ds.loader(16, **kw)
        head = collect(first, k % per_epoch) if k < per_epoch else collect(first) + collect(first, k - per_epoch)
        state = first.state_dict()
        resumed = ds.loader(16, num_workers=2 if k % 2 else 0, **kw)
        resumed.load_state_dict(state)
        tail = collect(resumed)
        if resumed.epoch == 1 and k < per_epoch:
            tail += collect(resumed)
        assert same(head + tail, full), k


def test_resume_under_a_changed_world_size(loader_datasets):
    ds = tokshard.open(loader_datasets[("parquet", "zstd")])
    for old, new, steps in [(2, 3, 2), (3, 2, 1), (1, 4, 5), (4, 1, 1), (2, 5, 3), (3, 3, 0)]:
        consumed, state = [], None
        for rank in range(old):
            loader = ds.loader(16, rank=rank, world_size=old, **OPTS)
            consumed += ids(collect(loader, steps))
            state = loader.state_dict()
        rest = []
        for rank in range(new):
            loader = ds.loader(16, rank=rank, world_size=new, **OPTS)
            loader.load_state_dict(state)
            rest += ids(collect(loader))
            assert loader.epoch == 1      # it finished the interrupted epoch
        assert Counter(consumed + rest) == Counter(range(len(ds))), (old, new, steps)


def test_resume_twice_with_world_size_changes(loader_datasets):
    ds = tokshard.open(loader_datasets[("parquet", "raw")])
    consumed = []
    loaders = [ds.loader(8, rank=r, world_size=2, **OPTS) for r in range(2)]
    for loader in loaders:
        consumed += ids(collect(loader, 3))
    state = loaders[0].state_dict()
    mid = [ds.loader(8, rank=r, world_size=3, **OPTS) for r in range(3)]
    for loader in mid:
        loader.load_state_dict(state)
        consumed += ids(collect(loader, 2))
    state = mid[0].state_dict()
    assert state["history"] == [[2, 3]] and state["world_size"] == 3
    for rank in range(2):
        loader = ds.loader(8, rank=rank, world_size=2, **OPTS)
        loader.load_state_dict(state)
        consumed += ids(collect(loader))
    assert Counter(consumed) == Counter(range(len(ds)))


def test_a_state_from_other_settings_or_data_is_refused(loader_datasets):
    ds = tokshard.open(loader_datasets[("parquet", "raw")])
    state = ds.loader(16, rank=0, world_size=1, **OPTS).state_dict()
    with pytest.raises(UsageError, match="seed=3 \\(now 4\\)"):
        ds.loader(16, rank=0, world_size=1, seed=4, shuffle_buffer=40).load_state_dict(state)
    with pytest.raises(UsageError, match="batch_size"):
        ds.loader(8, rank=0, world_size=1, **OPTS).load_state_dict(state)
    other = tokshard.open(loader_datasets[("wds", "raw")])
    with pytest.raises(UsageError, match="different dataset"):
        other.loader(16, rank=0, world_size=1, **OPTS).load_state_dict(state)
    with pytest.raises(UsageError, match="not a tokshard loader state"):
        ds.loader(16, rank=0, world_size=1, **OPTS).load_state_dict({"epoch": 0})


def test_bad_loader_arguments_are_usage_errors(loader_datasets):
    ds = tokshard.open(loader_datasets[("parquet", "raw")])
    with pytest.raises(UsageError, match="rank 2"):
        ds.loader(16, rank=2, world_size=2)
    with pytest.raises(UsageError, match="batch_size"):
        ds.loader(0)
    with pytest.raises(UsageError, match="max_tokens"):
        ds.loader(16, max_tokens=4)       # a 2-D grid cannot be truncated
    with pytest.raises(UsageError, match="on_error"):
        ds.loader(16, on_error="ignore")


def test_rank_and_world_size_default_from_the_environment(loader_datasets, monkeypatch):
    ds = tokshard.open(loader_datasets[("parquet", "raw")])
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    it = ds.iterable(16)
    assert (it.rank, it.world_size) == (2, 3)


def test_real_augmentations_in_workers_keep_semantics_and_resume(loader_datasets):
    from tokshard.pipeline.stream.augment import Compose, TokenCutMix, TokenHFlip, TokenRandomResizedCrop
    ds = tokshard.open(loader_datasets[("parquet", "zstd")])
    ref = reference(ds)
    aug = Compose([TokenRandomResizedCrop(6, scale=(0.3, 1.0)), TokenHFlip(), TokenCutMix(num_classes=32)])
    kw = dict(rank=0, world_size=1, augment=aug, **OPTS)
    full = collect(ds.loader(16, num_workers=2, **kw))
    assert ids(full) == ids(rank_batches(ds, 0, 1))        # augmentation never reorders
    for b in full:
        assert b["tokens"].shape == (len(b["id"]), 6, 6) and b["target"].shape == (len(b["id"]), 32)
        torch.testing.assert_close(b["target"].sum(1), torch.ones(len(b["id"])))
        for i, lab, _tokens, target in zip(b["id"].tolist(), b["label"].tolist(), b["tokens"], b["target"]):
            # A sample's own label keeps a share; the pasted box takes the rest for the partner's.
            assert lab == ref[i][2] and target[lab] > 0
    head = collect(ds.loader(16, **kw), 5)
    resumed = ds.loader(16, num_workers=2, **kw)
    resumed.load_state_dict(ds.loader(16, **kw).state_dict() | {"batches": 5})
    tail = collect(resumed)
    assert same(head + tail, full)
    assert all(torch.equal(x["target"], y["target"]) for x, y in zip(head + tail, full))


def test_where_selects_samples_without_rewriting_shards(loader_datasets):
    ds = tokshard.open(loader_datasets[("parquet", "zstd")])
    want = {i for i, _, _, label in ds if label in (1, 4)}
    assert 0 < len(want) < len(ds)
    for world, workers in ((1, 1), (2, 2), (3, 1)):
        seen = []
        for rank in range(world):
            batches = rank_batches(ds, rank, world, workers, where="label IN (1, 4)")
            assert all(set(b["label"].tolist()) <= {1, 4} for b in batches)
            seen += ids(batches)
        assert Counter(seen) == Counter(want)
    kw = dict(rank=0, world_size=1, where="label IN (1, 4)", **OPTS)
    full = collect(ds.loader(4, **kw))
    head = collect(ds.loader(4, **kw), 3)
    resumed = ds.loader(4, num_workers=2, **kw)
    resumed.load_state_dict(ds.loader(4, **kw).state_dict() | {"batches": 3})
    assert same(head + collect(resumed), full)
    with pytest.raises(UsageError, match="where="):
        ds.loader(4, rank=0, world_size=1, **OPTS).load_state_dict(ds.loader(4, **kw).state_dict())
    with pytest.raises(UsageError, match="no_such_column"):
        ds.loader(4, where="no_such_column = 1")


def test_workers_are_pinned_to_cores_of_their_own_rank(loader_datasets, tmp_path, monkeypatch):
    from tokshard.pipeline.stream.loader import TokenIterable, worker_cores
    # This rank's slice of a machine its local ranks all see; the launcher's binding kept.
    assert worker_cores(4, allowed=range(16), cpus=16, local_rank=1, local_world=4) == (4, 5, 6, 7)
    assert worker_cores(2, allowed=[4, 5, 6, 7], cpus=16, local_rank=1, local_world=4) == (4, 5)
    assert worker_cores(5, allowed=range(16), cpus=16, local_rank=3, local_world=4) == (12, 13, 14, 15, 12)
    assert worker_cores(2, False, allowed=range(16), cpus=16) is None
    # Real workers, asked to be pinned: each on its own core of this process's set; by default not pinned.
    allowed = sorted(os.sched_getaffinity(0))
    log = tmp_path / "cores"
    original = TokenIterable.batches

    def batches(self, worker=0, workers=1, block=1):
        with open(log, "a") as f:
            f.write(f"{worker} {sorted(os.sched_getaffinity(0))}\n")
        return original(self, worker, workers, block)

    monkeypatch.setattr(TokenIterable, "batches", batches)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    ds = tokshard.open(loader_datasets[("parquet", "zstd")])
    workers = min(2, len(allowed))
    list(ds.loader(16, num_workers=workers, rank=0, world_size=1, worker_affinity=True, **OPTS))
    seen = dict(line.split(" ", 1) for line in log.read_text().splitlines())
    assert seen == {str(w): f"[{allowed[w]}]" for w in range(workers)}
    log.write_text("")
    list(ds.loader(16, num_workers=workers, rank=0, world_size=1, **OPTS))
    assert {line.split(" ", 1)[1] for line in log.read_text().splitlines()} == {str(allowed)}
