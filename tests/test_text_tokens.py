"""Text tokens at convert time (issue 17): `--text-tokenizer tokenizer.json` turns each
caption into the `text_tokens` column with a real Hugging Face tokenizer trained here on
the captions, stored in both shard formats, counted, identified in the record, and read
back by `ds[i]`, `get` and the map-style view."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from conftest import convert_config

import tokshard
from tokshard.errors import ManifestError, UsageError
from tokshard.jobs.cli import main
from tokshard.pipeline.convert.job import convert
from tokshard.pipeline.format.shards.base import pad_text_tokens
from tokshard.pipeline.sample_data import write_img2dataset_shards
from tokshard.pipeline.tools.report import write_report
from tokshard.pipeline.tools.verify import NOT_REPAIRABLE, repair, verify
from tokshard.tokenizers.text import hf_tokenizers

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("parquet", "wds")


def parquet_captions(keys: list[str]) -> list[str | None]:
    """Captions of every kind: plain, long, accented and emoji, empty, and none at all."""
    out: list[str | None] = []
    for i, key in enumerate(keys):
        if i % 6 == 5:
            out.append(None)
        elif i == 3:
            out.append("")
        elif i % 4 == 1:
            out.append(f"a long caption of {key}: " + " ".join(["the photo shows a scene"] * (i + 2)))
        else:
            out.append(f"{key.replace('_', ' ')}: café crème ☕, n° {i}")
    return out


@pytest.fixture(scope="session")
def sources(tmp_path_factory, photo_jpegs):
    """{"wds": img2dataset tars (the bundled photos' captions), "parquet": a Parquet source of
    the same photos with the captions of `parquet_captions`}; {key: caption} of each."""
    root = tmp_path_factory.mktemp("text-src")
    tars = write_img2dataset_shards(root / "wds", crops_per_photo=0, shard_size=8)[0].parent
    keys = [k for k, _, _ in photo_jpegs]
    captions = parquet_captions(keys)
    (root / "pq").mkdir()
    pq.write_table(pa.table({"key": keys, "jpg": [d for _, d, _ in photo_jpegs], "caption": captions,
                             "label": [lab for _, _, lab in photo_jpegs]}), root / "pq" / "part.parquet")
    return {"wds": (tars, tar_captions(tars)), "parquet": (root / "pq", dict(zip(keys, captions)))}


def tar_captions(folder: Path) -> dict[str, str | None]:
    """{key: caption} of img2dataset tars, read with tarfile: independent of tokshard's readers."""
    out: dict[str, str | None] = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                out.setdefault(key, None)
                if ext == "txt":
                    out[key] = tar.extractfile(m).read().decode()
    return out


def train_bpe(captions, path: Path, vocab_size: int = 300) -> Path:
    """A byte-level-free BPE with [BOS]/[EOS] around every caption, trained on `captions`."""
    hf = hf_tokenizers()
    tok = hf.Tokenizer(hf.models.BPE(unk_token="[UNK]"))
    tok.normalizer = hf.normalizers.NFKC()
    tok.pre_tokenizer = hf.pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(captions), hf.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["[UNK]", "[BOS]", "[EOS]"], show_progress=False))
    tok.post_processor = hf.processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", tok.token_to_id("[BOS]")),
                                                 ("[EOS]", tok.token_to_id("[EOS]"))])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def bpe(tmp_path_factory, sources):
    """A BPE tokenizer.json trained on every caption of both sources."""
    captions = [c for _, caps in sources.values() for c in caps.values() if c]
    return train_bpe(captions, tmp_path_factory.mktemp("bpe") / "bpe-captions" / "tokenizer.json")


def hf_load(path: Path):
    return hf_tokenizers().Tokenizer.from_file(str(path))


def convert_text(src, out, tokenizer_dir, text_tokenizer, **kw):
    return convert(convert_config([src], out, tokenizer_dir, shard_size=7, text_tokenizer=str(text_tokenizer),
                                  **kw), quiet=True)


