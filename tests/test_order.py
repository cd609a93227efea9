"""The epoch plan is integer arithmetic: check it without any data."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tokshard.pipeline.stream.order import (
    BufferShuffle,
    consumed_positions,
    emission_order,
    mix64,
    permutation,
    plan_length,
    plan_lookup,
    plan_positions,
    rank_slice,
    shard_order,
    stream_batches,
    stream_rank_slice,
)


def run_shuffle(length, size, key, chunks):
    s = BufferShuffle(length, size, key)
    out = []
    fed = 0
    for c in chunks:
        c = min(c, length - fed)
        out += s.feed(c).tolist()
        fed += c
    if fed < length:
        out += s.feed(length - fed).tolist()
    return out + s.drain().tolist()


@settings(max_examples=60, deadline=None)
@given(length=st.integers(0, 300), size=st.integers(0, 64), key=st.integers(0, 2**64 - 1),
       chunks=st.lists(st.integers(1, 50), max_size=20))
def test_buffer_shuffle_is_a_permutation_independent_of_chunking(length, size, key, chunks):
    one = run_shuffle(length, size, key, [length])
    assert sorted(one) == list(range(length))
    assert run_shuffle(length, size, key, chunks) == one
    if size == 0:
        assert one == list(range(length))


def test_buffer_shuffle_mixes_within_a_window():
    out = run_shuffle(5000, 100, 7, [5000])
    displacement = np.abs(np.array(out) - np.arange(5000))
    assert displacement.mean() > 20          # it does shuffle
    assert out != run_shuffle(5000, 100, 8, [5000])
    # Bounded buffer: the i-th output entered no later than position i + size.
    assert all(p <= i + 100 for i, p in enumerate(out))


@settings(max_examples=60, deadline=None)
@given(length=st.integers(0, 200), size=st.integers(0, 40), key=st.integers(0, 2**64 - 1),
       outputs=st.integers(0, 220))
def test_consumed_positions_match_the_stream(length, size, key, outputs):
    outputs = min(outputs, length)
    stream = run_shuffle(length, size, key, [length])
    left, fed = consumed_positions(length, size, key, outputs)
    remaining = sorted(set(range(length)) - set(stream[:outputs]))
    assert sorted(left.tolist() + list(range(fed, length))) == remaining


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 500), world=st.integers(1, 9))
def test_rank_slices_partition_the_plan(n, world):
    plan = ((0, n),)
    got = [plan_positions(s, 0, plan_length(s)).tolist() for s in (rank_slice(plan, r, world) for r in range(world))]
    assert sum(got, []) == list(range(n))
    assert max(map(len, got)) - min(map(len, got)) <= 1


def test_mixed_plans_slice_and_chunk_at_shard_boundaries():
    plan = ((0, 10), np.array([42, 17, 3]), (20, 25))
    assert plan_positions(plan, 0, plan_length(plan)).tolist() == list(range(10)) + [42, 17, 3] + list(range(20, 25))
    assert plan_positions(plan, 8, 14).tolist() == [8, 9, 42, 17, 3, 20]
    assert plan_lookup(plan, np.array([13, 0, 11, 9])).tolist() == [20, 0, 17, 9]


def test_shard_order_is_keyed_and_stable():
    a = shard_order(50, seed=1, epoch=0, shuffle=True)
    assert sorted(a.tolist()) == list(range(50))
    assert (a == shard_order(50, seed=1, epoch=0, shuffle=True)).all()
    assert (a != shard_order(50, seed=1, epoch=1, shuffle=True)).any()
    assert (a != shard_order(50, seed=2, epoch=0, shuffle=True)).any()
    assert shard_order(5, 1, 0, shuffle=False).tolist() == [0, 1, 2, 3, 4]
    # Pinned values: the order must not change with numpy versions or machines.
    assert permutation(12345, 8).tolist() == [3, 7, 1, 4, 2, 6, 5, 0]


def test_mix64_is_splitmix64():
    # The first two outputs of the reference SplitMix64 seeded with 0.
    assert mix64(0, np.array([1, 2], np.uint64)).tolist() == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


@settings(max_examples=80, deadline=None)
@given(streams=st.lists(st.integers(0, 3), max_size=120), world=st.integers(1, 5), even=st.booleans())
def test_stream_rank_slices_partition_each_stream_and_even_out_its_counts(streams, world, even):
    streams = np.asarray(streams, np.int64)
    positions = np.arange(1000, 1000 + len(streams), dtype=np.int64)[::-1].copy()   # any plan
    spans = [stream_rank_slice(positions, streams, r, world, even) for r in range(world)]
    real = np.concatenate([span[:n] for span, n in spans])
    assert sorted(real.tolist()) == sorted(positions.tolist())          # each position once
    at = {int(p): i for i, p in enumerate(positions)}
    for span, n in spans:
        assert [at[int(p)] for p in span[:n]] == sorted(at[int(p)] for p in span[:n])   # plan order
        assert set(span[n:].tolist()) <= set(positions.tolist())
    for s in np.unique(streams).tolist():
        per = [int(np.sum(streams[[at[int(p)] for p in span]] == s)) for span, _ in spans]
        total = int(np.sum(streams == s))
        if even:
            assert set(per) == {-(-total // world)}                       # as many of it on every rank
        else:
            assert max(per) - min(per) <= 1 and sum(per) == total


@settings(max_examples=80, deadline=None)
@given(streams=st.lists(st.integers(0, 3), max_size=150), bs=st.integers(1, 9),
       quota=st.none() | st.lists(st.integers(0, 5), min_size=4, max_size=4))
def test_stream_batches_regroup_an_emission_order_into_one_stream_batches(streams, bs, quota):
    streams = np.asarray(streams, np.int64)
    q = None if quota is None else dict(enumerate(quota))
    flat, bounds = stream_batches(streams, bs, q)
    batches = [flat[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
    assert all(len({int(streams[i]) for i in b}) == 1 for b in batches)             # one stream each
    assert len(set(flat.tolist())) == len(flat)
    for s in range(4):
        mine = [i for b in batches for i in b if streams[i] == s]
        assert mine == sorted(mine)                                     # a stream's order is kept
        have = int(np.sum(streams == s))
        if q is None:
            assert len(mine) == have                                    # everything, partials last
        else:
            assert len(mine) == min(have // bs, q[s]) * bs
    full = [b for b in batches if len(b) == bs]
    assert [b[-1] for b in full] == sorted(b[-1] for b in full)          # as their last sample comes
    assert batches[:len(full)] == full


def reference_emission(length, size, key):
    """The buffer shuffle as its definition reads, one position at a time."""
    if size == 0:
        return list(range(length))
    buf, out = [], []
    for p in range(length):
        if len(buf) < size:
            buf.append(p)
            continue
        j = int(mix64(key, np.array([p], np.uint64))[0] % np.uint64(size))
        out.append(buf[j])
        buf[j] = p
    return out + np.asarray(buf, np.int64)[permutation(key ^ 0x7A11, len(buf))].tolist()


@settings(max_examples=60, deadline=None)
@given(length=st.integers(0, 400), size=st.integers(0, 40), key=st.integers(0, 2**64 - 1))
def test_the_vectorised_buffer_shuffle_is_its_step_by_step_definition(length, size, key):
    assert emission_order(length, size, key).tolist() == reference_emission(length, size, key)
