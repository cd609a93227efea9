"""Variable token grids (issue 17): `--resize-mode area --max-pixels P` resizes each image to
at most P pixels keeping its aspect ratio, in whole patches, and stores each sample's own
grid (shards and sample index). Read back by `ds[i]`, streamed by the loader in batches of
one grid each (grouped as per-stream batching groups), and packed into sequences.

The source: the bundled photos cropped to five aspect ratios, as JPEGs in Parquet files; the
tokenizer: the tests' k-means VQ (8-pixel patches); 4,096 pixels: at most 64 tokens a sample."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import convert_config, rewrite_manifest

import tokshard
from tokshard.errors import ManifestError, ShardError, UsageError
from tokshard.jobs.cli import main
from tokshard.pipeline.convert.decode import DecodeConfig, area_grid, decode_image
from tokshard.pipeline.convert.job import convert
from tokshard.pipeline.sample_data import jpeg_bytes
from tokshard.pipeline.stream.packing import IMAGE, Vocab, unpack
from tokshard.pipeline.tools.verify import verify
from tokshard.tokenizers.kmeans_vq import KMeansVQ

pytestmark = pytest.mark.xdist_group("variable-grid")   # one worker converts the module's datasets once

AREA, PATCH = 4096, 8
ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (2, 5))    # width : height
VARIANTS = (("parquet", "zstd"), ("parquet", "raw"), ("wds", "raw"), ("parquet", "rans-ctx"))


def aspect_crop(img: np.ndarray, aw: int, ah: int) -> np.ndarray:
    h, w = img.shape[:2]
    if w * ah > h * aw:
        cw = h * aw // ah
        return img[:, (w - cw) // 2:(w - cw) // 2 + cw]
    ch = w * ah // aw
    return img[(h - ch) // 2:(h - ch) // 2 + ch]


@pytest.fixture(scope="module")
def source(tmp_path_factory, photos):
    """Parquet files of the photos cropped to ASPECTS: (folder, {key: jpeg bytes})."""
    root = tmp_path_factory.mktemp("vg-src")
    rows = []
    for key, img, label in photos:
        for aw, ah in ASPECTS:
            rows.append((f"{key}_{aw}x{ah}", jpeg_bytes(np.ascontiguousarray(aspect_crop(img, aw, ah)), 92), label))
    for f in range(0, len(rows), 17):       # uneven files, so shards of several grids each
        part = rows[f:f + 17]
        pq.write_table(pa.table({"key": [k for k, _, _ in part], "jpg": [d for _, d, _ in part],
                                 "caption": [f"a photo {k}" for k, _, _ in part],
                                 "label": [lab for _, _, lab in part]}), root / f"{f:03d}.parquet")
    return root, {k: d for k, d, _ in rows}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, source, tokenizer_dir):
    root = tmp_path_factory.mktemp("vg")
    out = {}
    for fmt, codec in VARIANTS:
        dest = root / f"{fmt}-{codec}"
        convert(convert_config([source[0]], dest, tokenizer_dir, format=fmt, codec=codec, shard_size=12,
                               resize_mode="area", max_area=AREA), quiet=True)
        out[(fmt, codec)] = dest
    return out


def test_each_sample_keeps_its_own_grid(datasets, source, tokenizer_dir):
    """Every sample's codes are the tokenizer's codes of its area-resized image, on the grid
    area_grid gives its (oriented) size; the record and the sample index say so."""
    tok = KMeansVQ.load(tokenizer_dir)
    cfg = DecodeConfig(resize_mode="area", max_area=AREA, patch=PATCH)
    ds = tokshard.open(str(datasets[("parquet", "zstd")]))
    assert ds.variable_grid == {"resize_mode": "area", "max_pixels": AREA, "patch": PATCH,
                                "max_tokens": AREA // PATCH ** 2}
    assert ds.grid == () and ds.sample_shape == ()
    assert len(ds) == len(source[1])
    grids = ds.grids()
    assert len({tuple(g) for g in grids.tolist()}) >= 4        # the aspects give grids of their own
    for i in range(len(ds)):
        s = ds[i]
        assert s["tokens"].shape == tuple(grids[i])
        assert tuple(grids[i]) == area_grid(s["width"], s["height"], AREA, PATCH)
        assert grids[i].prod() <= AREA // PATCH ** 2
        dec = decode_image(source[1][s["key"]], cfg)
        assert dec.image.shape == (grids[i][0] * PATCH, grids[i][1] * PATCH, 3)
        np.testing.assert_array_equal(s["tokens"], tok.encode(dec.image[None])[0])
    man = pq.read_table(datasets[("parquet", "zstd")] / "manifest.parquet")
    assert man.column("tokens").to_pylist() and sum(man.column("tokens").to_pylist()) == int(grids.prod(axis=1).sum())


def test_every_format_and_codec_stores_the_same_grids(datasets):
    ref = tokshard.open(str(datasets[VARIANTS[0]]))
    want = [ref[i]["tokens"] for i in range(len(ref))]
    for variant in VARIANTS[1:]:
        ds = tokshard.open(str(datasets[variant]))
        np.testing.assert_array_equal(ds.grids(), ref.grids())
        for i in range(len(ds)):
            np.testing.assert_array_equal(ds[i]["tokens"], want[i], err_msg=str(variant))
    # raw Parquet is readable without tokshard: a list of ids per sample, and its grid beside it
    table = pq.read_table(next((datasets[("parquet", "raw")] / "shards").glob("*.parquet")))
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["tokens"]) == row["grid_h"] * row["grid_w"]


def test_the_same_job_writes_the_same_bytes(tmp_path, source, tokenizer_dir, datasets):
    dest = tmp_path / "again"
    convert(convert_config([source[0]], dest, tokenizer_dir, format="parquet", codec="rans-ctx", shard_size=12,
                           resize_mode="area", max_area=AREA), quiet=True)
    first = datasets[("parquet", "rans-ctx")]
    for f in sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file() and "_work" not in p.parts
                    and p.name != "timings.parquet"):
        assert (dest / f).read_bytes() == (first / f).read_bytes(), f


def epoch(ds, world, **kw):
    """Every rank's batches of one epoch: {rank: [batch, ...]}."""
    return {r: list(ds.loader(7, rank=r, world_size=world, seed=3, **kw)) for r in range(world)}


