"""The `tokshard` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any, NoReturn

from tokshard.errors import TokshardError, UsageError
from tokshard.pipeline.convert.config import CHOICES, FIT_MAX_IMAGES, default
from tokshard.pipeline.tools.preview import PREVIEW_SAMPLES
from tokshard.pipeline.tools.query import FORMATS as OUTPUT_FORMATS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one clear line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _kv(items: list[str] | None, what: str) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _codec_params(items: list[str] | None) -> dict[str, Any]:
    params = _kv(items, "--codec-opt")
    return {k: int(v) if v.lstrip("-").isdigit() else v for k, v in params.items()}


def _storage_options(items: list[str] | None) -> dict | None:
    opts = _kv(items, "--storage-opt")
    return {k: {"true": True, "false": False}.get(v.lower(), v) for k, v in opts.items()} or None


TRUST_HELP = ("load the dataset's tokenizer copy even if its format runs code when loaded (TorchScript): "
              "only for datasets whose author you trust")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tokshard", description="Image corpora -> storage-efficient token datasets.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("convert", help="tokenize image corpora into token shards")
    c.add_argument("sources", nargs="+", metavar="SRC",
                   help="folder, .tar/.parquet file, glob or {00000..00099} pattern; local or fsspec URL")
    c.add_argument("--out", required=True, help="destination dataset folder")
    c.add_argument("--format", default=default("format"), choices=CHOICES["format"])
    c.add_argument("--codec", default=default("codec"), choices=CHOICES["codec"],
                   help=f"token codec (default {default('codec')})")
    c.add_argument("--codec-opt", action="append", metavar="KEY=VALUE", help="codec parameter, e.g. level=19")
    c.add_argument("--tokenizer", default=default("tokenizer"))
    c.add_argument("--tokenizer-opt", action="append", metavar="KEY=VALUE",
                   help="tokenizer option, e.g. path=DIR (a fitted artifact) or device=cuda")
    c.add_argument("--shard-size", type=int, default=default("shard_size"),
                   help="samples per output shard for folder and Parquet inputs (a tar maps to one shard)")
    c.add_argument("--resolution", type=int, help="override the tokenizer's input resolution")
    c.add_argument("--resize-mode", default=default("resize_mode"), choices=CHOICES["resize_mode"])
    c.add_argument("--max-pixels", type=int, metavar="P",
                   help="with --resize-mode area: resize each image to at most P pixels keeping its aspect "
                        "ratio, in whole patches; each sample keeps its own token grid (variable grids)")
    c.add_argument("--patch", type=int, metavar="N",
                   help="with --resize-mode area: pixels per token side (default: the tokenizer's patch size)")
    c.add_argument("--input-format", default=default("input_format"), choices=CHOICES["input_format"])
    c.add_argument("--split", metavar="NAME", help="convert only this split of a layout with splits "
                   "(data/train-*.parquet, test/...); without it, each sample's metadata gets its split")
    c.add_argument("--min-image-size", type=int, default=default("min_image_size"))
    c.add_argument("--max-image-pixels", type=int, default=default("max_pixels"))
    c.add_argument("--decode-workers", type=int, default=default("decode_workers"))
    c.add_argument("--engine", default=default("engine"), choices=CHOICES["engine"],
                   help="local: this process (default); ray: decode tasks + tokenizer actors on a Ray cluster")
    c.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    c.add_argument("--encoders", type=int, default=default("encoders"),
                   help="Ray tokenizer actors (default: one per GPU; without GPUs none: "
                        "each shard runs whole in one task)")
    c.add_argument("--gpus-per-encoder", type=float, help="GPUs per tokenizer actor (default 1 if any, else 0)")
    c.add_argument("--retries", type=int, default=default("retries"),
                   help=f"extra attempts for a shard that fails transiently (I/O, a lost worker; default "
                        f"{default('retries')}); deterministic failures are not retried")
    c.add_argument("--storage-opt", action="append", metavar="KEY=VALUE",
                   help="fsspec storage option for s3:// etc., e.g. endpoint_url=http://127.0.0.1:9000")
    c.add_argument("--where", help="keep only source samples this SQL predicate selects, over key, caption, "
                                   "label and their JSON metadata fields, e.g. \"similarity > 0.3\"")
    c.add_argument("--clip-frames", type=int, help="video job: one sample per clip of N frames (mp4/webm/mkv/...)")
    c.add_argument("--clip-fps", type=float, help="sample video frames at this rate (default: the source's)")
    c.add_argument("--clip-stride", type=int, help="sampled frames between clip starts (default: --clip-frames)")
    c.add_argument("--max-clips", type=int, default=default("max_clips"),
                   help=f"clips per video at most (default {default('max_clips')})")
    c.add_argument("--views", default=default("views"), choices=CHOICES["views"],
                   help="also store the tokens of the flipped image (hflip) or of ten crops "
                        "(tencrop, LlamaGen-style); the loader picks one per sample")
    c.add_argument("--text-tokenizer", metavar="PATH", help="a local Hugging Face tokenizer.json: each caption "
                   "also becomes text token ids (the text_tokens column; never downloaded)")
    c.add_argument("--max-text-tokens", type=int, metavar="N",
                   help=f"with --text-tokenizer: ids kept per caption; longer ones are cut and counted as "
                        f"text_truncated (default {default('max_text_tokens')})")
    for col, member in (("image", "input.jpg"), ("caption", "caption.txt"), ("label", "label.cls"), ("key", None)):
        c.add_argument(f"--{col}-column", help=f"Parquet/Arrow input: the {col} column"
                       + (f" (tars: the {col} member's extension, e.g. {member})" if member else ""))
    c.add_argument("--quiet", action="store_true")

    f = sub.add_parser("fit-tokenizer", help="fit the patch k-means VQ tokenizer on sample images")
    f.add_argument("sources", nargs="+", metavar="SRC")
    f.add_argument("--out", required=True, help="artifact folder (config.json + model.safetensors)")
    f.add_argument("--codebook-size", type=int, default=None, help="default: the default tokenizer's")
    f.add_argument("--patch-size", type=int, default=None, help="default: the default tokenizer's")
    f.add_argument("--resolution", type=int, default=None, help="default: the default tokenizer's")
    f.add_argument("--pca-dim", type=int, default=None, help="default: the default tokenizer's")
    f.add_argument("--max-images", type=int, default=FIT_MAX_IMAGES)
    f.add_argument("--iters", type=int, default=None, help="default: the default tokenizer's")
    f.add_argument("--seed", type=int, default=None, help="default: the default tokenizer's")

    d = sub.add_parser("demo", help="convert the bundled real photos end to end (no network, no GPU)")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--format", default=default("format"), choices=CHOICES["format"])
    d.add_argument("--codec", default=default("codec"), choices=CHOICES["codec"])

    from tokshard.pipeline.tools.preview import ORIGINALS_HELP, SOURCES_HELP
    v = sub.add_parser("preview", help="reconstructions from the stored tokens (beside the originals, with PSNR, "
                                       "with --originals or --sources)")
    v.add_argument("dataset")
    v.add_argument("--out", required=True, help="PNG to write (originals on top when read, reconstructions below)")
    v.add_argument("-n", type=int, default=PREVIEW_SAMPLES, help=f"samples to show (default {PREVIEW_SAMPLES})")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--trust-tokenizer-code", action="store_true", help=TRUST_HELP)
    vo = v.add_mutually_exclusive_group()
    vo.add_argument("--originals", action="store_true", help=ORIGINALS_HELP)
    vo.add_argument("--sources", nargs="+", metavar="URL", help=SOURCES_HELP)

    q = sub.add_parser("query", help="SQL (DuckDB) over a dataset's views: shards, samples, dataset")
    q.add_argument("dataset")
    q.add_argument("sql")
    q.add_argument("--format", default=OUTPUT_FORMATS[0], choices=OUTPUT_FORMATS)
    q.add_argument("--storage-opt", action="append", metavar="KEY=VALUE")

    k = sub.add_parser("lookup", help="where a sample key lives (shard, row, offset, ...)")
    k.add_argument("dataset")
    k.add_argument("key")
    k.add_argument("--format", default=OUTPUT_FORMATS[0], choices=OUTPUT_FORMATS)
    k.add_argument("--storage-opt", action="append", metavar="KEY=VALUE")

    r = sub.add_parser("verify", help="check that the dataset holds exactly what its manifest says: every file's "
                       "size and sha256, every shard parsed and decoded, every index row against its shard")
    r.add_argument("dataset")
    r.add_argument("--quick", action="store_true",
                   help="files only: sizes and sha256s, stray files (no shard is parsed or decoded)")
    r.add_argument("--repair", action="store_true", help="re-convert bad shards from the sources the dataset's job "
                   "spec names (printed first: any file or URL, read with your credentials)")
    r.add_argument("--sources", nargs="+", metavar="URL",
                   help="with --repair: the job's sources as you can read them (presigned anew, with credentials)")
    r.add_argument("--trust-tokenizer-code", action="store_true", help=TRUST_HELP + " (--repair loads it)")
    r.add_argument("--storage-opt", action="append", metavar="KEY=VALUE")

    h = sub.add_parser("report", help="a static HTML page: storage, token frequency, shards, skips, preview")
    h.add_argument("dataset")
    h.add_argument("--out", required=True, help="HTML file to write")
    h.add_argument("-n", type=int, default=PREVIEW_SAMPLES,
                   help=f"samples in the preview grid (default {PREVIEW_SAMPLES})")
    h.add_argument("--trust-tokenizer-code", action="store_true", help=TRUST_HELP)
    ho = h.add_mutually_exclusive_group()
    ho.add_argument("--originals", action="store_true", help=ORIGINALS_HELP)
    ho.add_argument("--sources", nargs="+", metavar="URL", help=SOURCES_HELP)

    t = sub.add_parser("add-tokens", help="add a second tokenizer's codes of the same samples as a token field "
                       "(sidecar shards under DEST/fields/NAME; the dataset's shards are not rewritten)")
    t.add_argument("dataset")
    t.add_argument("--tokenizer", required=True)
    t.add_argument("--tokenizer-opt", action="append", metavar="KEY=VALUE",
                   help="tokenizer option, e.g. path=DIR (a fitted artifact) or device=cuda")
    t.add_argument("--as", dest="field", required=True, metavar="NAME",
                   help="the field's name: loader(..., tokens=NAME) streams it")
    t.add_argument("--codec", default="zstd", choices=CHOICES["codec"])
    t.add_argument("--codec-opt", action="append", metavar="KEY=VALUE", help="codec parameter, e.g. level=19")
    t.add_argument("--resolution", type=int, help="override the tokenizer's input resolution")
    t.add_argument("--decode-workers", type=int, default=default("decode_workers"))
    t.add_argument("--engine", default=default("engine"), choices=CHOICES["engine"])
    t.add_argument("--sources", nargs="+", metavar="URL",
                   help="the dataset's own sources as you can read them (presigned anew, with credentials); "
                        "default: those its job spec names")
    t.add_argument("--storage-opt", action="append", metavar="KEY=VALUE")
    t.add_argument("--quiet", action="store_true")

    i = sub.add_parser("info", help="print a dataset's manifest summary")
    i.add_argument("dataset")
    i.add_argument("--json", action="store_true", help="the whole dataset record as JSON")
    return p


def _summary(result: dict) -> str:
    ds = result["dataset"]
    t = ds["totals"]
    n = max(1, t["samples"])
    rate = t["samples"] / max(result["elapsed_s"], 1e-9)
    pct = 100.0 * t["stored_bytes"] / t["source_bytes"] if t["source_bytes"] else float("nan")
    skipped = ", ".join(f"{k}={v}" for k, v in ds["skipped_by_reason"].items()) or "none"
    dropped = ", ".join(f"{k}={v}" for k, v in (ds.get("dropped_by_reason") or {}).items())
    return (f"converted {t['samples']} images into {ds['shards']} shard(s) in {result['elapsed_s']:.1f}s "
            f"({rate:.1f} images/s; {result['units_reused']} shard(s) already done)\n"
            f"  tokens/image {t['tokens'] // n}, payload {t['payload_bytes'] / n:.1f} B/image, "
            f"stored {t['stored_bytes'] / n:.1f} B/image = {pct:.2f}% of source bytes "
            f"({t['source_bytes'] / n:.0f} B/image)"
            + (f"; with the codec model ({ds['codec_state_bytes']:,} B) "
               f"{(t['stored_bytes'] + ds['codec_state_bytes']) / n:.1f} B/image"
               if ds.get("codec_state_bytes") else "")
            + "\n"
            f"  skipped: {skipped}"
            + (f"\n  kept, with parts dropped (fields stored as null, members ignored, captions' text ids cut): "
               f"{dropped}" if dropped else "")
            + (f"\n  text tokens: {t['text_tokens'] / n:.1f} ids/sample, {t['no_caption']} sample(s) without a caption"
               if ds.get("text_tokenizer") else "")
            + _ignored(result.get("ignored") or []))


def _ignored(ignored: list[list[str]], show: int = 5) -> str:
    """The input files no reader took, counted by reason, the first few named."""
    if not ignored:
        return ""
    counts = Counter(reason for _, reason in ignored)
    named = "".join(f"\n    {path} ({reason})" for path, reason in ignored[:show])
    more = f"\n    ... and {len(ignored) - show} more" if len(ignored) > show else ""
    return ("\n  input files not read: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) + named + more)


def _cmd_convert(a: argparse.Namespace) -> int:
    from tokshard.pipeline.convert.job import ConvertConfig, convert
    cols = {f"{c}_column": getattr(a, f"{c}_column") for c in ("image", "caption", "label", "key")
            if getattr(a, f"{c}_column")}
    if a.max_text_tokens is not None and a.text_tokenizer is None:
        raise UsageError("--max-text-tokens goes with --text-tokenizer")
    cfg = ConvertConfig(
        sources=a.sources, out=a.out, format=a.format, codec=a.codec,
        codec_params=_codec_params(a.codec_opt), tokenizer=a.tokenizer,
        tokenizer_options=_kv(a.tokenizer_opt, "--tokenizer-opt"), shard_size=a.shard_size,
        resolution=a.resolution, resize_mode=a.resize_mode, input_format=a.input_format, split=a.split,
        max_pixels=a.max_image_pixels, min_image_size=a.min_image_size,
        max_area=default("max_area") if a.max_pixels is None else a.max_pixels, patch=a.patch,
        decode_workers=a.decode_workers, columns=cols, views=a.views, engine=a.engine, address=a.address,
        where=a.where, clip_frames=a.clip_frames, clip_fps=a.clip_fps, clip_stride=a.clip_stride, max_clips=a.max_clips,
        encoders=a.encoders, gpus_per_encoder=a.gpus_per_encoder, retries=a.retries,
        storage_options=_storage_options(a.storage_opt), text_tokenizer=a.text_tokenizer,
        max_text_tokens=default("max_text_tokens") if a.max_text_tokens is None else a.max_text_tokens)
    print(_summary(convert(cfg, quiet=a.quiet)))
    return 0


def _cmd_fit(a: argparse.Namespace) -> int:
    from tokshard.pipeline.convert.default_tokenizer import fit_tokenizer_from_sources
    # Unset options take the default tokenizer's fit settings (DEFAULT_FIT).
    given = {k: getattr(a, k) for k in ("codebook_size", "patch_size", "resolution", "pca_dim", "iters", "seed")
             if getattr(a, k) is not None}
    tok = fit_tokenizer_from_sources(a.sources, a.out, max_images=a.max_images, **given)
    print(f"fitted {tok.name}: {tok.vocab_size} codes, grid {tok.grid_shape}, "
          f"{tok.fit_info.get('images')} images -> {a.out}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from pathlib import Path

    from tokshard.pipeline.convert.job import ConvertConfig, convert
    from tokshard.pipeline.sample_data import write_img2dataset_shards
    src = Path(a.out) / "source"
    if not src.exists():
        write_img2dataset_shards(src)
    out = Path(a.out) / "tokens"
    print(f"source: {src} (bundled photos as img2dataset WebDataset shards)")
    print(_summary(convert(ConvertConfig(sources=[str(src)], out=str(out), format=a.format, codec=a.codec))))
    print(f"dataset: {out}  (inspect with: tokshard info {out})")
    return 0


def _cmd_preview(a: argparse.Namespace) -> int:
    import math

    import tokshard
    from tokshard.pipeline.tools.preview import announce_sources, grid_png, reconstruct
    if a.n < 1:
        raise UsageError("-n must be at least 1")
    originals = a.sources or a.originals
    result = reconstruct(tokshard.open(a.dataset, trust_tokenizer_code=a.trust_tokenizer_code), a.n, a.seed,
                         originals=originals, announce=announce_sources if a.originals else None)
    with open(a.out, "wb") as f:
        f.write(grid_png(result))
    scores = [s for s in result["psnr"] if s is not None]
    for key, score in zip(result["keys"], result["psnr"]):
        missing = "original not found" if originals else "no original"
        print(f"{key}\t{missing if score is None else f'{score:.2f} dB'}")
    mean = sum(s for s in scores if math.isfinite(s)) / max(1, sum(map(math.isfinite, scores)))
    print(f"{result['tokenizer']}: mean PSNR {mean:.2f} dB over {len(scores)} of {len(result['keys'])} "
          f"samples -> {a.out}" if scores else f"{result['tokenizer']}: reconstructions only -> {a.out}")
    if not scores:
        print(f"tokshard: {result['originals_note'] or 'no original found in the sources'}", file=sys.stderr)
    return 0


def _cmd_query(a: argparse.Namespace) -> int:
    from tokshard.pipeline.tools.query import render, run
    columns, rows = run(a.dataset, a.sql, _storage_options(a.storage_opt))
    print(render(columns, rows, a.format))
    return 0


def _cmd_lookup(a: argparse.Namespace) -> int:
    from tokshard.pipeline.tools.query import lookup, render
    columns, rows = lookup(a.dataset, a.key, _storage_options(a.storage_opt))
    if not rows:
        print(f"tokshard: no sample with key {a.key!r}", file=sys.stderr)
        return 1
    print(render(columns, rows, a.format))
    return 0


def _cmd_add_tokens(a: argparse.Namespace) -> int:
    from tokshard.pipeline.tools.fields import add_tokens
    out = add_tokens(a.dataset, a.field, a.tokenizer, _kv(a.tokenizer_opt, "--tokenizer-opt"), codec=a.codec,
                     codec_params=_codec_params(a.codec_opt), resolution=a.resolution,
                     storage_options=_storage_options(a.storage_opt), sources=a.sources,
                     decode_workers=a.decode_workers, engine=a.engine, quiet=a.quiet,
                     announce=lambda sources: print("tokshard: add-tokens re-reads the sources the dataset's job "
                                                    "spec names: " + ", ".join(sources), file=sys.stderr))
    field = out["record"]["fields"][a.field]
    tok = field["tokenizer"]
    print(f"field {a.field!r}: {tok['tokenizer_id']} ({tok['vocab_size']} codes, grid {field['grid']}, codec "
          f"{field['codec']}) for the dataset's {out['field']['dataset']['totals']['samples']:,} samples, "
          f"at {field['path']}")
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    from tokshard.pipeline.tools.verify import repair, verify
    if a.sources and not a.repair:
        raise UsageError("--sources goes with --repair (the sources it re-reads)")
    opts = _storage_options(a.storage_opt)
    checked, problems = verify(a.dataset, opts, quick=a.quick)
    for p in problems:
        print(f"{p.path}" + (f" (shard {p.shard})" if p.unit >= 0 else "") + f": {p.what}")
    if not problems:
        print(f"ok: {checked} shards match the manifest" + (" (files only: --quick)" if a.quick else ""))
        return 0
    bad = len({p.shard for p in problems if p.unit >= 0})
    if not a.repair:
        print(f"{len(problems)} problem(s): {bad} of {checked} shards do not match the manifest"
              + (", and dataset files" if bad < len({(p.shard, p.unit) for p in problems}) else "")
              + " (re-run with --repair)")
        return 1
    repair(a.dataset, problems, opts, trust_tokenizer_code=a.trust_tokenizer_code, sources=a.sources,
           announce=lambda sources: print("tokshard: repair re-reads the sources the dataset's job spec names: "
                                          + ", ".join(sources), file=sys.stderr))
    _, still = verify(a.dataset, opts, quick=a.quick)
    print(f"repaired {len(problems) - len(still)} of {len(problems)} problem(s)"
          + ("" if not still else f"; still bad: {', '.join(p.path for p in still)}"))
    return 1 if still else 0


def _cmd_report(a: argparse.Namespace) -> int:
    from tokshard.pipeline.tools.preview import ORIGINALS_HINT, announce_sources
    from tokshard.pipeline.tools.report import write_report
    originals = a.sources or a.originals
    write_report(a.dataset, a.out, a.n, trust_tokenizer_code=a.trust_tokenizer_code, originals=originals,
                 announce=announce_sources if a.originals else None)
    print(f"report: {a.out}")
    if not originals:
        print(f"tokshard: {ORIGINALS_HINT}", file=sys.stderr)
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    from tokshard.pipeline.format.layout import DatasetLayout
    from tokshard.pipeline.format.manifest import read_valid
    # What every reader checks (paths, counts, totals): info never shows what open would refuse.
    table, rec, meta, _ = read_valid(DatasetLayout.at(a.dataset), a.dataset)
    if a.json:
        print(json.dumps({"shards": table.num_rows, **meta}, indent=2, sort_keys=True))
        return 0
    t, tok, codec = rec.totals, rec.tokenizer, rec.codec
    n = max(1, t.get("samples", 0))
    skips = ", ".join(f"{k} {v:,}" for k, v in rec.skipped_by_reason.items()) or "none"
    video = rec.video
    lines = [
        f"dataset     {a.dataset}  (schema {rec.schema_version}, tokshard {rec.tokshard_version})",
        f"samples     {t.get('samples', 0):,} in {table.num_rows:,} {rec.format} shards",
        f"tokenizer   {tok.tokenizer_id}  {tok.vocab_size} codes, " + (
            f"grid {rec.grid}, stored per sample {list(rec.stored_shape())}" if rec.variable_grid is None else
            f"variable grids (each image resized to at most {rec.variable_grid['max_pixels']:,} pixels in "
            f"{rec.variable_grid['patch']}-pixel patches: at most {rec.variable_grid['max_tokens']:,} tokens)"),
        f"            codebook {tok.codebook_hash[:16]}  config {tok.tokenizer_config_hash[:16]}",
        *([f"text        {rec.text_summary()}"] if rec.text_tokenizer else []),
        *[f"field       {name}: {f.tokenizer.tokenizer_id} {f.tokenizer.vocab_size} codes, grid {f.grid}, codec "
          f"{f.codec}, codebook {f.tokenizer.codebook_hash[:16]} (at {f.path})"
          for name, f in sorted((rec.fields or {}).items())],
        f"codec       {codec.get('name')} v{codec.get('version')} {codec.get('params') or ''}".rstrip(),
        f"storage     {t.get('stored_bytes', 0):,} B stored = {t.get('stored_bytes', 0) / n:,.1f} B/sample "
        f"({t.get('payload_bytes', 0) / n:,.1f} B tokens); source {t.get('source_bytes', 0):,} B",
        *([f"            {rec.model_cost()}"] if rec.codec_state_bytes else []),
        f"skipped     {skips}",
        *([f"ignored     {', '.join(f'{k} {v:,}' for k, v in rec.ignored_inputs.items())} (input files no "
           "reader took)"] if rec.ignored_inputs else []),
        *([f"dropped     {', '.join(f'{k} {v:,}' for k, v in rec.dropped_by_reason.items())} (parts of kept "
           "samples: fields stored as null, members ignored, captions' text ids cut)"]
          if rec.dropped_by_reason else []),
        f"sources     {', '.join(rec.sources)}",
    ]
    if video:
        lines.append(f"video       clips of {video.get('frames')} frames, fps {video.get('fps') or 'source'}, "
                     f"{str(video.get('tokenized')).replace('_', ' ')}")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"convert": _cmd_convert, "fit-tokenizer": _cmd_fit, "demo": _cmd_demo,
               "info": _cmd_info, "preview": _cmd_preview, "query": _cmd_query,
               "verify": _cmd_verify, "report": _cmd_report, "lookup": _cmd_lookup,
               "add-tokens": _cmd_add_tokens}[args.command]
    try:
        return handler(args)
    except (UsageError, TokshardError) as e:
        print(f"tokshard: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
