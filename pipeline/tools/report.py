"""`tokshard report DEST --out report.html`: one static page about a dataset.

Self-contained (inline SVG charts, the preview grid as an embedded PNG), so it
can be mailed or dropped into a bucket. Sections: summary, storage per image
(source JPEG bytes vs raw / coded / stored token bytes), token frequency
(rank vs count, log-log: how far from uniform the codes are, which is what
entropy coding exploits), samples per shard, samples per label (from the label
table; with their class names when the sources had Hugging Face ClassLabel names),
skips by reason, parts of kept samples dropped and input files not read (by reason),
and reconstructions from the tokens (beside the
originals only when asked: `originals=`, `--originals` / `--sources`; see
`tokshard.pipeline.tools.preview`).
"""

from __future__ import annotations

import base64
import html
import math
import unicodedata
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tokshard.errors import TokshardError
from tokshard.pipeline.tools.preview import PREVIEW_SAMPLES, Originals, check_originals

if TYPE_CHECKING:
    from tokshard.pipeline.stream.dataset import TokenDataset

MAX_FREQUENCY_SHARDS = 64   # token counts from a sample of shards: enough for the curve
TOP_LABELS = 30
CLASS_NAME_CHARS = 60       # a class name (from the dataset: anyone's) is cut to this many characters
# Unicode categories not shown as they are in a class name: controls (newlines, ...), format
# characters (bidi overrides that would reorder the label's integer), separators, lone surrogates.
_HIDDEN = ("Cc", "Cf", "Zl", "Zp", "Cs")
_JOINERS = ("\u200c", "\u200d")   # (format characters that scripts and emoji need)


def _bars(title: str, items: list[tuple[str, float]], unit: str = "", fit_names: bool = False) -> str:
    """A horizontal bar chart as inline SVG. `fit_names`: the name column widens (and the
    chart with it) to hold names longer than its usual 220 px, and each name has itself as
    a tooltip (`<title>`)."""
    width, row, label_w = 640, 22, 220
    if fit_names:
        label_w = max(label_w, 12 + 7 * max((_display_width(name) for name, _ in items), default=0))
        width += label_w - 220
    top = max((v for _, v in items), default=0) or 1
    rows = []
    for i, (name, value) in enumerate(items):
        w = (width - label_w - 90) * value / top
        y = 28 + i * row
        tip = f"<title>{html.escape(name)}</title>" if fit_names else ""
        rows.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{tip}{html.escape(name)}</text>'
                    f'<rect class="bar" x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row - 6}"/>'
                    f'<text x="{label_w + w + 4:.1f}" y="{y + 14}">{value:,.1f}{unit}</text>')
    h = 36 + len(items) * row
    return (f'<svg class="chart" role="img" aria-label="{html.escape(title)}" width="{width}" height="{h}">'
            f'<text class="title" x="0" y="16">{html.escape(title)}</text>{"".join(rows)}</svg>')


