"""`tokshard preview`: what the stored tokens look like, next to what went in.

Reconstructions come from the stored tokens through the dataset's own tokenizer
copy. Originals are shown only when the user asks (`originals=`, `--originals`,
`--sources`): a dataset may come from anyone, and its job spec (`_work/job.json`)
can name any local file or URL, so nothing it names is read by default. When
asked, the sources (the job spec's, or the user's own copy of them) are planned
exactly as the convert job planned them (same shard size, input format and
columns, so unit indices match) and decoded as it decoded them, so the
comparison is against the tokenizer's actual input. PSNR is measured on those
pairs.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tokshard.errors import ManifestError, SkipSample, TokshardError, UsageError
from tokshard.pipeline.convert.decode import DecodeConfig, decode_image
from tokshard.pipeline.convert.sources import read_unit
from tokshard.pipeline.convert.sources.plan import plan_sources
from tokshard.pipeline.format.layout import JOB_SPEC
from tokshard.pipeline.format.work import read_job_spec

if TYPE_CHECKING:
    from tokshard.pipeline.stream.dataset import TokenDataset

# What `originals=` takes: False (read nothing), True (read the sources the dataset's job
# spec names: the user's consent), or the user's own list of source URLs / paths.
Originals = bool | Sequence[str]

# Said wherever originals are missing because they were not asked for.
ORIGINALS_HINT = ("originals not read (a dataset's job spec may name any file or URL, so nothing it names is read "
                  "unless you ask): --originals reads the sources its job spec names, --sources URL ... reads your "
                  "own copy (Python: originals=True or originals=[...])")

# The CLI's --originals / --sources (preview and report).
ORIGINALS_HELP = ("also show the originals: re-read the sources the dataset's job spec names (any local file or "
                  "URL, read with your credentials and network: only for a dataset you trust)")
SOURCES_HELP = ("also show the originals, read from these sources instead (your own copy of the dataset's "
                "sources), planned as the convert job planned its own")

_COLUMNS = ("image_column", "caption_column", "label_column", "key_column")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def check_originals(originals: Any) -> Originals:
    """`originals` if it is False, True or a non-empty list of source strings; else a UsageError."""
    if isinstance(originals, bool):
        return originals
    if isinstance(originals, str) or not isinstance(originals, Sequence) or not originals \
            or not all(isinstance(s, str) and s for s in originals):
        raise UsageError(f"originals must be False, True or a non-empty list of source URLs/paths, "
                         f"got {originals!r}")
    return list(originals)


@dataclass(frozen=True)
class SourcePlan:
    """How the convert job planned its sources (from its job spec, checked field by field)."""
    sources: list[str]
    shard_size: int
    input_format: str
    columns: dict[str, str | None]
    split: str | None = None


def job_plan(ds: TokenDataset) -> SourcePlan:
    """The job spec's sources and planning parameters; a ManifestError naming the field when
    the dataset has no job spec or one of the wrong shape (it may come from anyone)."""
    found = read_job_spec(ds.layout)
    if found is None:
        raise ManifestError(f"the dataset has no job spec ({JOB_SPEC}), so its sources and units are unknown")
    job = found[0].config

    def bad(name: str, want: str) -> ManifestError:
        return ManifestError(f"{JOB_SPEC} config.{name} must be {want}, got {job.get(name)!r}"[:300])

    sources = job.get("sources")
    if not isinstance(sources, list) or not all(isinstance(s, str) and s for s in sources):
        raise bad("sources", "a list of URLs/paths")
    shard_size = job.get("shard_size")
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise bad("shard_size", "a positive integer")
    input_format = job.get("input_format", "auto")
    if not isinstance(input_format, str):
        raise bad("input_format", "a string")
    columns = job.get("columns") or {}
    if not isinstance(columns, dict) or not all(k in _COLUMNS and (v is None or isinstance(v, str))
                                                for k, v in columns.items()):
        raise bad("columns", f"a mapping of {', '.join(_COLUMNS)} to column names")
    split = job.get("split")
    if split is not None and not isinstance(split, str):
        raise bad("split", "a split name")
    return SourcePlan(list(sources), shard_size, input_format, dict(columns), split)


def announce_sources(sources: list[str]) -> None:
    """The CLI's `announce`: one line on stderr naming the job spec's sources about to be read."""
    print(f"tokshard: reading originals from the sources the dataset's job spec names: {', '.join(sources)}",
          file=sys.stderr)


def _originals(ds: TokenDataset, wanted: dict[int, list[str]], side: int, originals: Originals,
               announce: Callable[[list[str]], None] | None) -> tuple[dict[str, np.ndarray], list[str], str]:
    """(decoded source images for {unit index: [keys]} as the convert job saw them, the sources
    read, why there are none: "" when the sources were read)."""
    if originals is False:
        return {}, [], ORIGINALS_HINT
    try:
        plan = job_plan(ds)
    except (TokshardError, OSError) as e:     # no job spec, or one of the wrong shape: said, not followed
        return {}, [], f"originals not read: {e}"
    sources = plan.sources if originals is True else list(originals)
    if originals is True and announce is not None:
        announce(sources)
    decode = DecodeConfig(**ds.info.decode)
    out: dict[str, np.ndarray] = {}
    try:
        units = {u.index: u for u in plan_sources(sources, plan.shard_size, plan.input_format, ds.storage_options,
                                                  split=plan.split,
                                                  image_column=plan.columns.get("image_column")).units}
        for index, unit_keys in wanted.items():
            unit, keys = units.get(index), set(unit_keys)
            if unit is None:
                continue
            for rec in read_unit(unit, ds.storage_options, **plan.columns):
                if rec.key in keys and rec.image is not None:
                    try:
                        image = decode_image(rec.image, decode).image
                    except SkipSample:
                        continue
                    if image.shape[0] != side and decode.resize_mode != "area":  # multi-view: show the centre
                        o = (image.shape[0] - side) // 2
                        image = image[o:o + side, o:o + side]
                    out[rec.key] = image
    except (TokshardError, OSError) as e:  # the sources moved or are gone: reconstructions (and what was read)
        return out, sources, f"originals not reachable (sources moved?): {e}"
    return out, sources, ""


# Samples in a preview grid unless asked otherwise (preview and report).
PREVIEW_SAMPLES = 8


def reconstruct(ds: TokenDataset, n: int = PREVIEW_SAMPLES, seed: int = 0, originals: Originals = False,
                announce: Callable[[list[str]], None] | None = None) -> dict:
    """n samples (seeded pick): keys, originals (or None), reconstructions, PSNRs (or None).

    `originals`: False (default) reads no source, True reads the sources the dataset's job
    spec names (consent: they may be anywhere), a list reads those sources instead, planned
    as the job planned its own. `announce` is called with the job spec's sources just before
    they are read. The result's `sources` lists the sources read and `originals_note` says
    why originals are missing ("" when the sources were read)."""
    originals = check_originals(originals)
    tok = ds.tokenizer()
    rng = np.random.default_rng(seed)
    ids = sorted(rng.choice(len(ds), size=min(n, len(ds)), replace=False).tolist())
    shard_of = np.searchsorted(ds.shard_offsets, ids, side="right") - 1
    keys: list[str] = []
    codes: list[np.ndarray] = []
    units: dict[int, list[str]] = {}
    unit_of_shard = dict(zip(ds.shard_names, ds.manifest.column("unit").to_pylist()))
    for k in sorted(set(shard_of.tolist())):
        shard = ds.shard(k)
        for i in np.asarray(ids)[shard_of == k]:
            row = int(i - ds.shard_offsets[k])
            keys.append(shard["key"][row])
            tokens = shard["tokens"][row]
            codes.append(tokens[0] if len(ds.views) > 1 else tokens)
            units.setdefault(unit_of_shard[ds.shard_names[k]], []).append(shard["key"][row])
    recon: list[np.ndarray] | np.ndarray
    if ds.variable_grid is not None:    # each sample its own grid: decoded one by one
        recon = [tok.decode(c[None])[0] for c in codes]
    else:
        recon = tok.decode(np.stack(codes)) if codes else np.empty((0, tok.resolution, tok.resolution, 3), np.uint8)
    found, sources, note = _originals(ds, units, tok.resolution, originals, announce)
    pairs = [(found.get(k), r) for k, r in zip(keys, recon)]
    scores = [psnr(o, r) if o is not None else None for o, r in pairs]
    return {"keys": keys, "originals": [o for o, _ in pairs], "reconstructions": list(recon), "psnr": scores,
            "tokenizer": ds.info.tokenizer.tokenizer_id, "sources": sources, "originals_note": note}


def grid_png(result: dict, tile: int = 128) -> bytes:
    """Originals (top row) above reconstructions (bottom row), one column per sample; one row
    of reconstructions when there is no original at all."""
    from PIL import Image
    n = len(result["keys"])
    if n == 0:
        raise UsageError("the dataset has no samples to preview")
    with_originals = any(o is not None for o in result["originals"])
    canvas = Image.new("RGB", (n * tile, (2 if with_originals else 1) * tile), (40, 40, 40))
    for i, (orig, rec) in enumerate(zip(result["originals"], result["reconstructions"])):
        for row, img in enumerate((orig, rec) if with_originals else (rec,)):
            if img is not None:
                canvas.paste(Image.fromarray(img).resize((tile, tile), Image.Resampling.BICUBIC),
                             (i * tile, row * tile))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
