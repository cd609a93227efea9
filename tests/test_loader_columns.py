"""`loader(..., columns=[...])`: any stored column reaches the batch (caption, metadata and its
fields, size, source, split, class name), the same from Parquet and WebDataset shards, through
DataLoader workers and on every rank; the default batch stays lean; a column that cannot be
delivered is a UsageError naming it."""

from __future__ import annotations

import json

import pytest
from conftest import convert_config

import tokshard
from tokshard.errors import UsageError
from tokshard.pipeline.convert.job import convert

NAMES = ["cat", "dog", "<b>bird</b>"]
COLUMNS = ["caption", "meta.score", "meta", "split", "class_name", "width", "height", "source"]


@pytest.fixture(scope="module")
def hub_datasets(tmp_path_factory, photo_jpegs, tokenizer_dir):
    """A Hugging Face Hub-layout source (train and test splits, Image + ClassLabel + caption +
    score), converted to Parquet and WebDataset shards; and what the source says of each sample."""
    import datasets
    root = tmp_path_factory.mktemp("hub")
    src = root / "src" / "data"
    src.mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES),
                                  "caption": datasets.Value("string"), "score": datasets.Value("float64")})
    truth = {}
    for split, part in (("train", photo_jpegs[:8]), ("test", photo_jpegs[8:12])):
        rows = {"image": [{"bytes": d, "path": None} for _, d, _ in part],
                "label": [i % 3 for i in range(len(part))],
                "caption": [f"{split} photo {k}" for k, _, _ in part], "score": [i / 8 for i in range(len(part))]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(src / f"{split}-00000-of-00001.parquet")
        for i in range(len(part)):
            key = f"{split}/{split}-00000-of-00001/{i:09d}"
            truth[key] = {"caption": rows["caption"][i], "score": rows["score"][i], "split": split,
                          "class_name": NAMES[rows["label"][i]]}
    out = {}
    for fmt in ("parquet", "wds"):
        out[fmt] = root / fmt
        convert(convert_config([root / "src"], out[fmt], tokenizer_dir, format=fmt, shard_size=5), quiet=True)
    return out, truth


def rows_of(batches):
    for b in batches:
        for j, key in enumerate(b["key"]):
            if not b["pad"][j]:
                yield key, {c: b[c][j] for c in COLUMNS}


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_columns_reach_every_rank_and_worker(hub_datasets, fmt):
    paths, truth = hub_datasets
    ds = tokshard.open(paths[fmt])
    seen = {}
    for rank in range(2):
        loader = ds.loader(3, rank=rank, world_size=2, seed=1, shuffle_buffer=4, columns=COLUMNS,
                           num_workers=rank)      # rank 1 through a DataLoader worker process
        for key, row in rows_of(loader):
            assert key not in seen
            seen[key] = row
    assert set(seen) == set(truth)
    for key, row in seen.items():
        want = truth[key]
        assert (row["caption"], row["meta.score"], row["split"], row["class_name"]) == \
            (want["caption"], want["score"], want["split"], want["class_name"]), key
        assert row["meta"] == {"score": want["score"], "split": want["split"]}
        assert json.dumps(row["meta"])                       # plain JSON values
        assert int(row["width"]) > 0 and int(row["height"]) > 0 and row["source"].endswith(".parquet")
    batch = next(iter(ds.loader(4, rank=0, world_size=1, columns=["width", "caption"])))
    assert batch["width"].dtype.is_floating_point is False and batch["width"].shape == (4,)
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 4


def test_the_default_batch_is_lean_and_columns_do_not_change_the_order(hub_datasets):
    paths, _ = hub_datasets
    ds = tokshard.open(paths["parquet"])
    plain = list(ds.loader(4, rank=0, world_size=1, seed=2))
    wide = list(ds.loader(4, rank=0, world_size=1, seed=2, columns=COLUMNS))
    assert set(plain[0]) == {"tokens", "label", "key", "id", "pad"}
    assert [b["key"] for b in plain] == [b["key"] for b in wide]
    assert all(set(b) == set(plain[0]) | set(COLUMNS) for b in wide)


def test_a_column_that_cannot_be_delivered_is_named(hub_datasets, loader_datasets):
    paths, _ = hub_datasets
    ds = tokshard.open(paths["parquet"])
    assert ds.label_names == NAMES
    for columns, message in ((["similarity"], "unknown column 'similarity': one of caption"),
                             (["tokens"], "column 'tokens' is always in the batch"),
                             ("caption", "a list of names, not the string 'caption'"),
                             (["meta."], "unknown column 'meta.'"),
                             ([3], "must be a string, got 3")):
        with pytest.raises(UsageError, match=message):
            ds.loader(4, columns=columns)
    unnamed = tokshard.open(loader_datasets[("parquet", "zstd")])
    with pytest.raises(UsageError, match="column 'class_name': this dataset has no class names"):
        unnamed.loader(4, columns=["class_name"])
    # A metadata field no sample has is None for every sample (fields are optional per sample).
    batch = next(iter(ds.loader(4, rank=0, world_size=1, columns=["meta.missing"])))
    assert batch["meta.missing"] == [None] * 4


def test_metadata_that_is_not_json_is_a_shard_error_naming_shard_and_row(dataset_copy):
    """The loader and ds[i] parse stored metadata with one rule and fail alike on text that is not JSON."""
    import hashlib
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import rewrite_manifest

    from tokshard.errors import ShardError
    root = dataset_copy(("parquet", "zstd"))
    ds = tokshard.open(root)
    name, path = ds.shard_names[0], root / ds.manifest.column("path")[0].as_py()
    table = pq.read_table(path)
    meta = table.column("meta").to_pylist()
    meta[3] = '{"broken": '
    i = table.schema.get_field_index("meta")
    table = table.set_column(i, table.schema.field("meta"), pa.array(meta, pa.string()))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    path.write_bytes(data)

    def fix(rows):
        rows[0].update(sha256=hashlib.sha256(data).hexdigest(), stored_bytes=len(data))
    rewrite_manifest(root, rows=fix)
    ds = tokshard.open(root)
    with pytest.raises(ShardError, match="row 3: its metadata is not JSON") as e:
        list(ds.loader(4, columns=["meta"], shuffle=False, rank=0, world_size=1))
    assert e.value.shard == name
    with pytest.raises(ShardError, match="row 3: its metadata is not JSON"):
        ds[3]
    assert ds[2]["meta"] == (json.loads(meta[2]) if meta[2] is not None else None)
