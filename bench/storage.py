"""Storage per codec on the bundled photos.

Builds img2dataset-style tars from the bundled photos (plus random crops),
converts them with every token codec using the default tokenizer, and reports
bytes/image and ratios against baselines measured in the same run: the raw
uint16 payload, the source JPEG bytes, the empirical order-0 entropy of the
tokens, and SeiT-style per-image gzip of the 2-byte codes.

    python bench/storage.py          # or: make bench

Prints a markdown table and writes it into bench/RESULTS.md, replacing only the
section "## Storage per codec (bundled photos)".
"""

from __future__ import annotations

import datetime
import gzip
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tokshard.pipeline.convert import ConvertConfig, convert
from tokshard.pipeline.sample_data import write_img2dataset_shards

HEADING = "## Storage per codec (bundled photos)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
CODECS = ("raw", "bitpack", "zstd", "zstd-dict")
RUNS = [("parquet", c) for c in CODECS] + [("wds", "zstd-dict")]


def token_arrays(dataset_dir: Path) -> list[np.ndarray]:
    """Per-image token arrays from a raw-codec Parquet dataset."""
    out = []
    for path in sorted((dataset_dir / "shards").glob("*.parquet")):
        col = pq.read_table(path, columns=["tokens"]).column("tokens").combine_chunks()
        size = col.type.list_size
        flat = col.values.to_numpy(zero_copy_only=False)
        out.extend(flat.reshape(-1, size).astype(np.uint16))
    return out


