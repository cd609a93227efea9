"""tokshard preview: originals beside reconstructions, and PSNR computed right; no
source a dataset's job spec names is read unless the user asks (docs/security.md)."""

import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
from conftest import RES, convert_config
from PIL import Image

import tokshard
import tokshard.pipeline
from tokshard.errors import UsageError
from tokshard.jobs.cli import main
from tokshard.pipeline.convert.decode import DecodeConfig, decode_image
from tokshard.pipeline.convert.default_tokenizer import cache_dir
from tokshard.pipeline.convert.job import convert
from tokshard.pipeline.tools.preview import ORIGINALS_HINT, psnr, reconstruct
from tokshard.tokenizers.kmeans_vq import KMeansVQ


class Opened:
    """Paths opened by this process while active, and the addresses it connected to
    (`Opened.connects`); an audit hook cannot be removed: it is installed once and switched
    on and off, as in test_untrusted.py."""
    active: list[str] | None = None
    connects: list = []

    @classmethod
    def hook(cls, event, args):
        if cls.active is None:
            return
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            cls.active.append(os.fsdecode(args[0]))
        elif event == "socket.connect":
            cls.connects.append(args[1])

    def __enter__(self):
        Opened.active, Opened.connects = [], []
        return Opened.active

    def __exit__(self, *exc):
        Opened.active = None


sys.addaudithook(Opened.hook)


def opened_outside(opened, root, *allowed):
    """The opened paths outside `root`, leaving out Python's and tokshard's own files (modules
    imported lazily), the default tokenizer cache and `allowed` (an output the test asked for)."""
    import tokshard as package
    code = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(cache_dir()),
            os.path.dirname(os.path.dirname(package.__file__)),
            os.path.dirname(os.path.dirname(tokshard.pipeline.__file__))}
    inside = [os.path.realpath(p) for p in (root, *code, *allowed)]
    return sorted({r for r in map(os.path.realpath, opened)
                   if not any(r == d or r.startswith(d + os.sep) for d in inside)})


def hostile_job_spec(dest, *sources):
    """Point the dataset's job spec at `sources` (as a crafted dataset may)."""
    spec = dest / "_work" / "job.json"
    job = json.loads(spec.read_text())
    job["config"]["sources"] = [str(s) for s in sources]
    spec.write_text(json.dumps(job))


def test_psnr_values():
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == math.inf
    b = a.copy()
    b[0, 0, 0] = 255                      # MSE = 255^2 / 48
    assert math.isclose(psnr(a, b), 10 * math.log10(48))


