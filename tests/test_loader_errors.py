"""Typed errors across process boundaries: every tokshard error pickles with its
fields, and one raised in a DataLoader worker reaches the training loop as itself."""

import pickle
import shutil

import pytest
from conftest import break_one_payload

import tokshard
import tokshard.errors as errors
from tokshard.errors import ShardError, SkipSample, TokshardError

OPTS = dict(rank=0, world_size=1, seed=3, shuffle_buffer=40)


def error_classes():
    return sorted((c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, TokshardError)),
                  key=lambda c: c.__name__)


EXAMPLES = {
    ShardError: [ShardError("000004", "checksum mismatch for shards/000004.parquet"), ShardError("?", "")],
    SkipSample: [SkipSample("decode_error", "cannot identify image file"), SkipSample("empty_file")],
}


def examples():
    for cls in error_classes():
        yield from EXAMPLES[cls] if cls in EXAMPLES else [cls(f"a {cls.__name__} message"), cls()]


@pytest.mark.parametrize("error", list(examples()), ids=lambda e: f"{type(e).__name__}-{e}")
def test_every_tokshard_error_pickles_with_its_fields(error):
    error.add_note("a note")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(error, protocol))
        assert type(back) is type(error)
        assert str(back) == str(error) and back.args == error.args
        assert vars(back) == vars(error)          # fields and notes
    if isinstance(error, ShardError):
        assert back.shard == error.shard
    if isinstance(error, SkipSample):
        assert (back.reason, back.detail) == (error.reason, error.detail)


def test_every_error_class_has_an_example():
    assert {type(e) for e in examples()} == set(error_classes())


def run_until_error(loader):
    """(ids of the batches delivered, the error raised, state_dict after it)."""
    delivered = []
    with pytest.raises(TokshardError) as e:
        for b in loader:
            delivered.append(b["id"].tolist())
    return delivered, e.value, loader.state_dict()


def flip_a_byte(root):
    shard = root / "shards" / "000004.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return tokshard.open(root), "000004", "checksum mismatch"


def zero_the_tail(root):
    shard = root / "shards" / "000004.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    return tokshard.open(root, verify=False), "000004", ""


def corrupt_one_payload(root):
    # The file parses but one coded payload does not decode: raised while a
    # worker builds the batch holding that sample, not while every worker reads
    # the shard.
    size = break_one_payload(root / "shards" / "000004.parquet", 5)
    ds = tokshard.open(root, verify=False)
    ds.shard_bytes[4] = size
    return ds, "000004", "sample row 5"


@pytest.mark.parametrize("damage", [flip_a_byte, zero_the_tail, corrupt_one_payload], ids=lambda f: f.__name__)
@pytest.mark.parametrize("shuffle", [True, False])
def test_a_damaged_shard_read_by_workers_is_the_same_shard_error(dataset_copy, damage, shuffle):
    ds, shard, words = damage(dataset_copy())
    delivered, error, state = run_until_error(ds.loader(16, shuffle=shuffle, **OPTS))
    assert type(error) is ShardError and error.shard == shard and words in str(error)
    assert str(error).startswith(f"shard {shard}: ")
    assert delivered, "the damaged shard should not be the first one read"
    for workers in (1, 2):
        got_delivered, got, got_state = run_until_error(ds.loader(16, shuffle=shuffle, num_workers=workers, **OPTS))
        assert type(got) is ShardError, got
        assert got.shard == shard and str(got) == str(error) and got.args == error.args
        assert "DataLoader worker process" in "\n".join(got.__notes__)
        # The same batches before it, and the cursor stops at the last one handed out.
        assert got_delivered == delivered and got_state == state


def test_resume_after_a_worker_error_continues_where_it_stopped(dataset_copy, loader_datasets):
    root = dataset_copy()
    ds, shard, _ = flip_a_byte(root)
    loader = ds.loader(16, num_workers=2, **OPTS)
    delivered, error, state = run_until_error(loader)
    assert error.shard == shard
    # Repair the shard; a new loader from the saved state gives the rest of the epoch.
    shutil.copy(loader_datasets[("parquet", "zstd")] / "shards" / "000004.parquet", root / "shards")
    full = [b["id"].tolist() for b in tokshard.open(root).loader(16, **OPTS)]
    resumed = tokshard.open(root).loader(16, num_workers=2, **OPTS)
    resumed.load_state_dict(state)
    assert delivered + [b["id"].tolist() for b in resumed] == full


def skip_in_augment(batch, generator):
    raise SkipSample("decode_error", f"batch of {len(batch['id'])}")


def value_error_in_augment(batch, generator):
    raise ValueError("not a tokshard error")


def test_an_error_from_augment_in_a_worker(loader_datasets):
    ds = tokshard.open(loader_datasets[("parquet", "zstd")])
    with pytest.raises(SkipSample) as direct:
        next(iter(ds.loader(16, augment=skip_in_augment, **OPTS)))
    with pytest.raises(SkipSample) as worker:
        next(iter(ds.loader(16, augment=skip_in_augment, num_workers=2, **OPTS)))
    assert str(worker.value) == str(direct.value) == "decode_error: batch of 16"
    assert (worker.value.reason, worker.value.detail) == ("decode_error", "batch of 16")
    # Other exceptions keep torch's own path: the type, with its worker traceback as message.
    with pytest.raises(ValueError, match="Caught ValueError in DataLoader worker process 0"):
        next(iter(ds.loader(16, augment=value_error_in_augment, num_workers=2, **OPTS)))


def test_skip_mode_in_workers_is_unchanged(dataset_copy):
    root = dataset_copy()
    ds, shard, _ = flip_a_byte(root)
    one = ds.loader(16, on_error="skip", **OPTS)
    ids = [b["id"].tolist() for b in one]
    two = ds.loader(16, on_error="skip", num_workers=2, **OPTS)
    assert [b["id"].tolist() for b in two] == ids
    assert one.skipped_shards == two.skipped_shards == [shard]
    assert one.state_dict() == two.state_dict()
