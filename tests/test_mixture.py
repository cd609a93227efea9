"""Mixtures (issue 16): several datasets streamed as one, with the loader's guarantees: each
stream's epoch share without duplicates and in its proportion, deterministic order, exact and
elastic resume, even batches, `where` per stream; incompatible datasets and bad weights refused."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from conftest import rewrite_manifest

import tokshard
from tokshard.errors import UsageError

OPTS = dict(seed=4, shuffle_buffer=24)


@pytest.fixture(scope="module")
def streams(loader_datasets):
    a = tokshard.open(loader_datasets[("parquet", "zstd")])
    b = tokshard.open(loader_datasets[("wds", "raw")])
    c = tokshard.open(loader_datasets[("parquet", "rans-ctx")])
    return a, b, c


def mixture(streams):
    a, b, c = streams
    part, _ = b.split(0.5, seed=1)
    return tokshard.mix([a, part, tokshard.Stream(c, choose=10, where="label IN (1, 2)")])


def delivered(loader_batches):
    """[(stream, id)] of the non-padding samples, in order."""
    return [(s, i) for b in loader_batches
            for s, i, pad in zip(b["stream"].tolist(), b["id"].tolist(), b["pad"].tolist()) if not pad]


def test_every_stream_share_once_per_epoch_on_any_world(streams):
    a, b, c = streams
    mix = mixture(streams)
    part_ids = set(b.split(0.5, seed=1)[0].ids.tolist())
    labelled = {i for i in range(len(c)) if c[i]["label"] in (1, 2)}
    assert mix.take == [len(a), len(part_ids), 10] and len(mix) == sum(mix.take) and len(labelled) > 10
    for world in (1, 2, 3):
        got, counts = [], set()
        for rank in range(world):
            batches = list(mix.loader(8, rank=rank, world_size=world, **OPTS))
            counts.add(len(batches))
            got += delivered(batches)
        assert len(counts) == 1                          # even batches across ranks
        per = Counter(s for s, _ in got)
        assert [per[s] for s in range(3)] == mix.take
        assert len(got) == len(set(got))                # no sample twice in an epoch share
        ids = {s: {i - int(mix.offsets[s]) for t, i in got if t == s} for s in range(3)}
        assert ids[0] == set(range(len(a))) and ids[1] == part_ids and ids[2] <= labelled


def test_a_stream_drawn_below_its_size_visits_every_sample_before_repeating(streams):
    a, _, _ = streams
    mix = tokshard.mix([tokshard.Stream(a, choose=50)])
    loader = mix.loader(10, rank=0, world_size=1, **OPTS)
    seen: list[int] = []
    for _ in range(-(-len(a) // 50)):                   # ceil(213 / 50) = 5 epochs
        seen += [i for _, i in delivered(loader)]
    assert len(set(seen[: 4 * 50])) == 4 * 50           # no repeat before the stream is used up
    assert set(seen) == set(range(len(a)))              # and every sample by then


def test_weights_are_proportions_of_the_epoch_and_mix_throughout(streams):
    a, b, _ = streams
    mix = tokshard.mix([a, b], weights=[3, 1])
    n = len(a) + len(b)
    assert mix.take == [round(0.75 * n), round(0.25 * n)]
    order = [s for s, _ in delivered(mix.loader(16, rank=0, world_size=1, seed=0, shuffle_buffer=0))]
    for lo in range(0, len(order) - 40, 40):            # every stretch holds the proportions
        assert 25 <= order[lo:lo + 40].count(0) <= 35
    repeated = tokshard.mix([tokshard.Stream(b, repeat=2)])
    assert Counter(Counter(i for _, i in delivered(repeated.loader(16, rank=0, world_size=1))).values()) == {2: len(b)}


def test_order_is_deterministic_and_resume_is_exact_and_elastic(streams):
    mix = mixture(streams)
    kw = dict(batch_size=8, **OPTS)
    full = delivered(mix.loader(rank=0, world_size=1, **kw))
    assert full == delivered(mixture(streams).loader(rank=0, world_size=1, **kw))
    assert full != delivered(mix.loader(rank=0, world_size=1, batch_size=8, seed=5, shuffle_buffer=24))
    # Exact: stop after 5 batches, resume in a new loader.
    first = mix.loader(rank=0, world_size=1, **kw)
    head = []
    for i, batch in enumerate(first):
        head.append(batch)
        if i == 4:
            break
    second = mixture(streams).loader(rank=0, world_size=1, **kw)
    second.load_state_dict(first.state_dict())
    assert delivered(head) + delivered(second) == full
    # Elastic: 2 ranks stop after 3 batches each; 3 ranks finish the epoch; nothing twice, nothing lost.
    states, got = [], []
    for rank in range(2):
        loader = mix.loader(rank=rank, world_size=2, **kw)
        part = []
        for i, batch in enumerate(loader):
            part.append(batch)
            if i == 2:
                break
        got += delivered(part)
        states.append(loader.state_dict())
    for rank in range(3):
        loader = mix.loader(rank=rank, world_size=3, **kw)
        loader.load_state_dict(states[0])
        got += delivered(loader)
    assert len(got) == len(set(got)) and Counter(s for s, _ in got) == Counter(s for s, _ in full)
    with pytest.raises(UsageError, match="other settings|different dataset"):
        tokshard.mix([streams[0]]).loader(rank=0, world_size=1, **kw).load_state_dict(states[0])


def test_incompatible_streams_and_bad_weights_are_refused(streams, dataset_copy):
    a, b, _ = streams
    other = dataset_copy(("parquet", "raw"))
    rewrite_manifest(other, record=lambda r: r["tokenizer"].update(tokenizer_id="0" * 64))
    with pytest.raises(UsageError, match="another tokenizer"):
        tokshard.mix([a, tokshard.open(other)])
    for weights, message in (([1, -1], "positive"), ([1, float("nan")], "positive"), ([1, 0], "positive"),
                             ([1], "1 weights for 2 streams"), ([1, True], "positive")):
        with pytest.raises(UsageError, match=message):
            tokshard.mix([a, b], weights=weights)
    with pytest.raises(UsageError, match="not both"):
        tokshard.mix([a, tokshard.Stream(b, choose=3)], weights=[1, 1])
    with pytest.raises(UsageError, match="one of proportion, repeat, choose"):
        tokshard.mix([tokshard.Stream(a, choose=3, repeat=2)])
    with pytest.raises(UsageError, match="non-empty list"):
        tokshard.mix([])
    with pytest.raises(UsageError, match="not a dataset"):
        tokshard.mix([a, 3])
    with pytest.raises(UsageError, match="per stream"):
        tokshard.mix([a, b]).loader(8, where="label = 1")
    with pytest.raises(UsageError, match="no samples to draw"):
        tokshard.mix([a, tokshard.Stream(b, where="label = 12345", choose=5)])
    assert np.array_equal(tokshard.mix([a]).offsets, [0, len(a)])


def one_stream_batches(batches):
    return all(len(set(b["stream"].tolist())) == 1 for b in batches)


def test_per_stream_batches_hold_one_stream_and_keep_every_guarantee(streams):
    mix = mixture(streams)
    for world in (1, 2, 3):
        got, counts = [], set()
        for rank in range(world):
            loader = mix.loader(8, rank=rank, world_size=world, batching="per_stream", **OPTS)
            batches = list(loader)
            assert one_stream_batches(batches) and len(batches) == len(loader)
            counts.add(len(batches))
            got += delivered(batches)
        assert len(counts) == 1                                        # even batches across ranks
        assert len(got) == len(set(got)) and [Counter(s for s, _ in got)[s] for s in range(3)] == mix.take
        # drop_last: only full one-stream batches, as many on every rank, nothing twice.
        ranks = [list(mix.loader(8, rank=r, world_size=world, batching="per_stream", drop_last=True, **OPTS))
                 for r in range(world)]
        assert len({len(b) for b in ranks}) == 1 and all(len(b["id"]) == 8 for bs in ranks for b in bs)
        assert all(one_stream_batches(b) for b in ranks)
        dropped = [x for b in ranks for x in delivered(b)]
        assert len(dropped) == len(set(dropped)) and len(dropped) > len(got) - 3 * world * 8
    # Streams still interleave through the epoch rather than one after another.
    order = [int(b["stream"][0]) for b in mix.loader(8, rank=0, world_size=1, batching="per_stream", **OPTS)]
    assert order[: len(order) // 2].count(1) > 0 and order[len(order) // 2:].count(0) > 0


def test_per_stream_batches_resume_exactly_and_elastically_and_ignore_num_workers(streams):
    mix = mixture(streams)
    kw = dict(batch_size=8, batching="per_stream", **OPTS)
    full = list(mix.loader(rank=0, world_size=1, **kw))
    with_workers = list(mix.loader(rank=0, world_size=1, num_workers=2, **kw))
    assert [b["id"].tolist() for b in with_workers] == [b["id"].tolist() for b in full]
    assert [b["tokens"].tolist() for b in with_workers] == [b["tokens"].tolist() for b in full]
    rng = np.random.default_rng(0)
    for stop in rng.choice(len(full) - 1, 3, replace=False).tolist():
        first = mix.loader(rank=0, world_size=1, **kw)
        head = [b for _, b in zip(range(stop + 1), first)]
        second = mixture(streams).loader(rank=0, world_size=1, **kw)
        second.load_state_dict(first.state_dict())
        assert delivered(head) + delivered(second) == delivered(full)
    for old, new, steps in ((2, 3, 3), (3, 2, 2)):   # (ranks step together, so stop together)
        states, got = [], []
        for rank in range(old):
            loader = mix.loader(rank=rank, world_size=old, **kw)
            got += delivered([b for _, b in zip(range(steps), loader)])
            states.append(loader.state_dict())
        counts = set()
        for rank in range(new):
            loader = mix.loader(rank=rank, world_size=new, **kw)
            loader.load_state_dict(states[0])
            batches = list(loader)
            assert one_stream_batches(batches)
            counts.add(len(batches))
            got += delivered(batches)
        assert len(counts) == 1
        assert len(got) == len(set(got)) and set(got) == set(delivered(full))   # nothing twice, nothing lost
    mixed = mix.loader(rank=0, world_size=1, batch_size=8, **OPTS)
    next(iter(mixed))
    with pytest.raises(UsageError, match="batching='per_stream' \\(now 'mixed'\\)"):
        mixed.load_state_dict(first.state_dict())
    with pytest.raises(UsageError, match="applies to a mixture"):
        streams[0].loader(8, batching="per_stream")
    with pytest.raises(UsageError, match="'mixed' or 'per_stream'"):
        mix.loader(8, batching="stratified")