def test_preview_compares_tokens_with_the_decoded_sources(tmp_path, photo_folder, photo_jpegs, tokenizer_dir,
                                                          capsys):
    dest = tmp_path / "ds"
    convert(convert_config([photo_folder], dest, tokenizer_dir), quiet=True)
    result = reconstruct(tokshard.open(dest), n=5, seed=1, originals=True)
    assert result["sources"] == [str(photo_folder)] and result["originals_note"] == ""
    tok = KMeansVQ.load(tokenizer_dir)
    jpegs = {k: d for k, d, _ in photo_jpegs}
    assert len(result["keys"]) == 5 and None not in result["psnr"]
    for key, orig, rec, score in zip(result["keys"], result["originals"], result["reconstructions"], result["psnr"]):
        image = decode_image(jpegs[key.split("/")[-1]], DecodeConfig(resolution=RES)).image
        assert np.array_equal(orig, image)
        assert np.array_equal(rec, tok.decode(tok.encode(image[None]))[0])
        assert math.isclose(score, psnr(image, rec)) and 8 < score < 40

    out = tmp_path / "grid.png"
    assert main(["preview", str(dest), "--out", str(out), "-n", "4", "--originals"]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"tokshard: reading originals from the sources the dataset's job spec names: " \
                           f"{photo_folder}\n"
    lines = captured.out.strip().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("kmeans-vq/1: mean PSNR") and all(" dB" in x for x in lines[:4])
    with Image.open(out) as im:
        assert im.size == (4 * 128, 256)
        top, bottom = np.asarray(im)[:128], np.asarray(im)[128:]
        assert top.std() > 10 and bottom.std() > 10 and not np.array_equal(top, bottom)

    # Sources gone: reconstructions still, and it says so.
    shutil.rmtree(photo_folder)
    assert main(["preview", str(dest), "--out", str(out), "-n", "2", "--originals"]) == 0
    captured = capsys.readouterr()
    assert "reconstructions only" in captured.out and "originals not reachable" in captured.err
    assert main(["preview", str(dest), "--out", str(out), "-n", "0"]) == 2


def test_preview_reads_no_source_unless_asked(tmp_path, photo_folder, tokenizer_dir, capsys):
    """A dataset's job spec may name any file or URL: by default preview reads none of them
    (nor anything else outside the dataset root) and connects nowhere."""
    dest = tmp_path / "ds"
    convert(convert_config([photo_folder], dest, tokenizer_dir), quiet=True)
    private = tmp_path / "private"                     # the user's own files, elsewhere on the machine
    shutil.copytree(photo_folder, private)
    shutil.rmtree(photo_folder)
    hostile_job_spec(dest, private)
    out = tmp_path / "grid.png"

    with Opened() as opened:
        result = reconstruct(tokshard.open(dest), n=4, seed=0)
        assert main(["preview", str(dest), "--out", str(out), "-n", "3"]) == 0
    assert opened_outside(opened, dest, out) == [] and Opened.connects == []
    assert result["originals"] == [None] * 4 and result["psnr"] == [None] * 4 and result["sources"] == []
    assert result["originals_note"] == ORIGINALS_HINT and len(result["reconstructions"]) == 4
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert [x.split("\t")[1] for x in lines[:3]] == ["no original"] * 3
    assert lines[3] == f"kmeans-vq/1: reconstructions only -> {out}"
    assert captured.err == f"tokshard: {ORIGINALS_HINT}\n" and "--originals" in captured.err
    with Image.open(out) as im:
        assert im.size == (3 * 128, 128)                  # one row: reconstructions only

    # With consent the job spec's sources are read, and named first.
    with Opened() as opened:
        assert main(["preview", str(dest), "--out", str(out), "-n", "3", "--originals"]) == 0
    reads = opened_outside(opened, dest, out)
    assert reads and all(r.startswith(str(private) + os.sep) for r in reads)
    captured = capsys.readouterr()
    assert captured.err == f"tokshard: reading originals from the sources the dataset's job spec names: {private}\n"
    assert "mean PSNR" in captured.out

    # URLs: not contacted by default; with consent, named, tried, and the failure said.
    hostile_job_spec(dest, "http://127.0.0.1:9/x.tar", "s3://someone-else/x.tar")
    with Opened() as opened:
        result = reconstruct(tokshard.open(dest), n=2)
    assert opened_outside(opened, dest) == [] and Opened.connects == [] and result["psnr"] == [None, None]
    with Opened() as opened:
        assert main(["preview", str(dest), "--out", str(out), "-n", "2", "--originals"]) == 0
    assert ("127.0.0.1", 9) in Opened.connects
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("tokshard: reading originals from the sources the dataset's job spec names: "
                      "http://127.0.0.1:9/x.tar, s3://someone-else/x.tar")
    assert "originals not reachable" in err[1] and "127.0.0.1:9" in err[1]


def test_preview_reads_the_sources_the_user_names(tmp_path, photo_folder, photo_jpegs, tokenizer_dir, capsys):
    dest = tmp_path / "ds"
    convert(convert_config([photo_folder], dest, tokenizer_dir, shard_size=7), quiet=True)
    copy = tmp_path / "my-copy"
    shutil.copytree(photo_folder, copy)
    hostile_job_spec(dest, tmp_path / "elsewhere")     # what the job spec names is not read

    with Opened() as opened:
        result = reconstruct(tokshard.open(dest), n=6, seed=2, originals=[str(copy)])
    reads = opened_outside(opened, dest)
    assert reads and all(r.startswith(str(copy) + os.sep) for r in reads)
    assert result["sources"] == [str(copy)] and result["originals_note"] == ""
    jpegs = {k: d for k, d, _ in photo_jpegs}
    for key, orig, rec, score in zip(result["keys"], result["originals"], result["reconstructions"], result["psnr"]):
        image = decode_image(jpegs[key.split("/")[-1]], DecodeConfig(resolution=RES)).image
        assert np.array_equal(orig, image) and math.isfinite(score) and math.isclose(score, psnr(image, rec))

    # The job spec's own sources are gone: with consent, reconstructions only, and why.
    result = reconstruct(tokshard.open(dest), n=2, originals=True)
    assert result["psnr"] == [None, None] and "not reachable" in result["originals_note"]

    out = tmp_path / "grid.png"
    assert main(["preview", str(dest), "--out", str(out), "-n", "2", "--sources", str(copy)]) == 0
    captured = capsys.readouterr()
    assert "mean PSNR" in captured.out and captured.err == ""
    with Image.open(out) as im:
        assert im.size == (2 * 128, 256)
    with pytest.raises(SystemExit) as e:
        main(["preview", str(dest), "--out", str(out), "--originals", "--sources", str(copy)])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["folder", [], [""], [1], None])
def test_originals_must_be_a_flag_or_a_list(tmp_path, photo_folder, tokenizer_dir, bad):
    dest = tmp_path / "ds"
    convert(convert_config([photo_folder], dest, tokenizer_dir), quiet=True)
    with pytest.raises(UsageError, match="originals must be"):
        reconstruct(tokshard.open(dest), n=1, originals=bad)


def test_a_job_spec_of_the_wrong_shape_is_said_not_followed(tmp_path, photo_folder, tokenizer_dir):
    dest = tmp_path / "ds"
    convert(convert_config([photo_folder], dest, tokenizer_dir), quiet=True)
    spec = dest / "_work" / "job.json"
    job = json.loads(spec.read_text())
    job["config"]["columns"] = {"storage_options": "x"}
    spec.write_text(json.dumps(job))
    result = reconstruct(tokshard.open(dest), n=2, originals=True)
    assert result["psnr"] == [None, None] and "config.columns" in result["originals_note"]
    spec.unlink()
    result = reconstruct(tokshard.open(dest), n=2, originals=[str(photo_folder)])
    assert result["psnr"] == [None, None] and "no job spec" in result["originals_note"]
