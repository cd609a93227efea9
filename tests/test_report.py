"""tokshard report: a static page, rendered in headless Chromium and checked; it reads no
source a dataset's job spec names unless the user asks (docs/security.md)."""

import math
import os
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser

import numpy as np
from conftest import convert_config
from PIL import Image
from test_preview import Opened, hostile_job_spec, opened_outside

import tokshard
from tokshard.jobs.cli import main
from tokshard.pipeline.convert.job import convert
from tokshard.pipeline.tools.preview import ORIGINALS_HINT, reconstruct
from tokshard.pipeline.tools.report import token_counts, write_report

CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(tmp_path, *args):
    exe = shutil.which("chromium")
    assert exe, "Debian's chromium is needed (make test installs it)"
    return subprocess.run([exe, *CHROMIUM, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


class Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.found = []

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))


def test_report_renders_in_chromium(tmp_path, photo_folder, tokenizer_dir, capsys):
    dest = tmp_path / "ds"
    (photo_folder / "notes.pdf").write_bytes(b"%PDF-1.4")          # one counted skip
    convert(convert_config([photo_folder], dest, tokenizer_dir, shard_size=7), quiet=True)
    out = tmp_path / "report.html"
    assert main(["report", str(dest), "--out", str(out), "-n", "4", "--originals"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"report: {out}"
    assert captured.err == f"tokshard: reading originals from the sources the dataset's job spec names: " \
                           f"{photo_folder}\n"

    # The DOM as Chromium built it (not the file as written): the charts and the preview are there.
    dom = chromium(tmp_path, "--dump-dom", out.as_uri())
    assert dom.returncode == 0, dom.stderr
    parser = Elements()
    parser.feed(dom.stdout)
    charts = [a.get("aria-label") for t, a in parser.found if t == "svg"]
    ds = tokshard.open(dest)
    labels = Counter(int(label) for _, _, _, label in ds)
    assert charts == ["bytes per sample", "code frequency, rank vs count",
                      next(c for c in charts if c.startswith("samples per shard")),
                      f"samples per label (top {len(labels)} of {len(labels)})", "skipped by reason"]
    used = int((token_counts(ds) > 0).sum())
    points = re.search(r'<polyline class="line" points="([^"]+)"', dom.stdout).group(1).split()
    assert len(points) == used > 1
    assert len([1 for t, a in parser.found if t == "rect" and a.get("class") == "bar"]) == \
        4 + ds.num_shards + len(labels) + 1
    top = max(labels.values())
    assert f"{top:,.1f}</text>" in dom.stdout.split('aria-label="samples per label')[1].split("</svg>")[0]
    assert "not_an_image" in dom.stdout and "mean PSNR" in dom.stdout
    assert any(t == "img" and a.get("src", "").startswith("data:image/png;base64,") for t, a in parser.found)

    # The picture: the preview grid is drawn (not a broken image) and the charts have colour.
    shot = tmp_path / "shot.png"
    r = chromium(tmp_path, f"--screenshot={shot}", "--window-size=900,2600", out.as_uri())
    assert r.returncode == 0 and shot.exists(), r.stderr
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    bar_blue = (np.abs(pixels - (0x4a, 0x7b, 0xd0)).sum(-1) < 30).sum()
    line_red = (np.abs(pixels - (0xd0, 0x4a, 0x4a)).sum(-1) < 30).sum()
    assert bar_blue > 2000 and line_red > 200
    # Colourful pixels that are not chart colours come from the photos in the preview grid
    # (text is black on white; a broken image draws nothing).
    chroma = pixels.max(-1) - pixels.min(-1)
    chart = (np.abs(pixels - (0x4a, 0x7b, 0xd0)).sum(-1) < 60) | (np.abs(pixels - (0xd0, 0x4a, 0x4a)).sum(-1) < 60)
    assert ((chroma > 60) & ~chart).sum() > 5000


def test_report_reads_no_source_unless_asked(tmp_path, photo_folder, tokenizer_dir, capsys):
    """The job spec names the user's private files: the default report opens nothing outside
    the dataset root (reconstructions only, and how to get originals); with consent, or with
    the user's own sources, the originals and PSNR are there."""
    dest = tmp_path / "ds"
    convert(convert_config([photo_folder], dest, tokenizer_dir), quiet=True)
    private = tmp_path / "private"
    shutil.copytree(photo_folder, private)
    hostile_job_spec(dest, private)
    out = tmp_path / "report.html"

    with Opened() as opened:
        page = write_report(str(dest), str(out), 4)
        assert main(["report", str(dest), "--out", str(out), "-n", "3"]) == 0
    assert opened_outside(opened, dest, out) == [] and Opened.connects == []
    assert "preview grid" in page and "mean PSNR" not in page and "Reconstructions from the tokens" in page
    assert "reconstructions only: originals not read" in page and "--originals" in page
    captured = capsys.readouterr()
    assert captured.out == f"report: {out}\n" and captured.err == f"tokshard: {ORIGINALS_HINT}\n"

    with Opened() as opened:
        page = write_report(str(dest), str(out), 4, originals=True)
    reads = opened_outside(opened, dest, out)
    assert reads and all(r.startswith(str(private) + os.sep) for r in reads)
    assert "Originals (top)" in page
    mean = float(re.search(r"mean PSNR ([0-9.]+) dB over 4 samples", page).group(1))
    assert math.isfinite(mean) and 8 < mean < 40

    # The user's own copy instead of what the job spec names: the same pictures, the same PSNR.
    shutil.rmtree(private)
    with Opened() as opened:
        again = write_report(str(dest), str(out), 4, originals=[str(photo_folder)])
    reads = opened_outside(opened, dest, out)
    assert reads and all(r.startswith(str(photo_folder) + os.sep) for r in reads)
    assert f"mean PSNR {mean:.2f} dB over 4 samples" in again
    assert main(["report", str(dest), "--out", str(out), "-n", "4", "--sources", str(photo_folder)]) == 0
    assert capsys.readouterr().err == "" and f"mean PSNR {mean:.2f} dB" in out.read_text()
    assert reconstruct(tokshard.open(dest), 4, originals=True)["psnr"] == [None] * 4    # the job spec's are gone


def test_report_shows_dropped_parts_and_ignored_inputs(tmp_path):
    """The 1.4 counts (parts of kept samples dropped, input files no reader took) have their
    sections, with their reasons; a dataset without them says none."""
    from pathlib import Path

    from conftest import rewrite_manifest
    ds = tmp_path / "ds"
    shutil.copytree(Path(__file__).parent / "golden" / "datasets" / "parquet-rans", ds)
    write_report(str(ds), str(tmp_path / "before.html"), 2)
    before = (tmp_path / "before.html").read_text()
    assert '<h2 id="dropped">Parts of kept samples dropped</h2><p>none</p>' in before
    assert '<h2 id="ignored">Input files not read</h2><p>none</p>' in before
    rewrite_manifest(ds, record=lambda r: r.update(dropped_by_reason={"link_member": 2, "nonfinite_number": 5},
                                                   ignored_inputs={"unknown_file": 1}))
    write_report(str(ds), str(tmp_path / "after.html"), 2)
    after = (tmp_path / "after.html").read_text()
    dropped = after.split('<h2 id="dropped">')[1].split("<h2")[0]
    assert "nonfinite_number" in dropped and "link_member" in dropped
    assert dropped.index("nonfinite_number") < dropped.index("link_member")    # largest first
    assert "unknown_file" in after.split('<h2 id="ignored">')[1].split("<h2")[0]
