"""The k-means VQ tokenizer: fit, save/load, identity, bad artifacts, registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import RES
from safetensors.numpy import load_file, save_file

from tokshard.errors import TokenizerError, UsageError
from tokshard.pipeline.convert.decode import DecodeConfig, resize_array
from tokshard.tokenizers.kmeans_vq import KMeansVQ
from tokshard.tokenizers.registry import available, load_tokenizer


@pytest.fixture(scope="module")
def images(photos):
    return np.stack([resize_array(img, DecodeConfig(resolution=RES)) for _, img, _ in photos])


def psnr(a, b):
    mse = ((a.astype(np.float64) - b) ** 2).mean()
    return 10 * np.log10(255 ** 2 / mse)


def test_encode_decode_shapes_and_fidelity(tokenizer_dir, images):
    tok = KMeansVQ.load(tokenizer_dir)
    codes = tok.encode(images)
    assert codes.shape == (len(images), RES // 8, RES // 8)
    assert codes.min() >= 0 and codes.max() < tok.vocab_size
    recon = tok.decode(codes)
    assert recon.shape == images.shape and recon.dtype == np.uint8
    # A real quantiser beats predicting every pixel as the dataset mean by a wide margin.
    flat = np.broadcast_to(images.mean(axis=(0, 1, 2)), images.shape)
    assert psnr(recon, images) > psnr(flat, images) + 5


def test_codes_do_not_depend_on_batch_composition(tokenizer_dir, images):
    tok = KMeansVQ.load(tokenizer_dir, batch_size=4)
    alone = np.concatenate([tok.encode(images[i:i + 1]) for i in range(len(images))])
    np.testing.assert_array_equal(alone, tok.encode(images))


def test_save_load_roundtrip_keeps_identity(tokenizer_dir, tmp_path):
    tok = KMeansVQ.load(tokenizer_dir)
    tok.save(tmp_path)
    again = KMeansVQ.load(tmp_path)
    assert again.identity() == tok.identity()
    other = KMeansVQ.load(tokenizer_dir, resolution=2 * RES)
    assert other.grid_shape == (2 * RES // 8,) * 2
    assert other.identity().config_hash != tok.identity().config_hash
    assert other.identity().codebook_hash == tok.identity().codebook_hash


def test_bad_checkpoint_lists_missing_unexpected_and_wrong_shapes(tokenizer_dir, tmp_path):
    w = load_file(str(tokenizer_dir / "model.safetensors"))
    w.pop("mean")
    w["extra"] = np.zeros(3, np.float32)
    w["decoder"] = w["decoder"][:, :10].copy()
    save_file(w, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tokenizer_dir / "config.json").read_text())
    with pytest.raises(TokenizerError) as e:
        KMeansVQ.load(tmp_path)
    msg = str(e.value)
    assert "missing=['mean']" in msg and "unexpected=['extra']" in msg and "decoder" in msg


def test_tampered_weights_and_newer_version_are_refused(tokenizer_dir, tmp_path):
    w = load_file(str(tokenizer_dir / "model.safetensors"))
    w["centroids"] = w["centroids"] + 1
    save_file(w, str(tmp_path / "model.safetensors"))
    cfg = json.loads((tokenizer_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="sha256"):
        KMeansVQ.load(tmp_path)
    cfg["version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="newer"):
        KMeansVQ.load(tmp_path)
    with pytest.raises(TokenizerError, match="no config.json"):
        KMeansVQ.load(tmp_path / "nowhere")


def test_registry_finds_builtin_and_entry_point(tokenizer_dir):
    assert "kmeans-vq" in available()
    tok = load_tokenizer("kmeans-vq", {"path": str(tokenizer_dir)})
    assert tok.name == "kmeans-vq"
    with pytest.raises(UsageError, match="unknown tokenizer"):
        load_tokenizer("no-such-tokenizer")
    with pytest.raises(UsageError, match="bad options"):
        load_tokenizer("kmeans-vq", {"path": str(tokenizer_dir), "colour": "blue"})


def test_fit_is_deterministic(images):
    from tokshard.tokenizers.kmeans_fit import fit_kmeans_vq
    a = fit_kmeans_vq(images, codebook_size=16, patch_size=8, resolution=RES, pca_dim=8, iters=3)
    b = fit_kmeans_vq(images, codebook_size=16, patch_size=8, resolution=RES, pca_dim=8, iters=3)
    assert a.identity() == b.identity()


def _near_tie_tokenizer() -> tuple[KMeansVQ, float, float]:
    """Two centroids whose squared norms float32 cannot tell apart, the second truly nearer
    to a black image (z = 0, so a patch's distance to c is ||c||^2)."""
    a = np.array([1.0, 0.0], np.float32)
    b = np.array([1.0 - 2.0 ** -24, np.sqrt(2.0 ** -23 - 2.0 ** -40)], np.float32)
    basis = np.zeros((12, 2), np.float32)
    basis[0, 0] = basis[1, 1] = 1.0
    weights = {"mean": np.zeros(12, np.float32), "basis": basis, "centroids": np.stack([a, b]),
               "decoder": np.zeros((2, 12), np.float32)}
    exact = [float((c.astype(np.float64) ** 2).sum()) for c in (a, b)]
    return KMeansVQ(weights, patch_size=2, resolution=4, device="cpu"), *exact


def test_near_ties_get_the_exact_nearest_code_whatever_float32_says():
    # The default tokenizer must give the same codes on any BLAS and on a GPU: float32
    # distances are summed in each kernel's own order, so its near ties are decided again
    # in float64 (on an H200, float32 alone flipped codes in 3 of 20 shards against the CPU).
    tok, da, db = _near_tie_tokenizer()
    assert db < da                                                  # b is the nearer
    sq = (tok._centroids ** 2).sum(1)                              # what float32 sees
    assert sq[1] >= sq[0]                                           # a tie (or a) in float32
    codes = tok.encode(np.zeros((3, 4, 4, 3), np.uint8))
    assert (codes == 1).all()


def test_codes_are_the_float64_nearest_centroid(tokenizer_dir, images):
    tok = KMeansVQ.load(tokenizer_dir)
    codes = tok.encode(images).reshape(-1)
    w = {k: v.astype(np.float64) for k, v in load_file(f"{tokenizer_dir}/model.safetensors").items()}
    p, (h, _) = tok.patch_size, tok.grid_shape
    patches = images.reshape(len(images), h, p, h, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p * p * 3)
    z = (patches / 255.0 - w["mean"]) @ w["basis"]
    d = (w["centroids"] ** 2).sum(1) - 2.0 * z @ w["centroids"].T
    np.testing.assert_array_equal(codes, d.argmin(axis=1))


def test_full_fp32_turns_tf32_off_and_restores_it():
    import torch

    from tokshard.tokenizers.device import full_fp32
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with full_fp32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with full_fp32(enabled=False):
            assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# --- variable grids (resize mode "area") ----------------------------------------------------

def test_base_tokenizer_is_fixed_grid_only(tokenizer_dir):
    from tokshard.tokenizers.base import Tokenizer
    assert Tokenizer.patch_size.fget(object()) is None   # the default: fixed grid only
    tok = KMeansVQ.load(tokenizer_dir)
    assert tok.patch_size == 8


def test_non_square_codes_are_those_of_each_patch(tokenizer_dir, photos):
    """A (2p*3, 2p*5) image gets a (6, 10) grid; codes are per patch, so the codes of a crop on
    patch boundaries are that crop of the whole image's codes, and of each patch alone."""
    tok = KMeansVQ.load(tokenizer_dir, batch_size=3)
    p = tok.patch_size
    h, w = 2 * p * 3, 2 * p * 5
    imgs = np.stack([np.ascontiguousarray(img[:h, :w]) for _, img, _ in photos[:5]])
    codes = tok.encode(imgs)
    assert codes.shape == (5, h // p, w // p) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < tok.vocab_size
    # Each patch alone, as a (1, p, p, 3) image.
    cells = imgs.reshape(5, h // p, p, w // p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p, p, 3)
    np.testing.assert_array_equal(tok.encode(np.ascontiguousarray(cells)).reshape(codes.shape), codes)
    # A crop on patch boundaries, and the square crop at the tokenizer's resolution.
    np.testing.assert_array_equal(tok.encode(np.ascontiguousarray(imgs[:, p:4 * p, 2 * p:9 * p])),
                                  codes[:, 1:4, 2:9])
    np.testing.assert_array_equal(tok.encode(np.ascontiguousarray(imgs[:, :, :p])), codes[:, :, :1])   # one column
    # Batch composition still does not matter.
    np.testing.assert_array_equal(np.concatenate([tok.encode(imgs[i:i + 1]) for i in range(5)]), codes)
    recon = tok.decode(codes)
    assert recon.shape == imgs.shape and recon.dtype == np.uint8
    np.testing.assert_array_equal(recon[:, :p, :p], tok.decode(codes[:, :1, :1]))


def test_square_codes_are_unchanged_by_variable_grids(tokenizer_dir, images):
    """The square input at the tokenizer's resolution: the grid_shape codes, equal to the
    codes of its patches encoded as one wide strip (a different shape through the same path)."""
    tok = KMeansVQ.load(tokenizer_dir)
    codes = tok.encode(images)
    assert codes.shape == (len(images), *tok.grid_shape)
    strip = np.ascontiguousarray(np.concatenate(list(images), axis=1)[None])   # (1, R, N*R, 3)
    g = tok.grid_shape[1]
    got = tok.encode(strip)[0]
    np.testing.assert_array_equal(np.stack([got[:, i * g:(i + 1) * g] for i in range(len(images))]), codes)


def test_variable_grid_shapes_are_checked(tokenizer_dir):
    tok = KMeansVQ.load(tokenizer_dir)
    p = tok.patch_size
    assert tok.encode(np.zeros((2, p, 3 * p, 3), np.uint8)).shape == (2, 1, 3)
    assert tok.encode(np.zeros((0, 2 * p, p, 3), np.uint8)).shape == (0, 2, 1)
    for bad in (np.zeros((1, p + 1, p, 3), np.uint8), np.zeros((1, p, 0, 3), np.uint8),
                np.zeros((1, p, p, 4), np.uint8), np.zeros((p, p, 3), np.uint8), np.zeros((1, p, p, 3), np.float32)):
        with pytest.raises(ValueError, match=f"multiples of {p}"):
            tok.encode(bad)
    assert tok.decode(np.zeros((1, 2, 5), np.int64)).shape == (1, 2 * p, 5 * p, 3)
    for bad_codes in (np.zeros((1, 0, 5), np.int64), np.zeros((1, 5), np.int64), np.zeros((1, 2, 2, 2), np.int64)):
        with pytest.raises(ValueError, match="shape"):
            tok.decode(bad_codes)
    with pytest.raises(ValueError, match="shape"):   # an explicit shape is still held to
        tok.check_codes(np.zeros((1, 2, 5), np.int64), tok.grid_shape)