def entropy_bits(tokens: np.ndarray) -> float:
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def main() -> int:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokshard-bench-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        write_img2dataset_shards(src, crops_per_photo=15, shard_size=100)

        results = {}
        for fmt, codec in RUNS:
            name = codec if fmt == "parquet" else f"{codec} (wds)"
            out = tmp / (codec if fmt == "parquet" else f"{codec}-{fmt}")
            t = time.perf_counter()
            r = convert(ConvertConfig(sources=[str(src)], out=str(out), format=fmt, codec=codec),
                        quiet=True)
            results[name] = r["dataset"]["totals"]
            if fmt == "parquet" and codec == "zstd-dict":
                dict_bytes = (out / "codec" / "state.bin").stat().st_size
            print(f"converted {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr)

        tokens = token_arrays(tmp / "raw")

    base = results["raw"]
    n, src_bytes = base["samples"], base["source_bytes"]
    for name, t in results.items():
        assert t["samples"] == n and t["tokens"] == base["tokens"] and t["source_bytes"] == src_bytes, \
            f"{name}: totals differ from raw run: {t} vs {base}"
    assert len(tokens) == n, f"read {len(tokens)} token arrays, manifest says {n} samples"
    tok_per_img = base["tokens"] / n
    assert base["payload_bytes"] == 2 * base["tokens"], "raw payload is not 2 bytes/token"

    h0 = entropy_bits(np.concatenate(tokens))
    gz = [len(gzip.compress(t.astype("<u2").tobytes(), compresslevel=9)) for t in tokens]
    gz_bytes = float(np.mean(gz))

    rows = []
    for name, t in results.items():
        pay, sto = t["payload_bytes"] / n, t["stored_bytes"] / n
        rows.append((name, f"{pay:.1f}", f"{8 * t['payload_bytes'] / t['tokens']:.2f}", f"{sto:.1f}",
                     f"{100 * t['payload_bytes'] / src_bytes:.2f}%",
                     f"{100 * t['stored_bytes'] / src_bytes:.2f}%",
                     f"{t['payload_bytes'] / base['payload_bytes']:.3f}"))
    rows.append(("gzip -9 per image (SeiT-style)", f"{gz_bytes:.1f}", f"{8 * gz_bytes / tok_per_img:.2f}",
                 "", f"{100 * sum(gz) / src_bytes:.2f}%", "", f"{sum(gz) / base['payload_bytes']:.3f}"))
    rows.append(("order-0 entropy H0 (bound for per-token codes)", f"{h0 * tok_per_img / 8:.1f}",
                 f"{h0:.2f}", "", f"{100 * h0 * base['tokens'] / 8 / src_bytes:.2f}%", "",
                 f"{h0 / 16:.3f}"))

    header = ("codec", "payload B/img", "bits/token", "stored B/img", "payload % of JPEG",
              "stored % of JPEG", "payload / raw")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)

    by = {name: t for name, t in results.items()}
    bp = by["bitpack"]["payload_bytes"] / n
    zs = by["zstd"]["payload_bytes"] / n
    zd = by["zstd-dict"]["payload_bytes"] / n
    zd_bits = 8 * by["zstd-dict"]["payload_bytes"] / base["tokens"]
    interp = (
        f"Each image is {tok_per_img:.0f} tokens from a 1024-code vocabulary: raw stores "
        f"{2 * tok_per_img:.0f} bytes, bitpack {bp:.0f} (exactly 10 bits/token). Per-sample zstd on a "
        f"{2 * tok_per_img:.0f}-byte payload has little context to learn the code statistics: "
        f"{zs:.0f} B/img, {100 * abs(1 - zs / bp):.0f}% {'above' if zs > bp else 'below'} bitpack. The dictionary "
        f"brings it to {zd:.0f} B/img ({zd_bits:.2f} bits/token), "
        f"{'above' if zd_bits > h0 else 'below'} the order-0 entropy of {h0:.2f} bits/token "
        f"({100 * (zd_bits / h0 - 1):+.0f}%). Caveat: the dictionary is trained on the first "
        f"{min(n, 2048)} samples, i.e. here on the very images it compresses, and its "
        f"state (codec/state.bin, {dict_bytes:,} B = {dict_bytes / n:.0f} B/img here) is not counted "
        f"in the totals; crops of the same {n // 16} photos "
        f"repeat token runs, which is how the dictionary gets below H0 (an order-0 bound only). "
        f"So the zstd-dict figure is optimistic for unseen data. SeiT-style gzip per image ({gz_bytes:.0f} B) "
        f"gains little over bitpack. Stored bytes include keys, captions and metadata "
        f"(~{(by['bitpack']['stored_bytes'] - by['bitpack']['payload_bytes']) / n:.0f} B/img in "
        f"Parquet). Containers differ: raw Parquet stores "
        f"{by['raw']['stored_bytes'] / n:.0f} B/img (the Parquet-native column: uint16 has no 16-bit "
        f"physical type, so it is stored as dictionary-encoded, zstd-compressed INT32 pages), and WebDataset tars store "
        f"{by['zstd-dict (wds)']['stored_bytes'] / n:,.0f} B/img because each of a sample's 4 tar "
        f"members takes a 512-byte header plus padding to 512 bytes."
    )

    section = "\n".join([
        HEADING, "",
        f"Date: {datetime.date.today().isoformat()}. Machine: 2 cores. "
        f"Images: {n} ({n // 16} bundled photos + 15 random crops each), "
        f"source JPEG {src_bytes / n:,.0f} bytes/image; tokenizer kmeans-vq, 1024 codes, "
        f"16x16 grid at 256 px. Run time {time.perf_counter() - t0:.0f} s.", "",
        table, "",
        interp, "",
    ])
    write_section(section)
    return 0


def write_section(section: str) -> None:
    intro = ("# Benchmark results\n\nFigures are ratios against baselines measured in the same run; "
             "reproduce with `make bench`.\n")
    text = RESULTS.read_text() if RESULTS.exists() else intro
    if not text.startswith("# Benchmark results"):
        text = intro + "\n" + text
    pattern = re.compile(r"^" + re.escape(HEADING) + r"\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text.rstrip("\n") + "\n")


if __name__ == "__main__":
    sys.exit(main())