def _display_width(text: str) -> int:
    """Columns `text` takes: wide (CJK) characters count two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def class_name(name: str) -> str:
    """A class name as the page shows it (escaped where it is written): characters that are
    not text (controls, bidi overrides, lone surrogates) as U+FFFD, at most
    CLASS_NAME_CHARS characters, cut with an ellipsis."""
    name = "".join("\ufffd" if unicodedata.category(c) in _HIDDEN and c not in _JOINERS else c for c in name)
    return name if len(name) <= CLASS_NAME_CHARS else name[: CLASS_NAME_CHARS - 1] + "\u2026"


def named_labels(items: list[tuple[str, float]], names: Sequence[str] | None) -> list[tuple[str, float]]:
    """Label counts with each label's class name after its integer (`3 · cat`); a label
    outside `names` (or not an integer) as it was."""
    if not names:
        return items
    out = []
    for label, n in items:
        try:
            i = int(label)
        except ValueError:
            i = -1
        out.append((f"{label} \u00b7 {class_name(names[i])}" if 0 <= i < len(names) else label, n))
    return out


def _loglog(title: str, counts: np.ndarray) -> str:
    """Rank (x) vs count (y) of the codes, log-log, as an inline SVG polyline."""
    width, height, pad = 640, 320, 48
    counts = np.sort(counts[counts > 0])[::-1]
    if not len(counts):
        return f"<p>{html.escape(title)}: no tokens</p>"
    xmax, ymax, ymin = math.log10(len(counts)) or 1, math.log10(counts[0]) or 1, 0.0
    pts = []
    for rank, c in enumerate(counts, 1):
        x = pad + (width - 2 * pad) * math.log10(rank) / xmax
        y = height - pad - (height - 2 * pad) * (math.log10(c) - ymin) / (ymax - ymin or 1)
        pts.append(f"{x:.1f},{y:.1f}")
    axes = (f'<line class="axis" x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}"/>'
            f'<line class="axis" x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}"/>'
            f'<text x="{width // 2}" y="{height - 12}" text-anchor="middle">code rank (log, 1..{len(counts)})</text>'
            f'<text x="12" y="{pad - 10}">count (log, max {counts[0]:,})</text>')
    return (f'<svg class="chart" role="img" aria-label="{html.escape(title)}" width="{width}" height="{height}">'
            f'<text class="title" x="0" y="16">{html.escape(title)}</text>{axes}'
            f'<polyline class="line" points="{" ".join(pts)}"/></svg>')


def token_counts(ds: TokenDataset, max_shards: int = MAX_FREQUENCY_SHARDS) -> np.ndarray:
    counts = np.zeros(ds.vocab_size, np.int64)
    step = max(1, ds.num_shards // max_shards)
    for i in range(0, ds.num_shards, step):
        tokens = ds.shard(i)["tokens"]
        if tokens.dtype == object:     # variable grids: one array per sample
            tokens = np.concatenate([t.reshape(-1) for t in tokens]) if len(tokens) else np.zeros(0, np.int64)
        counts += np.bincount(tokens.reshape(-1).astype(np.int64), minlength=ds.vocab_size)[: ds.vocab_size]
    return counts


def label_counts(url: str, storage_options: dict | None = None) -> tuple[list[tuple[str, float]], int]:
    """(the TOP_LABELS most frequent labels with their sample counts, how many labels there are)."""
    from tokshard.pipeline.tools.query import run
    _, rows = run(url, "SELECT label, sum(count) AS n, count(*) OVER () FROM labels GROUP BY label "
                       f"ORDER BY n DESC, label LIMIT {TOP_LABELS}", storage_options)
    return [(str(label), float(n)) for label, n, _ in rows], (rows[0][2] if rows else 0)


def build(ds: TokenDataset, preview: dict | None, preview_png: bytes | None,
          labels: tuple[list[tuple[str, float]], int] = ([], 0), no_preview: str = "") -> str:
    """The page; `no_preview` says why there are no reconstructions (shown instead of the grid)."""
    rec = ds.info
    totals = rec.totals
    n = max(1, int(totals.get("samples", 0)))
    counts = token_counts(ds)
    p = counts[counts > 0] / max(1, counts.sum())
    h0 = float(-(p * np.log2(p)).sum()) if len(p) else 0.0
    summary = [
        ("samples", f"{totals.get('samples', 0):,}"), ("shards", f"{ds.num_shards:,}"),
        ("tokenizer", f"{rec.tokenizer.tokenizer_id} ({ds.vocab_size} codes, grid {list(ds.grid)})"),
        ("sample shape", str(list(ds.sample_shape)) if ds.variable_grid is None else
         f"variable grids, at most {ds.variable_grid['max_tokens']:,} tokens"), ("codec", ds.codec.name),
        ("format", rec.format),
        ("stored", f"{totals.get('stored_bytes', 0):,} B ({totals.get('stored_bytes', 0) / n:,.1f} B/sample)"
         + (f"; {rec.model_cost()}" if rec.codec_state_bytes else "")),
        ("source", f"{totals.get('source_bytes', 0):,} B"),
        ("order-0 entropy", f"{h0:.2f} bits/token (codes used: {int((counts > 0).sum())} of {ds.vocab_size})"),
    ]
    if rec.text_tokenizer is not None:
        summary.insert(3, ("text tokenizer", rec.text_summary()))
    storage = [(k, totals.get(f"{k}_bytes", 0) / n) for k in ("source", "raw", "payload", "stored")]
    sizes = ds.shard_sizes
    shown = [(name, float(s)) for name, s in zip(ds.shard_names, sizes)][:40]
    skips = sorted(rec.skipped_by_reason.items(), key=lambda kv: -kv[1])
    dropped = sorted((rec.dropped_by_reason or {}).items(), key=lambda kv: -kv[1])
    ignored = sorted((rec.ignored_inputs or {}).items(), key=lambda kv: -kv[1])
    names = ds.label_names if labels[0] else None
    parts = [
        "<h2>Summary</h2><table>" + "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary) + "</table>",
        '<h2 id="storage">Storage per sample</h2>' + _bars("bytes per sample", storage, " B"),
        '<h2 id="tokens">Token frequency</h2>' + _loglog("code frequency, rank vs count", counts),
        '<h2 id="shards">Samples per shard</h2>' + _bars(
            f"samples per shard (first {len(shown)} of {ds.num_shards}; min {sizes.min() if len(sizes) else 0}, "
            f"max {sizes.max() if len(sizes) else 0})", shown),
        '<h2 id="labels">Samples per label</h2>' + (_bars(
            f"samples per label (top {len(labels[0])} of {labels[1]})", named_labels(labels[0], names),
            fit_names=bool(names)) if labels[0] else "<p>no labelled samples</p>"),
        '<h2 id="skips">Skipped inputs</h2>' + (_bars("skipped by reason", [(k, float(v)) for k, v in skips])
                                                if skips else "<p>none</p>"),
        # Parts of kept samples left out, and input files no reader took (schema 1.4).
        '<h2 id="dropped">Parts of kept samples dropped</h2>' + (
            _bars("fields stored as null or members ignored, by reason", [(k, float(v)) for k, v in dropped])
            if dropped else "<p>none</p>"),
        '<h2 id="ignored">Input files not read</h2>' + (
            _bars("input files no reader took, by reason", [(k, float(v)) for k, v in ignored])
            if ignored else "<p>none</p>"),
    ]
    if preview_png is None and no_preview:
        parts.append('<h2 id="preview">Reconstructions</h2>'
                     f"<p>not shown: {html.escape(no_preview)}</p>")
    if preview_png is not None:
        assert preview is not None   # the grid is drawn from the preview
        scores = [s for s in preview["psnr"] if s is not None and math.isfinite(s)]
        caption = (f"mean PSNR {sum(scores) / len(scores):.2f} dB over {len(scores)} samples"
                   if scores else "reconstructions only: " + (preview.get("originals_note") or "no original found"))
        heading = ("Originals (top) and reconstructions from the tokens (bottom)"
                   if any(o is not None for o in preview["originals"]) else "Reconstructions from the tokens")
        parts.append(f'<h2 id="preview">{heading}</h2>'
                     f'<img alt="preview grid" src="data:image/png;base64,{base64.b64encode(preview_png).decode()}">'
                     f"<p>{html.escape(caption)}</p>")
    title = f"tokshard report: {ds.url}"
    style = ("body{font:14px system-ui,sans-serif;margin:2em;max-width:60em}th{text-align:left;padding-right:1em}"
             ".bar{fill:#4a7bd0}.line{fill:none;stroke:#d04a4a;stroke-width:2}.axis{stroke:#444}"
             ".title{font-weight:bold}svg text{font-size:12px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>")


def write_report(url: str, out: str, n_preview: int = PREVIEW_SAMPLES, storage_options: dict | None = None,
                 trust_tokenizer_code: bool = False, originals: Originals = False,
                 announce: Callable[[list[str]], None] | None = None) -> str:
    """Write the report page to `out`. Without `trust_tokenizer_code`, a dataset whose
    tokenizer copy runs code when loaded gets every section but the reconstructions.
    `originals` and `announce` as in `preview.reconstruct`: by default no source is read
    and the page shows reconstructions only, saying how to get the originals."""
    import tokshard
    from tokshard.pipeline.tools.preview import grid_png, reconstruct
    originals = check_originals(originals)
    ds = tokshard.open(url, storage_options=storage_options, trust_tokenizer_code=trust_tokenizer_code)
    preview = png = None
    no_preview = ""
    try:
        preview = reconstruct(ds, n_preview, originals=originals, announce=announce)
        png = grid_png(preview)
    except (NotImplementedError, TokshardError) as e:
        # A tokenizer without a decoder or not trusted, a remote dataset, no samples: no grid.
        no_preview = str(e)
    page = build(ds, preview, png, label_counts(url, storage_options), no_preview)
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return page
