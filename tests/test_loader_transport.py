"""How batches travel from DataLoader workers to the main process: large arrays through each
worker's shared-memory ring slots (narrowed, widened again on arrival), the rest pickled
through the pipe. Batches are the same, value for value and type for type, as without
workers; a slot is written again only after the main process is done with it, and what does
not fit, or finds its slot still in use, travels through the pipe instead."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import RES, convert_config

import tokshard
from tokshard.pipeline.convert.decode import DecodeConfig, resize_array
from tokshard.pipeline.convert.job import convert
from tokshard.pipeline.sample_data import jpeg_bytes, sample_images
from tokshard.pipeline.stream import loader as L

BATCH = 20


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, tokenizer_dir):
    """A Parquet dataset of 75 real photo crops with captions (non-ASCII text, a control
    character)."""
    root = tmp_path_factory.mktemp("transport")
    images = [(k, resize_array(img, DecodeConfig(resolution=RES)), lab)
              for k, img, lab in sample_images(crops_per_photo=4, seed=1)][:75]
    captions = [f"crop {k} — «photo» 写真 {i}" for i, (k, _, _) in enumerate(images)]
    captions[7] = "a caption with a \x1f unit separator in it"
    src = root / "src"
    src.mkdir()
    pq.write_table(pa.table({"key": [k for k, _, _ in images], "jpg": [jpeg_bytes(im, 90) for _, im, _ in images],
                             "label": [lab for _, _, lab in images], "caption": captions}), src / "0.parquet")
    dest = root / "ds"
    convert(convert_config([src], dest, tokenizer_dir, shard_size=16), quiet=True)
    return dest


def assert_same_batches(got, want):
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert list(g) == list(w)
        for k in w:
            if isinstance(w[k], torch.Tensor):
                assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k
            else:
                assert type(g[k]) is type(w[k]) and g[k] == w[k], k


@pytest.fixture()
def seen(monkeypatch):
    """What arrived in the main process: per batch, which tensors came through a ring slot."""
    out: list[set] = []
    real = L._from_numpy

    def spy(batch, pin, memory=None, base=0):
        if isinstance(batch, L._NumpyBatch):
            out.append({k for k in batch.tensors if isinstance(batch[k], L._InRing)})
        return real(batch, pin, memory, base)
    monkeypatch.setattr(L, "_from_numpy", spy)
    # small arrays into the ring too: this dataset's batches are a few KiB of tokens
    monkeypatch.setattr(L, "_RING_MIN", 256)
    return out


@pytest.mark.parametrize("workers,block", [(1, None), (2, None), (2, 1), (3, 2)])
def test_batches_through_the_ring_are_the_batches_without_workers(captioned, seen, workers, block):
    ds = tokshard.open(captioned)
    kw = dict(seed=5, shuffle_buffer=30, rank=0, world_size=1, columns=["caption", "width", "meta"])
    want = list(ds.loader(BATCH, **kw))
    got = list(ds.loader(BATCH, num_workers=workers, block=block, **kw))
    assert_same_batches(got, want)
    assert len(seen) == len(want)
    assert all("tokens" in ring for ring in seen)                     # every block had its slot


def test_a_spawned_worker_gets_the_ring_with_its_settings(captioned, monkeypatch):
    """A spawned worker (not forked: no module state inherited) receives the ring with the
    dataset; what goes through it is decided by the ring's own settings."""
    monkeypatch.setattr(L, "_RING_MIN", 256)
    arrived = []
    real = L._Ring.unpack

    def spy(self, item, pin):
        arrived.append(item.slot)
        return real(self, item, pin)
    monkeypatch.setattr(L._Ring, "unpack", spy)
    ds = tokshard.open(captioned)
    kw = dict(seed=2, shuffle_buffer=30, rank=1, world_size=2, columns=["caption"])
    got = list(ds.loader(BATCH, num_workers=1, block=1, multiprocessing_context="spawn", **kw))
    assert_same_batches(got, list(ds.loader(BATCH, **kw)))
    assert arrived and all(slot >= 0 for slot in arrived)


def block_of(rng, batches=2, rows=8, width=512):
    # (8 x 512 tokens: enough to travel narrowed, as uint16: 8 KiB a batch)
    # and an array that travels as it is (floats): copied out of the slot, not widened
    return [{"tokens": torch.from_numpy(rng.integers(0, 300, (rows, width))), "key": [f"k{i}" for i in range(rows)],
             "id": torch.arange(rows), "emb": torch.from_numpy(rng.standard_normal((rows, width // 2), np.float32))}
            for _ in range(batches)]


def travel(item):
    return pickle.loads(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))


def test_a_slot_is_written_again_only_after_the_main_process_is_done_with_it():
    rng = np.random.default_rng(0)
    ring = L._Ring(1, slots=2, slot_bytes=40_000, min_bytes=64)
    blocks = [block_of(rng) for _ in range(6)]
    sent = [travel(ring.pack(b)) for b in blocks[:3]]
    # blocks 0 and 1 took the two slots; block 2 found slot 0 still unread: through the pipe
    assert [s.slot for s in sent] == [0, 1, -1]
    assert all(isinstance(b[k], L._InRing) for s in sent[:2] for b in s for k in ("tokens", "emb"))
    assert all(isinstance(b["tokens"], np.ndarray) and b["tokens"].dtype == np.uint16 for b in sent[2])
    out0 = ring.unpack(sent[0], pin=False)
    sent.append(travel(ring.pack(blocks[3])))         # slot 1 is still block 1's
    assert sent[3].slot == -1
    ring.unpack(sent[1], pin=False)
    ring.unpack(sent[2], pin=False)
    sent.append(travel(ring.pack(blocks[4])))         # slot 0, free since block 0 was read
    assert sent[4].slot == 0
    # block 0 as it was, although its slot now holds block 4: it was copied out, not viewed
    for got, want in zip(out0, blocks[0]):
        assert got["tokens"].dtype == torch.int64 and torch.equal(got["tokens"], want["tokens"])
        assert torch.equal(got["emb"], want["emb"])
        assert got["key"] == want["key"] and torch.equal(got["id"], want["id"])
    for s, b in zip(sent[3:], blocks[3:5]):
        for got, want in zip(ring.unpack(s, pin=False), b):
            assert torch.equal(got["tokens"], want["tokens"]) and torch.equal(got["emb"], want["emb"])


def test_what_does_not_fit_a_slot_travels_through_the_pipe():
    rng = np.random.default_rng(1)
    ring = L._Ring(1, slots=3, slot_bytes=10_000, min_bytes=64)   # one batch's tokens fit, not two
    block = block_of(rng) + [{"tokens": torch.from_numpy(rng.integers(-5, 5, (8, 512)))}]
    item = travel(ring.pack(block))
    kinds = [type(b["tokens"]) for b in item]
    assert kinds == [L._InRing, np.ndarray, np.ndarray]
    assert item[2]["tokens"].dtype == np.int16                  # narrowed all the same
    for got, want in zip(ring.unpack(item, pin=False), block):
        assert got["tokens"].dtype == torch.int64 and torch.equal(got["tokens"], want["tokens"])
