"""Byte-identity with datasets written before the package redesign (tests/golden).

The same committed inputs, tokenizer and config must give the same bytes in
every file a dataset holds (run timings aside), a dataset written by that
code must still open, read and verify, and a convert into it must find every
shard committed (its receipts are still understood).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import tokshard

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
import make  # noqa: E402  (the generator: configs, source root, convert call)

pytestmark = pytest.mark.xdist_group("golden")   # one fixed source path: one worker


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != "timings.parquet":
            data = p.read_bytes()
            if rel.startswith("_work/units/"):
                # A receipt also carries the unit's wall times; everything else in it is output.
                receipt = json.loads(data)
                receipt.pop("timings")
                data = json.dumps(receipt, sort_keys=True).encode()
            out[rel] = data
    return out


@pytest.fixture(scope="module")
def sources():
    if make.SOURCE_ROOT.exists():
        shutil.rmtree(make.SOURCE_ROOT)
    shutil.copytree(GOLDEN / "source", make.SOURCE_ROOT)
    yield make.SOURCE_ROOT
    shutil.rmtree(make.SOURCE_ROOT, ignore_errors=True)


@pytest.mark.parametrize("name", sorted(make.CONFIGS))
def test_convert_is_byte_identical_to_the_golden_dataset(name, sources, tmp_path):
    out = tmp_path / name
    make.convert_golden(name, out, GOLDEN / "tokenizer")
    want, got = _files(GOLDEN / "datasets" / name), _files(out)
    assert sorted(got) == sorted(want)
    differ = [rel for rel in want if got[rel] != want[rel]]
    assert not differ, f"files differ from the golden dataset: {differ}"


@pytest.mark.parametrize("name", sorted(make.CONFIGS))
def test_golden_dataset_opens_reads_and_resumes(name, sources, tmp_path):
    from tokshard.pipeline.tools.verify import verify
    old = tmp_path / "old"
    shutil.copytree(GOLDEN / "datasets" / name, old)
    ds = tokshard.open(str(old))
    assert len(ds) == int(ds.record["totals"]["samples"]) > 0
    samples = list(ds)
    assert [s[0] for s in samples] == list(range(len(ds)))
    tokens = np.stack([s[2] for s in samples])
    assert tokens.shape == (len(ds), *ds.sample_shape) and tokens.max() < ds.vocab_size
    assert verify(str(old)) == (ds.num_shards, [])
    before = _files(old)
    result = make.convert_golden(name, old, GOLDEN / "tokenizer")
    assert result["units_reused"] == ds.num_shards
    assert _files(old) == before
