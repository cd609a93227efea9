"""MaskGIT-VQGAN (TiTok's pixel tokenizer) on a tiny random model in the public layout.

The state dict is enumerated by re-transcribing the constructors of
bytedance/1d-tokenizer `modeling/modules/maskgit_vqgan.py` (Encoder, Decoder,
VectorQuantizer as TiTok's PretrainedTokenizer builds them), written as a bare
`torch.save` state dict like the public `maskgit-vqgan-imagenet-f16-256.bin`, and
checked against an op-by-op functional forward over those keys.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_vqgan import R, assert_nearest, images_for, nearest_reference

from tokshard.errors import TokenizerError
from tokshard.tokenizers.maskgit_vqgan import MaskGitVQGAN

CFG = {"hidden_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 2, "z_channels": 32,
       "num_embeddings": 64, "resolution": R}
# The original's OmegaConf keys, as a user would copy them from TiTok's code.
ORIGINAL_CONF = {"channel_mult": [1, 2, 2], "num_resolutions": 3, "dropout": 0.0, "hidden_channels": 32,
                 "num_channels": 3, "num_res_blocks": 2, "resolution": R, "z_channels": 32,
                 "num_embeddings": 64, "embedding_dim": 32, "commitment_cost": 0.25}


# --- the public layout, transcribed from the original constructors ------------------------

def _res_keys(out: dict, p: str, cin: int, cout: int) -> None:
    out.update({f"{p}.norm1.weight": (cin,), f"{p}.norm1.bias": (cin,), f"{p}.conv1.weight": (cout, cin, 3, 3),
                f"{p}.norm2.weight": (cout,), f"{p}.norm2.bias": (cout,), f"{p}.conv2.weight": (cout, cout, 3, 3)})
    if cin != cout:   # Conv2dSame(out_channels_, out_channels_, 1, bias=False)
        out[f"{p}.nin_shortcut.weight"] = (cout, cout, 1, 1)


def layout(cfg: dict) -> dict[str, tuple]:
    ch, mult, n, z = cfg["hidden_channels"], cfg["channel_mult"], cfg["num_res_blocks"], cfg["z_channels"]
    levels, out = len(mult), {}
    out["encoder.conv_in.weight"] = (ch, 3, 3, 3)
    in_mult = (1,) + tuple(mult)
    for i in range(levels):
        cin, cout = ch * in_mult[i], ch * mult[i]
        for j in range(n):
            _res_keys(out, f"encoder.down.{i}.block.{j}", cin, cout)
            cin = cout
    top = ch * mult[-1]
    for j in range(n):
        _res_keys(out, f"encoder.mid.{j}", top, top)
    out.update({"encoder.norm_out.weight": (top,), "encoder.norm_out.bias": (top,),
                "encoder.conv_out.weight": (z, top, 1, 1), "encoder.conv_out.bias": (z,)})
    out.update({"decoder.conv_in.weight": (top, z, 3, 3), "decoder.conv_in.bias": (top,)})
    for j in range(n):
        _res_keys(out, f"decoder.mid.{j}", top, top)
    for i in range(levels):
        cin = ch * (mult[-1] if i == levels - 1 else mult[i + 1])
        cout = ch * mult[i]
        for j in range(n):
            _res_keys(out, f"decoder.up.{i}.block.{j}", cin, cout)
            cin = cout
        if i != 0:
            out.update({f"decoder.up.{i}.upsample_conv.weight": (cout, cout, 3, 3),
                        f"decoder.up.{i}.upsample_conv.bias": (cout,)})
    bottom = ch * mult[0]
    out.update({"decoder.norm_out.weight": (bottom,), "decoder.norm_out.bias": (bottom,),
                "decoder.conv_out.weight": (3, bottom, 3, 3), "decoder.conv_out.bias": (3,),
                "quantize.embedding.weight": (cfg["num_embeddings"], z)})
    return out


# --- the original's arithmetic, op by op over those keys ---------------------------------

def _conv(sd, p, x):
    w = sd[f"{p}.weight"]
    total = w.shape[-1] - 1                      # Conv2dSame at stride 1: k - 1 pixels of padding
    if total:
        x = F.pad(x, [total // 2, total - total // 2, total // 2, total - total // 2])
    return F.conv2d(x, w, sd.get(f"{p}.bias"))


def _gn_silu(sd, p, x):
    return F.silu(F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6))


def _res(sd, p, x):
    h = _conv(sd, f"{p}.conv1", _gn_silu(sd, f"{p}.norm1", x))
    h = _conv(sd, f"{p}.conv2", _gn_silu(sd, f"{p}.norm2", h))
    residual = _conv(sd, f"{p}.nin_shortcut", h) if f"{p}.nin_shortcut.weight" in sd else x
    return h + residual


def ref_latents(sd, cfg, x):
    """Encoder of the original, (N, 3, R, R) in [0, 1] -> (N, z, h, w)."""
    levels, n = len(cfg["channel_mult"]), cfg["num_res_blocks"]
    h = _conv(sd, "encoder.conv_in", x)
    for i in range(levels):
        for j in range(n):
            h = _res(sd, f"encoder.down.{i}.block.{j}", h)
        if i != levels - 1:
            h = F.avg_pool2d(h, kernel_size=2, stride=2)
    for j in range(n):
        h = _res(sd, f"encoder.mid.{j}", h)
    return _conv(sd, "encoder.conv_out", _gn_silu(sd, "encoder.norm_out", h))


def ref_reconstruct(sd, cfg, zq):
    levels, n = len(cfg["channel_mult"]), cfg["num_res_blocks"]
    h = _conv(sd, "decoder.conv_in", zq)
    for j in range(n):
        h = _res(sd, f"decoder.mid.{j}", h)
    for i in reversed(range(levels)):
        for j in range(n):
            h = _res(sd, f"decoder.up.{i}.block.{j}", h)
        if i != 0:
            h = _conv(sd, f"decoder.up.{i}.upsample_conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _conv(sd, "decoder.conv_out", _gn_silu(sd, "decoder.norm_out", h))


def ref_codes(sd, z):
    """VectorQuantizer.get_code: one addmm over ||z||^2 + ||e||^2, then argmin."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    emb_t = sd["quantize.embedding.weight"].t()
    dist = torch.addmm(flat.pow(2.0).sum(dim=1, keepdim=True) + emb_t.pow(2.0).sum(dim=0, keepdim=True),
                       flat, emb_t, alpha=-2.0)
    return dist.argmin(dim=1).reshape(z.shape[0], z.shape[2], z.shape[3])


