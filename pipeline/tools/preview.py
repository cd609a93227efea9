"""`tokshard preview`: what the stored tokens look like, next to what went in.

Originals are re-read from the dataset's sources and decoded exactly as the
convert job decoded them (same plan, same decode config), so the comparison
is against the tokenizer's actual input; reconstructions come from the
stored tokens through the dataset's own tokenizer copy. PSNR is measured on
those pairs.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np

from tokshard.errors import SkipSample, TokshardError, UsageError
from tokshard.pipeline.convert.decode import DecodeConfig, decode_image
from tokshard.pipeline.convert.sources import plan_units, read_unit
from tokshard.pipeline.format.work import read_job_spec

if TYPE_CHECKING:
    from tokshard.pipeline.stream.dataset import TokenDataset


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _originals(ds: TokenDataset, wanted: dict[int, list[str]], side: int) -> dict[str, np.ndarray]:
    """Decoded source images for {unit index: [keys]}, as the convert job saw them."""
    try:
        found = read_job_spec(ds.layout)
    except TokshardError:
        found = None
    if found is None:
        return {}
    job = found[0].config
    decode = DecodeConfig(**ds.info.decode)
    try:
        units = {u.index: u for u in plan_units(job["sources"], job["shard_size"], job.get("input_format", "auto"),
                                                ds.storage_options)}
    except (TokshardError, OSError):
        return {}  # the sources moved or are gone: reconstructions only
    out = {}
    for index, unit_keys in wanted.items():
        unit, keys = units.get(index), set(unit_keys)
        if unit is None:
            continue
        for rec in read_unit(unit, ds.storage_options, **job.get("columns", {})):
            if rec.key in keys and rec.image is not None:
                try:
                    image = decode_image(rec.image, decode).image
                except SkipSample:
                    continue
                if image.shape[0] != side:  # multi-view datasets decode larger; show the centre
                    o = (image.shape[0] - side) // 2
                    image = image[o:o + side, o:o + side]
                out[rec.key] = image
    return out


# Samples in a preview grid unless asked otherwise (preview and report).
PREVIEW_SAMPLES = 8


def reconstruct(ds: TokenDataset, n: int = PREVIEW_SAMPLES, seed: int = 0) -> dict:
    """n samples (seeded pick): keys, originals (or None), reconstructions, PSNRs."""
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
    recon = tok.decode(np.stack(codes)) if codes else np.empty((0, tok.resolution, tok.resolution, 3), np.uint8)
    originals = _originals(ds, units, tok.resolution)
    pairs = [(originals.get(k), r) for k, r in zip(keys, recon)]
    scores = [psnr(o, r) if o is not None else None for o, r in pairs]
    return {"keys": keys, "originals": [o for o, _ in pairs], "reconstructions": list(recon), "psnr": scores,
            "tokenizer": ds.info.tokenizer.tokenizer_id}


def grid_png(result: dict, tile: int = 128) -> bytes:
    """Originals (top row) above reconstructions (bottom row), one column per sample."""
    from PIL import Image
    n = len(result["keys"])
    if n == 0:
        raise UsageError("the dataset has no samples to preview")
    canvas = Image.new("RGB", (n * tile, 2 * tile), (40, 40, 40))
    for i, (orig, rec) in enumerate(zip(result["originals"], result["reconstructions"])):
        for row, img in enumerate((orig, rec)):
            if img is not None:
                canvas.paste(Image.fromarray(img).resize((tile, tile), Image.Resampling.BICUBIC),
                             (i * tile, row * tile))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
