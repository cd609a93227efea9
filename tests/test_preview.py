"""tokshard preview: originals beside reconstructions, and PSNR computed right."""

import math
import shutil

import numpy as np
from conftest import RES, convert_config
from PIL import Image

import tokshard
from tokshard.jobs.cli import main
from tokshard.pipeline.convert.decode import DecodeConfig, decode_image
from tokshard.pipeline.convert.job import convert
from tokshard.pipeline.tools.preview import psnr, reconstruct
from tokshard.tokenizers.kmeans_vq import KMeansVQ


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
    result = reconstruct(tokshard.open(dest), n=5, seed=1)
    tok = KMeansVQ.load(tokenizer_dir)
    jpegs = {k: d for k, d, _ in photo_jpegs}
    assert len(result["keys"]) == 5 and None not in result["psnr"]
    for key, orig, rec, score in zip(result["keys"], result["originals"], result["reconstructions"], result["psnr"]):
        image = decode_image(jpegs[key.split("/")[-1]], DecodeConfig(resolution=RES)).image
        assert np.array_equal(orig, image)
        assert np.array_equal(rec, tok.decode(tok.encode(image[None]))[0])
        assert math.isclose(score, psnr(image, rec)) and 8 < score < 40

    out = tmp_path / "grid.png"
    assert main(["preview", str(dest), "--out", str(out), "-n", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("kmeans-vq/1: mean PSNR") and all(" dB" in x for x in lines[:4])
    with Image.open(out) as im:
        assert im.size == (4 * 128, 256)
        top, bottom = np.asarray(im)[:128], np.asarray(im)[128:]
        assert top.std() > 10 and bottom.std() > 10 and not np.array_equal(top, bottom)

    # Sources gone: reconstructions still, and it says so.
    shutil.rmtree(photo_folder)
    assert main(["preview", str(dest), "--out", str(out), "-n", "2"]) == 0
    assert "originals not reachable" in capsys.readouterr().out
    assert main(["preview", str(dest), "--out", str(out), "-n", "0"]) == 2