def to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0     # TiTok feeds [0, 1]


def random_state(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout(cfg).items():
        if len(shape) == 4:
            sd[k] = torch.randn(shape, generator=g) / math.prod(shape[1:]) ** 0.5
        elif "norm" in k and k.endswith(".weight"):
            sd[k] = 1 + 0.2 * torch.randn(shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    with torch.no_grad():   # codebook rows near real latents of other images, so codes spread out
        z = ref_latents(sd, cfg, to_input(images_for(seed + 1000, 4)))
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    rows = flat[torch.randperm(len(flat), generator=g)[:cfg["num_embeddings"]]]
    sd["quantize.embedding.weight"] = rows + 0.01 * torch.randn(rows.shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def sd():
    return random_state(CFG, 3)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, sd):
    """A directory as a user downloads it: the bare state dict in a .bin, nothing else."""
    d = tmp_path_factory.mktemp("maskgit")
    torch.save(sd, d / "maskgit-vqgan-imagenet-f16-256.bin")
    return d


def load(ckpt_dir, **kw):
    return MaskGitVQGAN.load(ckpt_dir, config=json.dumps(ORIGINAL_CONF), **kw)


# --- tests -------------------------------------------------------------------------------------

def test_public_layout_loads_and_matches_the_original_forward(ckpt_dir, sd):
    tok = load(ckpt_dir)
    assert tok.grid_shape == (8, 8) and tok.vocab_size == 64 and tok.resolution == R
    images = images_for(7, 6)
    with torch.inference_mode():
        ours = tok.latents(torch.from_numpy(images))
        ref = ref_latents(sd, CFG, to_input(images))
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)
    codes = tok.encode(images)
    assert np.array_equal(codes, ref_codes(sd, ref).numpy())
    assert_nearest(codes, nearest_reference(ref, sd["quantize.embedding.weight"], l2=False))
    assert tok.config()["input_range"] == [0.0, 1.0]


def test_decode_is_the_original_decoder_clamped_to_0_1(ckpt_dir, sd):
    tok = load(ckpt_dir)
    codes = tok.encode(images_for(11, 3))
    with torch.inference_mode():
        zq = sd["quantize.embedding.weight"][torch.from_numpy(codes)].permute(0, 3, 1, 2)
        ref = (ref_reconstruct(sd, CFG, zq).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    out = tok.decode(codes)
    assert out.shape == (3, R, R, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - ref.permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1


def test_codes_do_not_depend_on_batch_composition(ckpt_dir):
    tok = load(ckpt_dir, micro_batch=4)
    images = images_for(5, 7)
    whole = tok.encode(images)
    assert np.array_equal(whole[2:3], tok.encode(images[2:3]))
    assert np.array_equal(whole, np.concatenate([tok.encode(images[:5]), tok.encode(images[5:])]))


def test_variable_grids_are_the_original_forward_on_that_shape(ckpt_dir, sd):
    """patch_size = 2**levels; a non-square (H, W) on its cells encodes to (H/f, W/f) codes, exactly
    the original's (Conv2dSame pads from the input's size), and decodes to (H, W)."""
    tok = load(ckpt_dir, micro_batch=2)
    f = tok.patch_size
    assert f == 4 and tok.grid_shape == (R // f, R // f)
    for h, w in ((2 * f * 3, 2 * f * 5), (2 * R, R)):
        images = images_for(13, 3, h, w)
        codes = tok.encode(images)
        assert codes.shape == (3, h // f, w // f)
        with torch.inference_mode():
            ref = ref_latents(sd, CFG, to_input(images))
            zq = sd["quantize.embedding.weight"][torch.from_numpy(codes)].permute(0, 3, 1, 2)
            pixels = (ref_reconstruct(sd, CFG, zq).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        assert np.array_equal(codes, ref_codes(sd, ref).numpy())
        assert np.array_equal(codes, np.concatenate([tok.encode(images[i:i + 1]) for i in range(3)]))
        out = tok.decode(codes)
        assert out.shape == (3, h, w, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - pixels.permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1
    with pytest.raises(ValueError, match=f"multiples of {f}"):
        tok.encode(np.zeros((1, R, R + 2, 3), np.uint8))


def test_safetensors_and_save_load_keep_the_identity(tmp_path, ckpt_dir, sd):
    tok = load(ckpt_dir)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    again = MaskGitVQGAN.load(tmp_path / "m.safetensors", config=CFG)
    assert again.identity() == tok.identity()
    tok.save(tmp_path / "artifact")
    saved = MaskGitVQGAN.load(tmp_path / "artifact")
    assert saved.identity() == tok.identity()
    images = images_for(2, 3)
    assert np.array_equal(saved.encode(images), tok.encode(images))


def test_a_taming_checkpoint_or_a_wrong_config_is_one_clear_error(tmp_path, sd):
    from test_vqgan import TAMING_CFG
    from test_vqgan import random_state as taming_state
    torch.save(taming_state("taming", TAMING_CFG, 0), tmp_path / "taming.bin")
    with pytest.raises(TokenizerError, match=r"missing=\[.*decoder\.mid\.0\..*unexpected=\[.*attn_1.*"
                                             r"wrong_shapes=\[.*nin_shortcut"):
        MaskGitVQGAN.load(tmp_path / "taming.bin", config=CFG)
    wider = {**CFG, "hidden_channels": 64}
    torch.save(sd, tmp_path / "m.bin")
    with pytest.raises(TokenizerError, match="wrong_shapes"):
        MaskGitVQGAN.load(tmp_path / "m.bin", config=wider)
    for bad, message in (({"num_channels": 1}, "num_channels must be 3"),
                         ({"embedding_dim": 16}, "embedding_dim=16 must equal z_channels"),
                         ({"num_resolutions": 5}, "num_resolutions=5"),
                         ({"attn_resolutions": [16]}, "unknown keys"),
                         ({"hidden_channels": 40}, "multiples of 32")):
        with pytest.raises(TokenizerError, match=message):
            MaskGitVQGAN.canonical_arch({**ORIGINAL_CONF, **bad})
    with pytest.raises(TokenizerError, match="never downloads"):
        MaskGitVQGAN.from_options()


def test_round_trip_through_convert_and_the_loader(tmp_path, ckpt_dir, photos):
    """By registry name with CLI-style options, convert, stream back, decode with the dataset's copy."""
    import tokshard
    from tokshard.pipeline.convert.decode import DecodeConfig, decode_image
    from tokshard.pipeline.convert.job import ConvertConfig, convert
    from tokshard.pipeline.sample_data import jpeg_bytes
    from tokshard.tokenizers import registry
    assert registry.tokenizer_class("maskgit-vqgan") is MaskGitVQGAN
    src = tmp_path / "images"
    src.mkdir()
    jpegs = {key: jpeg_bytes(img, 90) for key, img, _ in photos[:5]}
    for key, data in jpegs.items():
        (src / f"{key}.jpg").write_bytes(data)
    opts = {"path": str(ckpt_dir), "config": json.dumps(ORIGINAL_CONF), "batch_size": "4"}
    dest = tmp_path / "ds"
    convert(ConvertConfig(sources=[str(src)], out=str(dest), tokenizer="maskgit-vqgan", tokenizer_options=opts,
                          codec="zstd"), quiet=True)
    ds = tokshard.open(dest)
    reference = load(ckpt_dir, batch_size=4)
    assert ds.record["tokenizer"]["codebook_hash"] == reference.identity().codebook_hash
    batch = next(iter(ds.loader(5, rank=0, world_size=1, shuffle=False)))
    pixels = np.stack([decode_image(jpegs[k], DecodeConfig(resolution=R)).image for k in batch["key"]])
    assert np.array_equal(batch["tokens"].numpy(), reference.encode(pixels))
    stored = ds.tokenizer()
    assert stored.identity() == reference.identity()
    assert stored.decode(batch["tokens"].numpy()).shape == (5, R, R, 3)