@pytest.mark.parametrize("variant,world", [(("parquet", "zstd"), 1), (("parquet", "zstd"), 2), (("wds", "raw"), 3)])
def test_loader_batches_are_of_one_grid_and_cover_the_epoch_once(datasets, variant, world):
    ds = tokshard.open(str(datasets[variant]))
    grids = ds.grids()
    ranks = epoch(ds, world)
    assert len({len(b) for b in ranks.values()}) == 1                    # no rank waits for another
    assert all(len(ds.loader(7, rank=r, world_size=world, seed=3)) == len(b) for r, b in ranks.items())
    seen = Counter()
    for batches in ranks.values():
        for b in batches:
            h, w = b["tokens"].shape[1:]
            assert (b["grid"] == torch.tensor([h, w])).all()
            assert len({tuple(grids[i]) for i in b["id"].tolist()}) == 1
            for i, t, pad in zip(b["id"].tolist(), b["tokens"], b["pad"].tolist()):
                np.testing.assert_array_equal(t.numpy(), ds[i]["tokens"])
                if not pad:
                    seen[i] += 1
    assert seen == Counter(range(len(ds)))                                 # each sample once
    # no padding waste beyond one partial batch per grid a rank holds
    for batches in ranks.values():
        partial = Counter(tuple(b["tokens"].shape[1:]) for b in batches if len(b["id"]) < 7)
        assert all(v == 1 for v in partial.values())


def test_drop_last_keeps_full_batches_only_and_equal_counts(datasets):
    ds = tokshard.open(str(datasets[("parquet", "zstd")]))
    ranks = epoch(ds, 2, drop_last=True)
    assert len(ranks[0]) == len(ranks[1]) > 0
    assert all(len(b["id"]) == 7 for bs in ranks.values() for b in bs)