def check_samples(ds, captions: dict, tok, max_tokens: int) -> int:
    """Every sample's text_tokens are the tokenizer's own ids of its source caption, cut at
    max_tokens; returns how many were cut."""
    assert len(ds) == len(captions)
    cut = 0
    for i in range(len(ds)):
        sample = ds[i]
        caption = captions[sample["key"]]
        got = sample["text_tokens"]
        assert isinstance(got, np.ndarray) and got.dtype == np.int64 and got.ndim == 1
        full = [] if caption is None else tok.encode(caption).ids
        assert got.tolist() == full[:max_tokens], (sample["key"], caption)
        if len(full) <= max_tokens and caption is not None:
            # Nothing lost: the stored ids decode to what the tokenizer decodes the caption's ids to.
            assert tok.decode(got.tolist()) == tok.decode(full)
        cut += len(full) > max_tokens
    return cut


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("source", ["wds", "parquet"])
def test_text_tokens_are_the_tokenizers_own_ids(tmp_path, sources, bpe, tokenizer_dir, fmt, source):
    src, captions = sources[source]
    result = convert_text(src, tmp_path / "out", tokenizer_dir, bpe, format=fmt)
    tok = hf_load(bpe)
    ds = tokshard.open(str(tmp_path / "out"))
    assert check_samples(ds, captions, tok, 512) == 0
    record = result["dataset"]
    no_caption = sum(c is None for c in captions.values())
    assert record["totals"]["no_caption"] == no_caption and (source == "wds") == (no_caption == 0)
    assert record["totals"]["text_tokens"] == sum(len(tok.encode(c).ids) for c in captions.values() if c is not None)
    assert "text_truncated" not in (record.get("dropped_by_reason") or {})
    # get(key) gives what ds[i] gives; the map-style view gives int64 tensors.
    key = ds[4]["key"]
    np.testing.assert_array_equal(ds.get(key)["text_tokens"], ds[4]["text_tokens"])
    item = ds.map_dataset(["text_tokens"])[4]
    assert item["text_tokens"].dtype == torch.int64 and item["text_tokens"].tolist() == ds[4]["text_tokens"].tolist()
    assert verify(str(tmp_path / "out")) == (ds.num_shards, [])


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_stored_encoding_is_readable_without_tokshard(tmp_path, sources, bpe, tokenizer_dir, fmt):
    """Parquet: a list<uint32> column; WebDataset: a KEY.text_tokens.npy member of 1-D
    little-endian uint32 in every sample (empty without a caption), as docs/formats.md says."""
    src, captions = sources["parquet"]
    convert_text(src, tmp_path / "out", tokenizer_dir, bpe, format=fmt)
    tok = hf_load(bpe)
    got = {}
    for shard in sorted((tmp_path / "out" / "shards").iterdir()):
        if fmt == "parquet":
            table = pq.read_table(shard)
            assert table.schema.field("text_tokens").type == pa.list_(pa.uint32())
            got.update(zip(table.column("key").to_pylist(), table.column("text_tokens").to_pylist()))
        else:
            for sample in wds.WebDataset(str(shard), shardshuffle=False):
                arr = np.load(io.BytesIO(sample["text_tokens.npy"]), allow_pickle=False)
                assert arr.dtype == np.dtype("<u4") and arr.ndim == 1
                got[sample["__key__"]] = arr.tolist()
    assert got == {k: [] if c is None else tok.encode(c).ids for k, c in captions.items()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_captions_beyond_max_text_tokens_are_cut_and_counted(tmp_path, sources, bpe, tokenizer_dir, fmt):
    src, captions = sources["parquet"]
    result = convert_text(src, tmp_path / "out", tokenizer_dir, bpe, format=fmt, max_text_tokens=6)
    tok = hf_load(bpe)
    lengths = [len(tok.encode(c).ids) for c in captions.values() if c is not None]
    want = sum(n > 6 for n in lengths)
    assert 0 < want < len(lengths)                        # some cut, some not: both paths taken
    ds = tokshard.open(str(tmp_path / "out"))
    assert check_samples(ds, captions, tok, 6) == want
    record = result["dataset"]
    assert record["dropped_by_reason"]["text_truncated"] == want
    assert record["totals"]["text_tokens"] == sum(min(n, 6) for n in lengths)
    assert record["text_tokenizer"]["max_tokens"] == 6
    # Counted per shard, in each unit's receipt, as the other drops are.
    receipts = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_work" / "units").glob("*.json")]
    per_shard = [item["count"] for r in receipts for item in r["shard"]["dropped_by_reason"]
                 if item["reason"] == "text_truncated"]
    assert sum(per_shard) == want and len(per_shard) > 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_ids_beyond_uint16_round_trip(tmp_path, sources, tokenizer_dir, fmt):
    """Real text vocabularies pass 65,535: ids up to ~2^17 are stored and read back exactly."""
    hf = hf_tokenizers()
    src, captions = sources["wds"]
    words = sorted({w for c in captions.values() if c for w in c.split()})
    vocab = {"[UNK]": 70_000, **{w: 100_000 + 331 * i for i, w in enumerate(words)}}
    tok = hf.Tokenizer(hf.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = hf.pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "wordlevel" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    result = convert_text(src, tmp_path / "out", tokenizer_dir, path, format=fmt)
    ds = tokshard.open(str(tmp_path / "out"))
    check_samples(ds, captions, tok, 512)
    assert max(int(ds[i]["text_tokens"].max()) for i in range(len(ds))) > 65_535
    assert result["dataset"]["text_tokenizer"]["vocab_size"] == max(vocab.values()) + 1
    assert result["dataset"]["text_tokenizer"]["model"] == "WordLevel"


def test_identity_is_in_the_record_and_the_copy_decodes(tmp_path, sources, bpe, tokenizer_dir):
    src, captions = sources["parquet"]
    out = tmp_path / "out"
    result = convert_text(src, out, tokenizer_dir, bpe)
    data = bpe.read_bytes()
    text = result["dataset"]["text_tokenizer"]
    assert text["sha256"] == hashlib.sha256(data).hexdigest()
    assert text["name"] == "bpe-captions/tokenizer.json" and text["model"] == "BPE" and text["dtype"] == "uint32"
    assert text["vocab_size"] == hf_load(bpe).get_vocab_size()
    ds = tokshard.open(str(out))
    assert ds.text_tokenizer == text == ds.record["text_tokenizer"]
    # The dataset keeps the bytes themselves, digested like every dataset file.
    assert (out / text["path"]).read_bytes() == data
    assert ds.record["files"][text["path"]]["sha256"] == text["sha256"]
    job = json.loads((out / "_work" / "job.json").read_text())
    assert job["text_tokenizer_sha256"] == text["sha256"] and "text_tokenizer" not in job["config"]
    assert job["config"]["max_text_tokens"] == 512
    # The report shows it beside the image tokenizer.
    write_report(str(out), str(tmp_path / "report.html"), 2)
    page = (tmp_path / "report.html").read_text()
    assert "text tokenizer" in page and "bpe-captions/tokenizer.json (BPE" in page and text["sha256"][:16] in page
    copy = ds.load_text_tokenizer()
    sample = next(ds[i] for i in range(len(ds)) if captions[ds[i]["key"]])
    assert copy.encode(captions[sample["key"]]).ids == sample["text_tokens"].tolist()
    # A copy that is not the recorded one is refused by readers and reported by verify.
    (out / text["path"]).write_bytes(data.replace(b"[BOS]", b"[SOS]"))
    with pytest.raises(ManifestError, match="text_tokenizer"):
        tokshard.open(str(out)).load_text_tokenizer()
    _, problems = verify(str(out), quick=True)
    assert [(p.path, p.unit) for p in problems] == [(text["path"], NOT_REPAIRABLE)]


def test_datasets_without_a_text_tokenizer_have_no_text_tokens(tmp_path, sources, tokenizer_dir):
    src, _ = sources["wds"]
    result = convert(convert_config([src], tmp_path / "out", tokenizer_dir), quiet=True)
    assert "text_tokenizer" not in result["dataset"] and "text_tokens" not in result["dataset"]["totals"]
    ds = tokshard.open(str(tmp_path / "out"))
    assert ds.text_tokenizer is None and "text_tokens" not in ds[0]
    assert "text_tokens" not in pq.read_schema(next((tmp_path / "out" / "shards").iterdir())).names
    with pytest.raises(UsageError, match="no text tokens"):
        ds.read_shard(0, ["text_tokens"])
    with pytest.raises(UsageError, match="no text tokens"):
        ds.map_dataset(["text_tokens"])
    with pytest.raises(UsageError, match="no text tokens"):
        ds.load_text_tokenizer()


def test_a_bad_text_tokenizer_or_max_fails_before_any_work(tmp_path, sources, tokenizer_dir):
    src, _ = sources["wds"]
    out = tmp_path / "out"
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(UsageError, match=r"--text-tokenizer: .*nowhere/tokenizer.json: cannot read it"):
        convert_text(src, out, tokenizer_dir, missing)
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"model": "not a tokenizer"}')
    with pytest.raises(UsageError, match=r"garbage.json: not a Hugging Face tokenizer.json \(.+\)"):
        convert_text(src, out, tokenizer_dir, garbage)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UsageError, match="binary.json: not a tokenizer.json"):
        convert_text(src, out, tokenizer_dir, binary)
    for bad in (0, -3, True, 2.5):
        with pytest.raises(UsageError, match="--max-text-tokens must be a positive integer"):
            convert(convert_config([src], out, tokenizer_dir, max_text_tokens=bad), quiet=True)
    assert not out.exists()                 # refused before the destination was touched


