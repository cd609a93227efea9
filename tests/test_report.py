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


class LabelChart(HTMLParser):
    """The texts of the label chart's <text> elements (what they show, entities decoded),
    their <title> tooltips, and the chart's width."""
    def __init__(self):
        super().__init__()
        self.texts, self.titles, self.width, self._in, self._at = [], [], None, False, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg":
            self._in = (attrs.get("aria-label") or "").startswith("samples per label")
            self.width = int(attrs["width"]) if self._in else self.width
        elif self._in and tag in ("text", "title"):
            self._at = tag
            (self.texts if tag == "text" else self.titles).append("")

    def handle_endtag(self, tag):
        self._in = self._in and tag != "svg"
        self._at = "text" if tag == "title" and self._in else None

    def handle_data(self, data):
        if self._at:
            (self.texts if self._at == "text" else self.titles)[-1] += data


def label_chart(page: str) -> LabelChart:
    chart = LabelChart()
    chart.feed(page)
    return chart


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
    # Without class names the label chart shows the integers (no names, no tooltips).
    chart = label_chart(dom.stdout)
    assert chart.width == 640 and chart.titles == [] and ds.class_names is None
    assert {int(t) for t in chart.texts[1::2]} == set(labels)
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


def _hf_parquet(path, photo_jpegs, fine, coarse, fine_names, coarse_names):
    """A Hugging Face `datasets` Parquet file (written by `datasets` itself) with two
    ClassLabel columns, as CIFAR-100 has (`fine_label`, `coarse_label`)."""
    import datasets
    from datasets import ClassLabel, Features, Image
    features = Features({"image": Image(), "fine_label": ClassLabel(names=fine_names),
                         "coarse_label": ClassLabel(names=coarse_names)})
    images = [{"bytes": data, "path": None} for _, data, _ in photo_jpegs[:len(fine)]]
    datasets.Dataset.from_dict({"image": images, "fine_label": fine, "coarse_label": coarse},
                               features=features).to_parquet(str(path))
    return path


def test_report_names_the_labels_with_their_class_names(tmp_path, photo_jpegs, tokenizer_dir):
    """Labels from a ClassLabel column are shown with their names (`1 · dog`), from the
    column convert took them from; the names are the dataset's (anyone's): escaped, shown as
    text, without controls or bidi overrides, cut to CLASS_NAME_CHARS; a label the names do
    not cover is its integer."""
    from conftest import rewrite_manifest

    from tokshard.pipeline.tools.report import CLASS_NAME_CHARS
    hostile = "<script>alert(1)</script>"
    fine = ["cat", hostile, "x" * 100, "\u202egod\nline", "emu"]
    coarse = ["animal", "thing"]
    src = _hf_parquet(tmp_path / "train.parquet", photo_jpegs, [0, 1, 1, 2, 3, 4], [0, 1, 0, 1, 0, 1], fine, coarse)
    dest = tmp_path / "ds"
    convert(convert_config([src], dest, tokenizer_dir, columns={"label_column": "fine_label"}), quiet=True)
    assert tokshard.open(dest).class_names == {"coarse_label": coarse, "fine_label": fine}
    out = tmp_path / "report.html"
    page = write_report(str(dest), str(out), 2)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page

    # As Chromium built the page: the hostile name is text, not an element.
    dom = chromium(tmp_path, "--dump-dom", out.as_uri())
    assert dom.returncode == 0, dom.stderr
    parser = Elements()
    parser.feed(dom.stdout)
    assert not any(t == "script" for t, _ in parser.found)
    chart = label_chart(dom.stdout)
    cut = "x" * (CLASS_NAME_CHARS - 1) + "\u2026"
    shown = [f"1 \u00b7 {hostile}", "0 \u00b7 cat", f"2 \u00b7 {cut}", "3 \u00b7 \ufffdgod\ufffdline", "4 \u00b7 emu"]
    assert chart.texts[1::2] == shown and chart.titles == shown     # largest first, then by label
    assert chart.width > 640                                         # wide enough for the long name

    # A label past the names is its integer; names for no known label column: integers only.
    rewrite_manifest(dest, record=lambda r: r["class_names"].update(fine_label=fine[:3]))
    chart = label_chart(write_report(str(dest), str(out), 0))
    assert chart.texts[1::2] == shown[:3] + ["3", "4"]
    rewrite_manifest(dest, record=lambda r: r.update(class_names={"coarse_label": coarse, "other": fine}))
    chart = label_chart(write_report(str(dest), str(out), 0))
    assert chart.texts[1::2] == ["1", "0", "2", "3", "4"] and chart.titles == [] and chart.width == 640