def test_workers_and_resume_give_the_same_batches(datasets):
    ds = tokshard.open(str(datasets[("parquet", "rans-ctx")]))
    want = list(ds.loader(5, seed=1, rank=1, world_size=2))
    got = list(ds.loader(5, seed=1, rank=1, world_size=2, num_workers=2))
    assert [b["id"].tolist() for b in got] == [b["id"].tolist() for b in want]
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(got, want))
    for step in (1, len(want) // 2, len(want) - 1):
        loader = ds.loader(5, seed=1, rank=1, world_size=2)
        it = iter(loader)
        for _ in range(step):
            next(it)
        state = loader.state_dict()
        fresh = ds.loader(5, seed=1, rank=1, world_size=2)
        fresh.load_state_dict(state)
        assert [b["id"].tolist() for b in fresh] == [b["id"].tolist() for b in want[step:]]


def test_elastic_resume_covers_the_rest_once(datasets):
    """Two ranks stop part-way; three ranks go on: every sample once over the epoch."""
    ds = tokshard.open(str(datasets[("parquet", "zstd")]))
    seen = Counter()
    states = []
    for r in range(2):
        loader = ds.loader(4, seed=2, rank=r, world_size=2, even_batches=False)
        it = iter(loader)
        for _ in range(3):
            seen.update(next(it)["id"].tolist())
        states.append(loader.state_dict())
    for r in range(3):
        loader = ds.loader(4, seed=2, rank=r, world_size=3, even_batches=False)
        loader.load_state_dict(states[0])
        for b in loader:
            seen.update(b["id"].tolist())
    assert seen == Counter(range(len(ds)))


def test_mixture_of_variable_grid_datasets(datasets):
    a = tokshard.open(str(datasets[("parquet", "zstd")]))
    b = tokshard.open(str(datasets[("wds", "raw")]))
    mix = tokshard.mix([a, b], weights=[1, 1])
    grids = mix.grids()
    n = 0
    for batch in mix.loader(6, seed=0):
        assert len({tuple(grids[i]) for i in batch["id"].tolist()}) == 1
        n += len(batch["id"])
    assert n == len(mix)


def test_pack_places_each_sample_with_its_own_grid(datasets):
    ds = tokshard.open(str(datasets[("parquet", "zstd")]))
    vocab = Vocab.joint(text=0, image=ds.vocab_size)
    seen = {}
    for b in ds.loader(4, pack=160, seed=0):
        docs = unpack(b["input_ids"].numpy(), b["document_ids"].numpy(), b["token_type"].numpy(), vocab)
        assert len(docs) == len(b["id"]) == len(b["grid"])
        for i, g, (text, image) in zip(b["id"].tolist(), b["grid"].tolist(), docs):
            assert len(text) == 0 and tuple(ds[i]["tokens"].shape) == tuple(g)
            np.testing.assert_array_equal(image, ds[i]["tokens"].ravel())
            seen[i] = seen.get(i, 0) + 1
        assert int((b["token_type"] == IMAGE).sum()) == int(np.prod(b["grid"].numpy(), axis=1).sum())
    assert seen == dict.fromkeys(range(len(ds)), 1)
    fewest = int(ds.grids().prod(axis=1).min())
    with pytest.raises(UsageError, match=f"shortest sample: {fewest + 3} tokens"):
        ds.loader(4, pack=fewest + 2)
    assert len(ds.loader(4, pack=fewest + 3)) > 0


def test_bad_settings_are_usage_errors(tmp_path, source, tokenizer_dir):
    def run(**kw):
        return convert(convert_config([source[0]], tmp_path / "x", tokenizer_dir, **kw), quiet=True)
    with pytest.raises(UsageError, match="needs --max-pixels"):
        run(resize_mode="area")
    with pytest.raises(UsageError, match="go with --resize-mode area"):
        run(max_area=AREA)
    with pytest.raises(UsageError, match="--patch 16"):
        run(resize_mode="area", max_area=AREA, patch=16)
    with pytest.raises(UsageError, match="--views"):
        run(resize_mode="area", max_area=AREA, views="hflip")
    ds = tokshard.open(str(convert(convert_config([source[0]], tmp_path / "ok", tokenizer_dir, shard_size=12,
                                                  resize_mode="area", max_area=AREA),
                                   quiet=True)["dataset"] and tmp_path / "ok"))
    with pytest.raises(UsageError, match="variable grids"):
        ds.loader(4, tokens=["tokens", "x"])
    from tokshard.pipeline.tools.fields import add_tokens
    with pytest.raises(UsageError, match="variable grids"):
        add_tokens(str(tmp_path / "ok"), "second", "kmeans-vq")


def test_cli_converts_area_mode(tmp_path, source, tokenizer_dir, capsys):
    out = tmp_path / "cli"
    assert main(["convert", str(source[0]), "--out", str(out), "--tokenizer-opt", f"path={tokenizer_dir}",
                 "--resize-mode", "area", "--max-pixels", str(AREA), "--patch", str(PATCH), "--codec", "rans-ctx",
                 "--quiet"]) == 0
    rec = json.loads(pq.read_schema(out / "manifest.parquet").metadata[b"tokshard"])
    assert rec["variable_grid"]["max_pixels"] == AREA and rec["grid"] == []
    # the trained codec's model is counted into what the dataset costs (issue 18)
    model = rec["codec_state_bytes"]
    assert model == (out / "codec" / "state.bin").stat().st_size > 0
    with_model = (rec["totals"]["stored_bytes"] + model) / rec["totals"]["samples"]
    assert f"with the codec model ({model:,} B) {with_model:.1f} B/image" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "variable grids" in text and f"with the codec model ({model:,} B)" in text


def test_a_tampered_index_grid_is_a_shard_error(tmp_path, datasets):
    dest = tmp_path / "t"
    shutil.copytree(datasets[("parquet", "zstd")], dest)
    ds = tokshard.open(str(dest))
    # swap one sample's grid in its index for another valid grid (the same token count transposed)
    target = next(i for i, g in enumerate(ds.grids().tolist()) if g[0] != g[1])
    shard = ds.shard_names[int(np.searchsorted(ds.shard_offsets, target, side="right") - 1)]
    index = Path(ds.layout.index(shard))
    table = pq.read_table(index)
    row = target - int(ds.shard_offsets[list(ds.shard_names).index(shard)])
    h, w = table.column("grid_h").to_pylist(), table.column("grid_w").to_pylist()
    h[row], w[row] = w[row], h[row]
    table = table.set_column(table.schema.get_field_index("grid_h"), "grid_h", pa.array(h, pa.int32()))
    table = table.set_column(table.schema.get_field_index("grid_w"), "grid_w", pa.array(w, pa.int32()))
    pq.write_table(table, index, compression="zstd")
    # the manifest pins each index's digest: rewritten as a careless tool would, digest included
    data = index.read_bytes()

    def fix(rows):
        for r in rows:
            if r["shard"] == shard:
                r["index_bytes"], r["index_sha256"] = len(data), hashlib.sha256(data).hexdigest()
    rewrite_manifest(dest, rows=fix)
    ds = tokshard.open(str(dest))
    with pytest.raises(ShardError, match="stale or tampered index"):
        list(ds.loader(4, seed=0))
    _, problems = verify(str(dest))
    assert [p.shard for p in problems] == [shard] and "grid" in problems[0].what


def test_verify_passes_a_variable_grid_dataset(datasets):
    for variant in (("parquet", "raw"), ("wds", "raw")):
        ds = tokshard.open(str(datasets[variant]))
        assert verify(str(datasets[variant])) == (ds.num_shards, [])


def test_a_hostile_grid_bound_is_refused(tmp_path, datasets):
    """Grids above the record's max_tokens never size an allocation: a manifest whose token
    counts cannot fit is refused at open, and a shard or index grid above it when read."""
    src = datasets[("parquet", "zstd")]
    square = next(i for i, g in enumerate(tokshard.open(str(src)).grids().tolist()) if g == [8, 8])

    def bound(n):
        dest = tmp_path / str(n)
        shutil.copytree(src, dest)

        def shrink(rec):
            rec["variable_grid"]["max_tokens"] = n
        rewrite_manifest(dest, record=shrink)
        return dest
    with pytest.raises(ManifestError, match="samples of 1..4 tokens"):
        tokshard.open(str(bound(4)))
    ds = tokshard.open(str(bound(63)))     # every shard's total still fits; the 8x8 samples do not
    with pytest.raises(ShardError, match="max_tokens"):
        ds[square]
    with pytest.raises(ShardError, match="max_tokens"):
        ds.grids()


def test_preview_and_report_show_each_sample_on_its_own_grid(tmp_path, datasets):
    from tokshard.pipeline.tools.preview import reconstruct
    from tokshard.pipeline.tools.report import write_report
    ds = tokshard.open(str(datasets[("parquet", "zstd")]))
    out = reconstruct(ds, 4, originals=True)
    for key, orig, recon, score in zip(out["keys"], out["originals"], out["reconstructions"], out["psnr"]):
        i = ds.keys.index(key)
        assert recon.shape == orig.shape == (*(ds.grids()[i] * PATCH), 3) and score > 10
    write_report(str(datasets[("parquet", "zstd")]), str(tmp_path / "r.html"))
    assert "variable grids, at most 64 tokens" in (tmp_path / "r.html").read_text()


def test_a_unit_gathers_images_by_size_into_full_batches_within_its_pixel_bound():
    """Each tokenizer call gets images of one size, full batches where a size has enough; past
    the pool's bytes the largest group goes out early; every sample goes out once."""
    from tokshard.pipeline.convert.stages import _SizePool
    rng = np.random.default_rng(0)
    sizes = [(16, 24), (24, 16), (16, 16), (8, 40)]
    picks = rng.choice(len(sizes), size=200, p=[0.5, 0.3, 0.15, 0.05])
    bound = 30 * 16 * 24 * 3
    pool = _SizePool(batch_size=8, max_bytes=bound)
    out = []
    for i, k in enumerate(picks.tolist()):
        batch = pool.add(("key", i), np.full((*sizes[k], 3), i % 251, np.uint8))
        out += [batch] if batch is not None else []
        assert pool.bytes <= bound + 16 * 24 * 3
    out += list(pool.drain())
    assert sorted(i for b in out for _, i in b.kept) == list(range(200))
    for b in out:
        assert len({im.shape for im in b.images}) == 1 and len(b.kept) == len(b.images) <= 8
        assert [im[0, 0, 0] for im in b.images] == [i % 251 for _, i in b.kept]
    full = sum(len(b.kept) == 8 for b in out)
    assert full >= 200 // 8 - len(sizes) - 4          # nearly every batch full


def test_a_corrupt_payload_names_its_sample(tmp_path, datasets):
    from conftest import break_one_payload
    dest = tmp_path / "c"
    shutil.copytree(datasets[("parquet", "rans-ctx")], dest)
    ds = tokshard.open(str(dest))
    shard = Path(ds.layout.resolve(ds.shard_paths[1]))
    size = break_one_payload(shard, row=3)

    def resize(rows):     # the file still checks: only the codec can catch the payload
        rows[1]["stored_bytes"], rows[1]["sha256"] = size, hashlib.sha256(shard.read_bytes()).hexdigest()
    rewrite_manifest(dest, rows=resize)
    ds = tokshard.open(str(dest))
    with pytest.raises(ShardError, match=f"shard {ds.shard_names[1]}: sample row 3"):
        ds[int(ds.shard_offsets[1]) + 3]
    with pytest.raises(ShardError, match="sample row 3"):
        list(ds.loader(4, seed=0))