def test_resume_with_another_text_tokenizer_is_refused(tmp_path, sources, bpe, tokenizer_dir):
    src, captions = sources["wds"]
    out = tmp_path / "out"
    first = convert_text(src, out, tokenizer_dir, bpe, format="wds")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "timings.parquet"}
    other = train_bpe([c for c in captions.values() if c], tmp_path / "other" / "tokenizer.json", vocab_size=80)
    with pytest.raises(UsageError, match="different|text tokenizer") as e:
        convert_text(src, out, tokenizer_dir, other, format="wds")
    assert first["dataset"]["text_tokenizer"]["sha256"][:12] in str(e.value)
    with pytest.raises(UsageError, match="no --text-tokenizer"):
        convert(convert_config([src], out, tokenizer_dir, shard_size=7, format="wds"), quiet=True)
    # The same tokenizer from another place is the same job: every unit is reused.
    moved = tmp_path / "moved" / "tokenizer.json"
    moved.parent.mkdir()
    moved.write_bytes(bpe.read_bytes())
    again = convert_text(src, out, tokenizer_dir, moved, format="wds")
    assert again["units_reused"] == first["dataset"]["shards"]
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "timings.parquet"
             and p.name != "manifest.parquet" and "_work" not in p.parts}
    assert after == {p: b for p, b in before.items() if p in after}


