"""Packed sequences (`loader(..., pack=N)`, issue 17): the joint vocabulary, the greedy
placement (hypothesis), and packed batches of a real dataset with text tokens that decode back
to exactly the stored samples, once each per epoch, on 1-3 ranks, through workers, resumed
exactly at random steps and under a new world size."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import RES, convert_config
from hypothesis import example, given, settings
from hypothesis import strategies as st

import tokshard
from tokshard import Vocab
from tokshard.errors import UsageError
from tokshard.pipeline.convert.decode import DecodeConfig, resize_array
from tokshard.pipeline.convert.job import convert
from tokshard.pipeline.sample_data import jpeg_bytes, sample_images
from tokshard.pipeline.stream import packing
from tokshard.pipeline.stream.augment import Compose, TokenHFlip, TokenRandomResizedCrop
from tokshard.tokenizers.text import hf_tokenizers

# -- the joint vocabulary --------------------------------------------------------------


def test_the_joint_vocabulary_lays_out_text_image_and_specials():
    v = Vocab.joint(text=300, image=64)
    assert v.ids == {"bos": 364, "boi": 365, "eoi": 366, "pad": 367} and v.size == 368
    w = Vocab.joint(text=300, image=64, specials={"bos": 400, "boi": 401, "eoi": 402, "pad": 500})
    assert w.size == 501 and w.ids["pad"] == 500
    assert Vocab.joint(image=2**18).ids["bos"] == 2**18


@pytest.mark.parametrize("specials,match", [
    ({"bos": 5, "boi": 401, "eoi": 402, "pad": 403}, "'bos' id 5 collides with the text ids"),
    ({"bos": 300, "boi": 401, "eoi": 402, "pad": 403}, "'bos' id 300 collides with the image codes"),
    ({"bos": 400, "boi": 400, "eoi": 402, "pad": 403}, "share id 400"),
    ({"bos": 400, "boi": 401, "eoi": 402}, "specials lack pad"),
    ({"bos": -1, "boi": 401, "eoi": 402, "pad": 403}, "not an id"),
    ("bos", "a list of names or a mapping"),
])
def test_special_ids_that_collide_or_are_missing_are_refused(specials, match):
    with pytest.raises(UsageError, match=match):
        Vocab.joint(text=300, image=64, specials=specials)


# -- placement -------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=60), st.integers(4, 16), st.integers(1, 4),
       st.sampled_from(packing.TOO_LONG))
def test_placement_is_greedy_disjoint_and_the_same_from_each_batch_start(lengths, seq_len, rows, too_long):
    lengths = np.array(lengths, np.int64)
    batch, row, col = packing.place(lengths, seq_len, rows, too_long)
    used: set = set()
    prev = None                   # (batch, last row, end column) of the last document placed
    for i, size in enumerate(lengths.tolist()):
        span = -(-size // seq_len)
        skipped = size > seq_len and (too_long == "skip" or span > rows)
        assert (row[i] < 0) == skipped
        if skipped:
            continue
        b, r, c = int(batch[i]), int(row[i]), int(col[i])
        assert size <= seq_len or c == 0                       # split documents start a row
        cells = {(b, r * seq_len + c + j) for j in range(size)}
        assert (r * seq_len + c + size - 1) // seq_len < rows  # within the batch's rows
        assert not cells & used                               # disjoint
        used |= cells
        # greedy: right after the last document, unless it did not fit there
        if prev is None:
            assert (r, c) == (0, 0)
        elif c > 0:
            assert (b, r, c) == prev
        else:
            pb, pr, pend = prev
            fits_row = size <= seq_len and pend + size <= seq_len
            if b == pb:
                assert r == pr + 1 and not fits_row
            else:
                assert b == pb + 1 and r == 0 and not fits_row and pr + 1 + (1 if size <= seq_len else span) > rows
        end = r * seq_len + c + size
        prev = (b, (end - 1) // seq_len, (end - 1) % seq_len + 1)
    bounds = packing.pack_bounds(lengths, seq_len, rows, too_long)
    assert bounds[0] == 0 and bounds[-1] == len(lengths) and np.all(np.diff(bounds) >= 0)
    for k in range(len(bounds) - 1):
        part = lengths[bounds[k]:bounds[k + 1]]
        b2, r2, c2 = packing.place(part, seq_len, rows, too_long)
        assert np.all(b2 == 0) and np.array_equal(r2, row[bounds[k]:bounds[k + 1]])
        assert np.array_equal(c2, col[bounds[k]:bounds[k + 1]])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=0, max_size=12), st.integers(1, 3), st.integers(7, 20),
       st.integers(0, 2**31 - 1))
@example([0, 9], 3, 7, 0)        # a document split over three rows after one that fills most of a row
def test_assemble_and_unpack_are_inverse(text_lengths, image_tokens, seq_len, seed):
    rng = np.random.default_rng(seed)
    vocab = Vocab.joint(text=50, image=2**18)
    text = [rng.integers(0, 50, n) for n in text_lengths]
    image = rng.integers(0, 2**18, (len(text), image_tokens))
    lengths = packing.document_lengths(np.array(text_lengths, np.int64), image_tokens)
    _, start, _ = packing.place(lengths, seq_len, 1 << 20)
    rows = int(max((start + -(-lengths // seq_len)).tolist(), default=1))    # room for all: one batch
    out = packing.assemble(text, image, vocab, seq_len, rows)
    docs = packing.unpack(out["input_ids"], out["document_ids"], out["token_type"], vocab)
    kept = list(range(len(text)))
    assert len(docs) == (max(kept) + 1 if kept else 0)
    for d in kept:
        assert np.array_equal(docs[d][0], text[d]) and np.array_equal(docs[d][1], image[d])
        mine = out["document_ids"] == d
        assert np.array_equal(out["position_ids"][mine], np.arange(lengths[d]))
        ids = out["input_ids"][mine]
        assert ids[0] == vocab.ids["bos"] and ids[len(text[d]) + 1] == vocab.ids["boi"] and ids[-1] == vocab.ids["eoi"]
    assert np.all(out["input_ids"][~out["loss_mask"]] == vocab.ids["pad"])
    assert np.array_equal(out["loss_mask"], out["document_ids"] >= 0)


# -- packed batches of a real dataset ---------------------------------------------------

SEQ = 200       # the dataset's images are 8x8 = 64 codes: a row holds two or three documents
ROWS = 3


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory, tokenizer_dir):
    """62 real photo crops with captions of 0-40 BPE tokens, in uneven shards; and the BPE."""
    root = tmp_path_factory.mktemp("pack")
    images = [(k, resize_array(img, DecodeConfig(resolution=RES)), lab)
              for k, img, lab in sample_images(crops_per_photo=3, seed=2)][:62]
    words = "a photo of the scene with light and shade on some old stone wall by the sea".split()
    rng = random.Random(0)
    captions = [None if i % 9 == 4 else " ".join(rng.choices(words, k=rng.randrange(0, 30)))
                for i in range(len(images))]
    hf = hf_tokenizers()
    tok = hf.Tokenizer(hf.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = hf.pre_tokenizers.Whitespace()
    tok.train_from_iterator([c for c in captions if c], hf.trainers.BpeTrainer(vocab_size=120,
                                                                               special_tokens=["[UNK]"]))
    bpe = root / "bpe" / "tokenizer.json"
    bpe.parent.mkdir()
    tok.save(str(bpe))
    src = root / "src"
    src.mkdir()
    for f, (lo, hi) in enumerate([(0, 25), (25, 31), (31, 62)]):
        part = slice(lo, hi)
        pq.write_table(pa.table({"key": [k for k, _, _ in images[part]],
                                 "jpg": [jpeg_bytes(im, 90) for _, im, _ in images[part]],
                                 "label": [lab for _, _, lab in images[part]], "caption": captions[part]}),
                       src / f"{f}.parquet")
    dest = root / "ds"
    convert(convert_config([src], dest, tokenizer_dir, shard_size=11, text_tokenizer=str(bpe)), quiet=True)
    return dest


def stored(ds):
    """key -> (text ids, image codes) as ds.get reads them."""
    return {ds[i]["key"]: (ds[i]["text_tokens"], ds[i]["tokens"].reshape(-1)) for i in range(len(ds))}


def documents(batch, vocab):
    """[(key, text ids, image codes)] of a packed batch, decoded from input_ids alone."""
    docs = packing.unpack(batch["input_ids"].numpy(), batch["document_ids"].numpy(),
                          batch["token_type"].numpy(), vocab)
    assert len(docs) <= len(batch["key"])
    return [(batch["key"][d], *docs[d]) for d in range(len(docs))]


def check_batch(batch, vocab, truth):
    assert batch["input_ids"].shape == (ROWS, SEQ) and batch["input_ids"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.bool and batch["position_ids"].shape == (ROWS, SEQ)
    keys = []
    for key, text, image in documents(batch, vocab):
        want_text, want_image = truth[key]
        assert np.array_equal(text, want_text) and np.array_equal(image, want_image), key
        keys.append(key)
    return keys


def test_packed_batches_decode_to_the_stored_samples_once_each(text_dataset):
    ds = tokshard.open(text_dataset)
    truth = stored(ds)
    vocab = Vocab.joint(text=ds.text_tokenizer["vocab_size"], image=ds.vocab_size)
    for world in (1, 2, 3):
        seen, counts = [], []
        for rank in range(world):
            loader = ds.loader(ROWS, pack=SEQ, rank=rank, world_size=world, seed=4, shuffle_buffer=16,
                               num_workers=2 if rank == 1 else 0)
            batches = list(loader)
            counts.append(len(batches))
            assert len(loader) == len(batches)
            for batch in batches:
                seen += check_batch(batch, vocab, truth)
                assert batch["too_long"] == 0
        assert sorted(seen) == sorted(truth), world
        assert len(set(counts)) == 1, counts        # every rank as many batches (empty ones even them out)


def test_packed_batches_do_not_depend_on_workers_and_fill_rows_greedily(text_dataset):
    ds = tokshard.open(text_dataset)
    kw = dict(pack=SEQ, rank=0, world_size=1, seed=1, shuffle_buffer=10, columns=["caption"])
    one = list(ds.loader(ROWS, **kw))
    for workers, block in ((1, None), (2, 1), (3, 2)):
        other = list(ds.loader(ROWS, num_workers=workers, block=block, **kw))
        assert len(other) == len(one)
        for a, b in zip(one, other):
            assert a["key"] == b["key"] and a["caption"] == b["caption"]
            for k in ("input_ids", "loss_mask", "position_ids", "document_ids", "token_type", "id"):
                assert torch.equal(a[k], b[k]), k
    lengths = packing.document_lengths(ds.text_lengths(), int(np.prod(ds.grid)))
    order = torch.cat([b["id"] for b in one]).numpy()
    # the batches are those of the greedy placement of the samples in their loader order
    assert [len(b["key"]) for b in one] == np.diff(packing.pack_bounds(lengths[order], SEQ, ROWS)).tolist()


def test_packed_loader_resumes_exactly_at_random_steps(text_dataset):
    ds = tokshard.open(text_dataset)
    kw = dict(pack=SEQ, rank=1, world_size=2, seed=7, shuffle_buffer=12)
    whole = list(ds.loader(ROWS, **kw)) + list(ds.loader(ROWS, **kw))     # epochs 0 (twice: same)
    loader = ds.loader(ROWS, **kw)
    full = [b for _, b in zip(range(2 * len(loader)), _epochs(loader))]
    for step in random.Random(3).sample(range(1, len(full)), 4):
        first = ds.loader(ROWS, **kw)
        it = _epochs(first)
        for _ in range(step):
            next(it)
        state = first.state_dict()
        again = ds.loader(ROWS, **kw)
        again.load_state_dict(state)
        rest = _epochs(again)
        for want in full[step:step + 4]:
            got = next(rest)
            assert torch.equal(got["input_ids"], want["input_ids"]) and got["key"] == want["key"]
    assert len(whole) == 2 * len(loader)


def _epochs(loader):
    while True:
        yield from loader


@pytest.mark.parametrize("old,new", [(2, 3), (3, 1)])
def test_packed_loader_resumes_under_a_new_world_size_without_duplicates(text_dataset, old, new):
    ds = tokshard.open(text_dataset)
    truth = stored(ds)
    vocab = Vocab.joint(text=ds.text_tokenizer["vocab_size"], image=ds.vocab_size)
    kw = dict(pack=SEQ, seed=9, shuffle_buffer=8)
    seen, states = [], []
    for rank in range(old):
        loader = ds.loader(ROWS, rank=rank, world_size=old, **kw)
        it = iter(loader)
        for _ in range(2):
            seen += check_batch(next(it), vocab, truth)
        states.append(loader.state_dict())
        del it
    for rank in range(new):
        loader = ds.loader(ROWS, rank=rank, world_size=new, **kw)
        loader.load_state_dict(states[0])
        for batch in loader:
            seen += check_batch(batch, vocab, truth)
    assert sorted(seen) == sorted(truth)


@pytest.mark.parametrize("too_long", packing.TOO_LONG)
def test_samples_longer_than_a_row_are_split_or_skipped_and_counted(text_dataset, too_long):
    ds = tokshard.open(text_dataset)
    truth = stored(ds)
    vocab = Vocab.joint(text=ds.text_tokenizer["vocab_size"], image=ds.vocab_size)
    seq = 80                                  # 64 codes + 3 specials: captions over 13 ids are too long
    long_keys = {k for k, (t, i) in truth.items() if len(t) + len(i) + 3 > seq}
    assert 0 < len(long_keys) < len(truth)
    seen, skipped = [], 0
    for batch in ds.loader(4, pack=seq, too_long=too_long, seed=2, shuffle_buffer=5):
        docs = packing.unpack(batch["input_ids"].numpy(), batch["document_ids"].numpy(),
                              batch["token_type"].numpy(), vocab)
        for d, key in enumerate(batch["key"]):
            if d < len(docs) and len(docs[d][1]):
                assert np.array_equal(docs[d][0], truth[key][0]) and np.array_equal(docs[d][1], truth[key][1])
                seen.append(key)
        skipped += batch["too_long"]
    if too_long == "split":
        assert sorted(seen) == sorted(truth) and skipped == 0
    else:
        assert sorted(seen) == sorted(set(truth) - long_keys) and skipped == len(long_keys)


def test_bad_packing_settings_name_the_cause(text_dataset, loader_datasets):
    ds = tokshard.open(text_dataset)
    with pytest.raises(UsageError, match="pack=60 is shorter than the shortest sample: 67 tokens"):
        ds.loader(2, pack=60)
    with pytest.raises(UsageError, match="pack must be a sequence length"):
        ds.loader(2, pack=0)
    with pytest.raises(UsageError, match="too_long must be one of"):
        ds.loader(2, pack=SEQ, too_long="drop")
    with pytest.raises(UsageError, match="text ids, but the dataset's text tokenizer has"):
        ds.loader(2, pack=SEQ, vocab=Vocab.joint(text=10, image=ds.vocab_size))
    with pytest.raises(UsageError, match="image codes, but the dataset's tokenizer has"):
        ds.loader(2, pack=SEQ, vocab=Vocab.joint(text=500, image=8))
    with pytest.raises(UsageError, match="vocab= applies to packed sequences"):
        ds.loader(2, vocab=Vocab.joint(text=500, image=64))
    crop = Compose([TokenRandomResizedCrop(4), TokenHFlip()])
    with pytest.raises(UsageError, match="augment made 16 image tokens a sample; pack=N plans with 64"):
        next(iter(ds.loader(2, pack=SEQ, augment=crop)))
    first = ds.loader(2, pack=SEQ)
    next(iter(first))
    with pytest.raises(UsageError, match="pack="):
        ds.loader(2, pack=SEQ + 1).load_state_dict(first.state_dict())
    # without text tokens, a document is bos, boi, the image codes, eoi
    plain = tokshard.open(loader_datasets[("parquet", "zstd")])
    batch = next(iter(plain.loader(2, pack=SEQ, seed=0)))
    lengths = (batch["document_ids"][batch["document_ids"] >= 0]).bincount()
    assert set(lengths.tolist()) == {int(np.prod(plain.grid)) + 3}


def test_a_mixture_packs_its_streams_samples(text_dataset):
    """pack=N over tokshard.mix: each stream's samples (its text lengths from its own sample
    index, ids offset by the mixture) decode back to exactly the stored samples."""
    ds = tokshard.open(text_dataset)
    truth = stored(ds)
    vocab = Vocab.joint(text=ds.text_tokenizer["vocab_size"], image=ds.vocab_size)
    mixture = tokshard.mix([ds, ds.split(0.5, seed=1)[0]], weights=[2, 1])
    keys = []
    for rank in range(2):
        for batch in mixture.loader(ROWS, pack=SEQ, rank=rank, world_size=2, seed=3):
            keys += check_batch(batch, vocab, truth)
            assert batch["stream"].shape == (len(batch["key"]),)
    assert len(keys) == len(mixture) and set(keys) <= set(truth)
