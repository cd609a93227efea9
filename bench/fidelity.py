"""Reconstruction fidelity of the default tokenizer on the bundled real photos.

Every bundled photo (and random crops of it) is decoded to 256 px exactly as
convert does, encoded with the default k-means VQ (1024 codes, 16x16 grid),
decoded back, and compared: PSNR per image (dB), mean, min and max. For
scale, the same 256 px images as JPEGs at quality 10 (bytes and PSNR).

    python bench/fidelity.py   # or: make bench

Writes its table into bench/RESULTS.md under "## Tokenizer fidelity".
"""

from __future__ import annotations

import datetime
import io
import time

import numpy as np
from results_md import publish  # bench/ is the script's folder, so on sys.path

HEADING = "## Tokenizer fidelity"


def main() -> int:
    from PIL import Image

    from tokshard.pipeline.convert.decode import DecodeConfig, decode_image
    from tokshard.pipeline.convert.default_tokenizer import default_artifact
    from tokshard.pipeline.sample_data import jpeg_bytes, sample_images
    from tokshard.pipeline.tools.preview import psnr
    from tokshard.tokenizers.kmeans_vq import KMeansVQ

    t0 = time.perf_counter()
    tok = KMeansVQ.load(default_artifact())
    cfg = DecodeConfig(resolution=tok.resolution)
    rows = {"photos": [], "crops": []}
    jpeg_sizes = []
    for key, image, _ in sample_images(crops_per_photo=5, seed=1):
        pixels = decode_image(jpeg_bytes(image, 95), cfg).image
        recon = tok.decode(tok.encode(pixels[None]))[0]
        rows["crops" if "_crop" in key else "photos"].append(psnr(pixels, recon))
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=10)
        jpeg_sizes.append((len(buf.getvalue()), psnr(pixels, np.asarray(Image.open(buf).convert("RGB")))))
    all_scores = rows["photos"] + rows["crops"]
    q10_bytes = float(np.mean([b for b, _ in jpeg_sizes]))
    q10_psnr = float(np.mean([p for _, p in jpeg_sizes]))
    lines = [
        HEADING, "",
        f"_{datetime.date.today().isoformat()}, `python bench/fidelity.py`. Default tokenizer `kmeans-vq` "
        f"({tok.vocab_size} codes, {tok.grid_shape[0]}x{tok.grid_shape[1]} grid, {tok.resolution} px), "
        f"fitted on the bundled photos themselves (so this is a training-set figure)._", "",
        "| images | n | mean PSNR (dB) | min | max |",
        "|---|---:|---:|---:|---:|",
        *[f"| {name} | {len(v)} | {np.mean(v):.2f} | {np.min(v):.2f} | {np.max(v):.2f} |"
          for name, v in (("bundled photos", rows["photos"]), ("random crops of them", rows["crops"]),
                          ("all", all_scores))],
        "",
        f"For scale: the tokens cost 256 x 10 bits = 320 B/image before entropy coding (~240-300 B "
        f"stored); a JPEG of the same 256 px images at quality 10 costs {q10_bytes:,.0f} B at "
        f"{q10_psnr:.2f} dB. A patch k-means VQ is a storage baseline, not a generative tokenizer: "
        f"learned VQGAN-class tokenizers (issue 5) trade pixel PSNR for perceptual quality.", "",
    ]
    table = "\n".join(lines)
    publish(HEADING, table, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