def test_repair_rebuilds_a_shard_with_its_text_tokens(tmp_path, sources, bpe, tokenizer_dir):
    src, _ = sources["parquet"]
    out = tmp_path / "out"
    convert_text(src, out, tokenizer_dir, bpe, max_text_tokens=6)
    manifest = (out / "manifest.parquet").read_bytes()
    victim = sorted((out / "shards").iterdir())[1]
    data = victim.read_bytes()
    victim.unlink()
    _, problems = verify(str(out))
    repair(str(out), problems)
    assert victim.read_bytes() == data and (out / "manifest.parquet").read_bytes() == manifest


def test_convert_through_the_cli(tmp_path, sources, bpe, tokenizer_dir, capsys):
    src, captions = sources["parquet"]
    out = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(out), "--tokenizer-opt", f"path={tokenizer_dir}",
                 "--format", "wds", "--text-tokenizer", str(bpe), "--max-text-tokens", "5", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "text_truncated=" in printed and "without a caption" in printed
    ds = tokshard.open(str(out))
    cut = check_samples(ds, captions, hf_load(bpe), 5)
    assert f"text_truncated={cut}" in printed
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "bpe-captions/tokenizer.json (BPE" in info and hashlib.sha256(bpe.read_bytes()).hexdigest()[:16] in info
    # Bad values are one line and exit 2, before any work.
    for argv, message in ((["--text-tokenizer", str(bpe), "--max-text-tokens", "0"], "positive integer"),
                          (["--max-text-tokens", "4"], "goes with --text-tokenizer"),
                          (["--text-tokenizer", str(tmp_path / "none.json")], "none.json: cannot read it")):
        assert main(["convert", str(src), "--out", str(tmp_path / "o2"), *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_pad_text_tokens_makes_one_matrix():
    ids = np.empty(3, object)
    ids[:] = [np.array([5, 70_000], np.uint32), np.empty(0, np.uint32), np.array([1, 2, 3], np.uint32)]
    padded, lengths = pad_text_tokens(ids)
    assert padded.dtype == np.int64 and padded.tolist() == [[5, 70_000, -1], [-1, -1, -1], [1, 2, 3]]
    assert lengths.tolist() == [2, 0, 3]
    assert pad_text_tokens([])[0].shape == (0, 0)


def test_hugging_face_tokenizers_is_found_past_the_checkouts_own_folder():
    """From the repository root, `import tokenizers` finds tokshard's own tokenizers/ folder;
    hf_tokenizers() finds Hugging Face's all the same."""
    code = ("import tokenizers, sys; shadowed = not hasattr(tokenizers, 'Tokenizer'); "
            "from tokshard.tokenizers.text import hf_tokenizers; hf = hf_tokenizers(); "
            "print(shadowed, hasattr(hf, 'Tokenizer'), hf.models.BPE.__name__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "BPE"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_loader_delivers_text_tokens_on_every_rank_and_worker(tmp_path, sources, bpe, tokenizer_dir, fmt):
    """`columns=["text_tokens"]`: a (B, longest) int64 tensor, each row the sample's ids then
    -1s, the same from both shard formats, in the main process and through a worker; a mixture
    delivers them when its streams share the text tokenizer, and names the problem otherwise."""
    src, captions = sources["parquet"]
    convert_text(src, tmp_path / "out", tokenizer_dir, bpe, format=fmt)
    ds = tokshard.open(str(tmp_path / "out"))
    tok = hf_load(bpe)
    seen: dict[str, list[int]] = {}
    for rank in range(2):
        loader = ds.loader(5, rank=rank, world_size=2, seed=1, shuffle_buffer=4, columns=["text_tokens"],
                           num_workers=rank)       # rank 1 through a DataLoader worker process
        for batch in loader:
            t = batch["text_tokens"]
            assert t.dtype == torch.int64 and t.ndim == 2 and t.shape[0] == len(batch["key"])
            for key, row, pad in zip(batch["key"], t.tolist(), batch["pad"].tolist()):
                ids = [x for x in row if x >= 0]
                assert row == ids + [-1] * (len(row) - len(ids))
                if not pad:
                    assert key not in seen
                    seen[key] = ids
    assert set(seen) == set(captions)
    for key, ids in seen.items():
        assert ids == ([] if captions[key] is None else tok.encode(captions[key]).ids[:512]), key

    twice = tokshard.mix([ds, ds])
    for batch in twice.loader(4, seed=2, columns=["text_tokens"]):
        for key, row in zip(batch["key"], batch["text_tokens"].tolist()):
            assert [x for x in row if x >= 0] == seen[key]
    convert(convert_config([src], tmp_path / "plain", tokenizer_dir, shard_size=7, format=fmt), quiet=True)
    plain = tokshard.open(str(tmp_path / "plain"))
    for without in (plain, tokshard.mix([ds, plain])):
        with pytest.raises(UsageError, match="column 'text_tokens': this dataset has no text tokens"):
            without.loader(4, columns=["text_tokens"])
