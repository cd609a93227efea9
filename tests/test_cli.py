"""The command line: the demo works, bad arguments are one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tokshard.jobs.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "tokshard", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args", [
    ["convert", "--out", "x"],                       # no source
    ["convert", "src", "--out", "x", "--format", "zip"],
    ["bogus"],
])
def test_bad_arguments_exit_2_with_one_line(args):
    p = run(*args)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "error" in p.stderr


def test_missing_source_and_unknown_tokenizer_exit_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "a.jpg").write_bytes(b"")
    assert main(["convert", str(tmp_path), "--out", str(tmp_path / "o"), "--tokenizer", "nope"]) == 2
    assert "unknown tokenizer" in capsys.readouterr().err


def test_convert_and_info_through_cli(tmp_path, photo_tars, tokenizer_dir, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(photo_tars), "--out", str(out), "--format", "wds", "--codec", "bitpack",
                 "--tokenizer-opt", f"path={tokenizer_dir}", "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert "images/s" in summary and "% of source bytes" in summary
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "wds" and info["codec"]["name"] == "bitpack" and info["totals"]["samples"] > 0
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"samples     {info['totals']['samples']:,} in 3 wds shards" in text
    assert "codec       bitpack v1" in text and info["tokenizer"]["codebook_hash"][:16] in text
    assert main(["info", str(tmp_path)]) == 2


def test_readme_demo_command(tmp_path):
    """`tokshard demo` (the README's first command) converts the bundled photos end to end."""
    p = subprocess.run([sys.executable, "-m", "tokshard", "demo", "--out", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "converted" in p.stdout and "% of source bytes" in p.stdout
    assert main(["info", str(tmp_path / "demo" / "tokens")]) == 0


def test_fit_tokenizer_then_convert_with_it(tmp_path, photo_tars, capsys):
    tok = tmp_path / "tok"
    assert main(["fit-tokenizer", str(photo_tars), "--out", str(tok), "--codebook-size", "32",
                 "--patch-size", "8", "--resolution", "32", "--pca-dim", "8", "--iters", "3"]) == 0
    assert "32 codes" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["convert", str(photo_tars), "--out", str(out), "--tokenizer-opt", f"path={tok}",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["grid"] == [4, 4] and info["tokenizer"]["vocab_size"] == 32
    assert (out / "tokenizer" / "model.safetensors").read_bytes() == (tok / "model.safetensors").read_bytes()
    assert main(["fit-tokenizer", str(tmp_path / "nothing"), "--out", str(tok)]) == 2
