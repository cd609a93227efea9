"""Pretrained-checkpoint VQGAN tokenizers (taming VQGAN, LlamaGen VQ-16) on tiny random models.

The checkpoints are written here in the public layouts: the state dicts are enumerated
by re-transcribing the original constructors (taming/modules/diffusionmodules/model.py,
LlamaGen tokenizer/tokenizer_image/vq_model.py), not by asking tokshard's modules for
their names, and an op-by-op functional forward over those keys checks the wiring.
"""

from __future__ import annotations

import argparse
import builtins
import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tokshard.errors import TokenizerError, UsageError
from tokshard.tokenizers.vq_layers import nearest_code
from tokshard.tokenizers.vqgan import LlamaGenVQ, TamingVQGAN

R = 32                      # input resolution of the tiny models (grid 16x16)
TAMING_CFG = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16],
              "resolution": R, "z_channels": 32, "embed_dim": 8, "n_embed": 64}
LLAMA_CFG = {"ch": 32, "encoder_ch_mult": [1, 2], "decoder_ch_mult": [1, 2], "num_res_blocks": 1,
             "z_channels": 32, "codebook_size": 128, "codebook_embed_dim": 8, "codebook_l2_norm": True}


# --- the public layouts, transcribed from the original constructors -----------------------

def _res_keys(out: dict, p: str, cin: int, cout: int) -> None:
    out.update({f"{p}.norm1.weight": (cin,), f"{p}.norm1.bias": (cin,),
                f"{p}.conv1.weight": (cout, cin, 3, 3), f"{p}.conv1.bias": (cout,),
                f"{p}.norm2.weight": (cout,), f"{p}.norm2.bias": (cout,),
                f"{p}.conv2.weight": (cout, cout, 3, 3), f"{p}.conv2.bias": (cout,)})
    if cin != cout:
        out.update({f"{p}.nin_shortcut.weight": (cout, cin, 1, 1), f"{p}.nin_shortcut.bias": (cout,)})


def _attn_keys(out: dict, p: str, c: int) -> None:
    out.update({f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,)})
    for n in ("q", "k", "v", "proj_out"):
        out.update({f"{p}.{n}.weight": (c, c, 1, 1), f"{p}.{n}.bias": (c,)})


def _conv_keys(out: dict, p: str, cout: int, cin: int, k: int) -> None:
    out.update({f"{p}.weight": (cout, cin, k, k), f"{p}.bias": (cout,)})


def taming_layout(cfg: dict) -> dict[str, tuple]:
    """taming VQModel: Encoder/Decoder(**ddconfig), VectorQuantizer2, quant_conv, post_quant_conv."""
    ch, mult, nrb, L = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"], len(cfg["ch_mult"])
    out: dict[str, tuple] = {}
    _conv_keys(out, "encoder.conv_in", ch, 3, 3)
    curr_res, in_mult = cfg["resolution"], (1, *mult)
    for i in range(L):
        block_in = ch * in_mult[i]
        for j in range(nrb):
            _res_keys(out, f"encoder.down.{i}.block.{j}", block_in, ch * mult[i])
            block_in = ch * mult[i]
            if curr_res in cfg["attn_resolutions"]:
                _attn_keys(out, f"encoder.down.{i}.attn.{j}", block_in)
        if i != L - 1:
            _conv_keys(out, f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            curr_res //= 2
    for part in ("encoder", "decoder"):
        c = ch * mult[-1]
        _res_keys(out, f"{part}.mid.block_1", c, c)
        _attn_keys(out, f"{part}.mid.attn_1", c)
        _res_keys(out, f"{part}.mid.block_2", c, c)
    out.update({"encoder.norm_out.weight": (block_in,), "encoder.norm_out.bias": (block_in,)})
    _conv_keys(out, "encoder.conv_out", cfg["z_channels"], block_in, 3)
    block_in, curr_res = ch * mult[-1], cfg["resolution"] // 2 ** (L - 1)
    _conv_keys(out, "decoder.conv_in", block_in, cfg["z_channels"], 3)
    for i in reversed(range(L)):
        for j in range(nrb + 1):
            _res_keys(out, f"decoder.up.{i}.block.{j}", block_in, ch * mult[i])
            block_in = ch * mult[i]
            if curr_res in cfg["attn_resolutions"]:
                _attn_keys(out, f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            _conv_keys(out, f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
            curr_res *= 2
    out.update({"decoder.norm_out.weight": (block_in,), "decoder.norm_out.bias": (block_in,)})
    _conv_keys(out, "decoder.conv_out", 3, block_in, 3)
    out["quantize.embedding.weight"] = (cfg["n_embed"], cfg["embed_dim"])
    _conv_keys(out, "quant_conv", cfg["embed_dim"], cfg["z_channels"], 1)
    _conv_keys(out, "post_quant_conv", cfg["z_channels"], cfg["embed_dim"], 1)
    return out


def llamagen_layout(cfg: dict) -> dict[str, tuple]:
    """LlamaGen VQModel(ModelArgs): conv_blocks/res/attn, mid as a ModuleList, codebook_used buffer."""
    ch, nrb = cfg["ch"], cfg["num_res_blocks"]
    out: dict[str, tuple] = {}
    mult = cfg["encoder_ch_mult"]
    _conv_keys(out, "encoder.conv_in", ch, 3, 3)
    in_mult = (1, *mult)
    for i in range(len(mult)):
        block_in = ch * in_mult[i]
        for j in range(nrb):
            _res_keys(out, f"encoder.conv_blocks.{i}.res.{j}", block_in, ch * mult[i])
            block_in = ch * mult[i]
            if i == len(mult) - 1:
                _attn_keys(out, f"encoder.conv_blocks.{i}.attn.{j}", block_in)
        if i != len(mult) - 1:
            _conv_keys(out, f"encoder.conv_blocks.{i}.downsample.conv", block_in, block_in, 3)
    _res_keys(out, "encoder.mid.0", block_in, block_in)
    _attn_keys(out, "encoder.mid.1", block_in)
    _res_keys(out, "encoder.mid.2", block_in, block_in)
    out.update({"encoder.norm_out.weight": (block_in,), "encoder.norm_out.bias": (block_in,)})
    _conv_keys(out, "encoder.conv_out", cfg["z_channels"], block_in, 3)
    mult = cfg["decoder_ch_mult"]
    block_in = ch * mult[-1]
    _conv_keys(out, "decoder.conv_in", block_in, cfg["z_channels"], 3)
    _res_keys(out, "decoder.mid.0", block_in, block_in)
    _attn_keys(out, "decoder.mid.1", block_in)
    _res_keys(out, "decoder.mid.2", block_in, block_in)
    for k, i in enumerate(reversed(range(len(mult)))):
        for j in range(nrb + 1):
            _res_keys(out, f"decoder.conv_blocks.{k}.res.{j}", block_in, ch * mult[i])
            block_in = ch * mult[i]
            if i == len(mult) - 1:
                _attn_keys(out, f"decoder.conv_blocks.{k}.attn.{j}", block_in)
        if i != 0:
            _conv_keys(out, f"decoder.conv_blocks.{k}.upsample.conv", block_in, block_in, 3)
    out.update({"decoder.norm_out.weight": (block_in,), "decoder.norm_out.bias": (block_in,)})
    _conv_keys(out, "decoder.conv_out", 3, block_in, 3)
    out["quantize.embedding.weight"] = (cfg["codebook_size"], cfg["codebook_embed_dim"])
    out["quantize.codebook_used"] = (65536,)
    _conv_keys(out, "quant_conv", cfg["codebook_embed_dim"], cfg["z_channels"], 1)
    _conv_keys(out, "post_quant_conv", cfg["z_channels"], cfg["codebook_embed_dim"], 1)
    return out


# --- an op-by-op functional forward over those keys (the originals' arithmetic) -----------

def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _conv(sd, p, x, stride=1, padding=1):
    return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], stride=stride, padding=padding)


def _swish(x):
    return x * torch.sigmoid(x)


def _res(sd, p, x):
    h = _conv(sd, f"{p}.conv1", _swish(_gn(sd, f"{p}.norm1", x)))
    h = _conv(sd, f"{p}.conv2", _swish(_gn(sd, f"{p}.norm2", h)))
    if f"{p}.nin_shortcut.weight" in sd:
        x = _conv(sd, f"{p}.nin_shortcut", x, padding=0)
    return x + h


def _attn(sd, p, x):
    h = _gn(sd, f"{p}.norm", x)
    q, k, v = (_conv(sd, f"{p}.{n}", h, padding=0).flatten(2) for n in "qkv")
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * q.shape[1] ** -0.5, dim=2)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(x.shape)
    return x + _conv(sd, f"{p}.proj_out", out, padding=0)


def _level(sd, p, blocks, h, n):
    for j in range(n):
        h = _res(sd, f"{p}.{blocks}.{j}", h)
        if f"{p}.attn.{j}.q.weight" in sd:
            h = _attn(sd, f"{p}.attn.{j}", h)
    return h


def ref_latents(sd, family, cfg, x):
    """encoder + quant_conv of the public model, (N, 3, R, R) in [-1, 1] -> (N, D, h, w)."""
    taming = family == "taming"
    levels, blocks = ("down", "block") if taming else ("conv_blocks", "res")
    mids = ("block_1", "attn_1", "block_2") if taming else ("0", "1", "2")
    n_levels = len(cfg["ch_mult"] if taming else cfg["encoder_ch_mult"])
    h = _conv(sd, "encoder.conv_in", x)
    for i in range(n_levels):
        h = _level(sd, f"encoder.{levels}.{i}", blocks, h, cfg["num_res_blocks"])
        if i != n_levels - 1:
            h = _conv(sd, f"encoder.{levels}.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = _res(sd, f"encoder.mid.{mids[2]}", _attn(sd, f"encoder.mid.{mids[1]}", _res(sd, f"encoder.mid.{mids[0]}", h)))
    h = _conv(sd, "encoder.conv_out", _swish(_gn(sd, "encoder.norm_out", h)))
    return _conv(sd, "quant_conv", h, padding=0)


def ref_reconstruct(sd, family, cfg, zq):
    taming = family == "taming"
    mids = ("block_1", "attn_1", "block_2") if taming else ("0", "1", "2")
    n_levels = len(cfg["ch_mult"] if taming else cfg["decoder_ch_mult"])
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", zq, padding=0))
    h = _res(sd, f"decoder.mid.{mids[2]}", _attn(sd, f"decoder.mid.{mids[1]}", _res(sd, f"decoder.mid.{mids[0]}", h)))
    for k, i in enumerate(reversed(range(n_levels))):
        p = f"decoder.up.{i}" if taming else f"decoder.conv_blocks.{k}"
        h = _level(sd, p, "block" if taming else "res", h, cfg["num_res_blocks"] + 1)
        if i != 0:
            h = _conv(sd, f"{p}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _conv(sd, "decoder.conv_out", _swish(_gn(sd, "decoder.norm_out", h)))


# --- random public checkpoints ----------------------------------------------------------------

def images_for(seed: int, n: int, height: int = R, width: int = R) -> np.ndarray:
    """Smooth random colour fields plus noise: varied enough to spread codes over the codebook.
    (height, width: multiples of 4; the default R x R draws what it always drew.)"""
    g = np.random.default_rng(seed)
    coarse = g.uniform(0, 255, (n, 4, 4, 3))
    smooth = np.repeat(np.repeat(coarse, height // 4, axis=1), width // 4, axis=2)
    return np.clip(smooth + g.normal(0, 40, smooth.shape), 0, 255).astype(np.uint8)


def to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0


def random_state(family: str, cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layout = taming_layout(cfg) if family == "taming" else llamagen_layout(cfg)
    sd = {}
    for k, shape in layout.items():
        if k == "quantize.codebook_used":
            sd[k] = torch.zeros(shape)
        elif len(shape) == 4:                            # convs: fan-in scaled
            fan_in = shape[1] * shape[2] * shape[3]
            sd[k] = torch.randn(shape, generator=g) / fan_in ** 0.5
        elif "norm" in k and k.endswith(".weight"):      # GroupNorm affine, away from the identity
            sd[k] = 1 + 0.2 * torch.randn(shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    # Codebook rows drawn from real latents of other images, so codes spread out.
    with torch.no_grad():
        z = ref_latents(sd, family, cfg, to_input(images_for(seed + 1000, 4)))
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    rows = flat[torch.randperm(len(flat), generator=g)[:layout["quantize.embedding.weight"][0]]]
    sd["quantize.embedding.weight"] = rows + 0.01 * torch.randn(rows.shape, generator=g)
    return sd


class _FakeModule(types.ModuleType):
    pass


def write_lightning_ckpt(path, sd: dict) -> None:
    """taming's last.ckpt as Lightning 1.0 wrote it: `callbacks` keyed by the ModelCheckpoint class."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    mods = {n: _FakeModule(n) for n in names}
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    mods[names[-1]].ModelCheckpoint = ModelCheckpoint
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(mods)
    try:
        junk = {"loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
                "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1),
                "loss.perceptual_loss.scaling_layer.shift": torch.randn(1, 3, 1, 1),
                "loss.logvar": torch.zeros(())}
        torch.save({"epoch": 12, "global_step": 345, "pytorch-lightning_version": "1.0.8",
                    "callbacks": {ModelCheckpoint: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.5),
                                                    "best_model_path": "/logs/last.ckpt"}},
                    "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "params": [0, 1]}]}],
                    "lr_schedulers": [], "state_dict": {**sd, **junk}}, path)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def write_llamagen_pt(path, sd: dict, ema: dict | None = None) -> None:
    """vq_train.py's checkpoint dict, argparse.Namespace `args` included."""
    ckpt = {"model": sd, "optimizer": {"state": {}, "param_groups": []},
            "discriminator": {"main.0.weight": torch.randn(4, 3, 4, 4)}, "optimizer_disc": {"state": {}},
            "steps": 250000, "args": argparse.Namespace(vq_model="VQ-16", codebook_size=16384, image_size=256)}
    if ema is not None:
        ckpt["ema"] = ema
    torch.save(ckpt, path)


@pytest.fixture(scope="module")
def taming_sd():
    return random_state("taming", TAMING_CFG, seed=1)


@pytest.fixture(scope="module")
def llama_sd():
    return random_state("llamagen", LLAMA_CFG, seed=2)


@pytest.fixture(scope="module")
def taming_ckpt(tmp_path_factory, taming_sd):
    d = tmp_path_factory.mktemp("taming")
    write_lightning_ckpt(d / "last.ckpt", taming_sd)
    (d / "cfg.json").write_text(json.dumps({"model": {"params": {
        "embed_dim": TAMING_CFG["embed_dim"], "n_embed": TAMING_CFG["n_embed"],
        "ddconfig": {**{k: v for k, v in TAMING_CFG.items() if k not in ("embed_dim", "n_embed")},
                     "double_z": False, "in_channels": 3, "out_ch": 3, "dropout": 0.0}},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}))
    return d


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory, llama_sd):
    d = tmp_path_factory.mktemp("llamagen")
    write_llamagen_pt(d / "vq_ds16_c2i.pt", llama_sd)
    return d


def load_taming(taming_ckpt, **kw):
    return TamingVQGAN.load(taming_ckpt / "last.ckpt", config=json.dumps(TAMING_CFG), **kw)


def load_llama(llama_ckpt, **kw):
    return LlamaGenVQ.load(llama_ckpt / "vq_ds16_c2i.pt", config=json.dumps(LLAMA_CFG), resolution=R, **kw)


def nearest_reference(z: torch.Tensor, book: torch.Tensor, l2: bool) -> np.ndarray:
    """(P, V) float64 squared distances computed directly as sum((z - e)^2)."""
    zz = z.double().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).numpy()
    ee = book.double().numpy()
    if l2:
        zz = zz / np.maximum(np.linalg.norm(zz, axis=1, keepdims=True), 1e-12)
        ee = ee / np.maximum(np.linalg.norm(ee, axis=1, keepdims=True), 1e-12)
    return ((zz[:, None, :] - ee[None, :, :]) ** 2).sum(-1)


def assert_nearest(codes: np.ndarray, dist: np.ndarray) -> None:
    ours, ref = codes.reshape(-1), dist.argmin(1)
    rows = np.arange(len(ref))
    off = ours != ref
    # Disagreement is only allowed on float32 near-ties, where the chosen code is as near.
    gap = dist[rows, ours] - dist[rows, ref]
    assert np.all(gap[off] <= 1e-5 * (1.0 + dist[rows, ref][off])), gap[off].max()
    assert off.mean() < 0.01
    assert len(np.unique(ours)) >= 16        # the codes really spread over the codebook


# --- layouts and quantisers ---------------------------------------------------------------------

@pytest.mark.parametrize("family", ["taming", "llamagen"])
def test_public_layout_loads_and_matches_reference_forward(family, taming_ckpt, llama_ckpt, taming_sd, llama_sd):
    tok = load_taming(taming_ckpt) if family == "taming" else load_llama(llama_ckpt)
    sd, cfg = (taming_sd, TAMING_CFG) if family == "taming" else (llama_sd, LLAMA_CFG)
    # tokshard's module has exactly the public names and shapes (minus LlamaGen's usage buffer).
    ours = {k: tuple(v.shape) for k, v in tok.model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in sd.items() if k != "quantize.codebook_used"}
    imgs = images_for(3, 3)
    with torch.inference_mode():
        z = tok.latents(torch.from_numpy(imgs))
        torch.testing.assert_close(z, ref_latents(sd, family, cfg, to_input(imgs)), rtol=1e-4, atol=1e-4)
        zq = torch.randn(2, z.shape[1], 16, 16)
        torch.testing.assert_close(tok.model.reconstruct(zq), ref_reconstruct(sd, family, cfg, zq),
                                   rtol=1e-4, atol=1e-4)


def test_taming_codes_are_nearest_codebook_rows(taming_ckpt, taming_sd):
    tok = load_taming(taming_ckpt)
    imgs = images_for(4, 7)
    codes = tok.encode(imgs)
    assert codes.shape == (7, 16, 16) and codes.dtype == np.int64
    with torch.inference_mode():
        z = tok.latents(torch.from_numpy(imgs))
    assert_nearest(codes, nearest_reference(z, taming_sd["quantize.embedding.weight"], l2=False))
    np.testing.assert_array_equal(tok.codebook(), taming_sd["quantize.embedding.weight"].numpy())


def test_llamagen_codes_are_nearest_on_the_unit_sphere(llama_ckpt, llama_sd):
    tok = load_llama(llama_ckpt)
    imgs = images_for(5, 7)
    codes = tok.encode(imgs)
    with torch.inference_mode():
        z = tok.latents(torch.from_numpy(imgs))
    book = llama_sd["quantize.embedding.weight"]
    dist = nearest_reference(z, book, l2=True)
    assert_nearest(codes, dist)
    # The normalisation matters here: plain L2 on the raw vectors picks other codes.
    assert (nearest_reference(z, book, l2=False).argmin(1) != codes.reshape(-1)).mean() > 0.05
    cb = tok.codebook()
    np.testing.assert_allclose(np.linalg.norm(cb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(cb, F.normalize(book, dim=-1).numpy(), rtol=1e-6)


def test_llamagen_prefers_ema_like_its_scripts(tmp_path, llama_sd):
    ema = dict(llama_sd)
    ema["quant_conv.bias"] = ema["quant_conv.bias"] + 1.0
    write_llamagen_pt(tmp_path / "vq.pt", llama_sd, ema=ema)
    kw = dict(config=LLAMA_CFG, resolution=R)
    default = LlamaGenVQ.load(tmp_path / "vq.pt", **kw)
    plain = LlamaGenVQ.load(tmp_path / "vq.pt", weights_key="model", **kw)
    assert (default.source["state_key"], plain.source["state_key"]) == ("ema", "model")
    assert plain.weights_digest() != default.weights_digest()
    torch.testing.assert_close(plain.model.quant_conv.bias + 1.0, default.model.quant_conv.bias)
    with pytest.raises(TokenizerError, match="optimizer_disc|no state dict"):
        LlamaGenVQ.load(tmp_path / "vq.pt", weights_key="steps", **kw)


# --- determinism, batching, decode ---------------------------------------------------------------

@pytest.mark.parametrize("family", ["taming", "llamagen"])
def test_codes_do_not_depend_on_batch_composition(family, taming_ckpt, llama_ckpt):
    load = load_taming if family == "taming" else load_llama
    ckpt = taming_ckpt if family == "taming" else llama_ckpt
    tok = load(ckpt, batch_size=3, micro_batch=2)        # 7 images: chunk and micro-batch tails
    imgs = images_for(6, 7)
    together = tok.encode(imgs)
    alone = np.concatenate([tok.encode(imgs[i:i + 1]) for i in range(7)])
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(together, load(ckpt, batch_size=3, micro_batch=2).encode(imgs))
    np.testing.assert_array_equal(tok.encode(imgs[::-1]), together[::-1])
    assert together.min() >= 0 and together.max() < tok.vocab_size
    assert tok.encode(imgs[:0]).shape == (0, 16, 16)


@pytest.mark.parametrize("family", ["taming", "llamagen"])
def test_decode_reconstructs_images(family, taming_ckpt, llama_ckpt, taming_sd, llama_sd):
    tok = load_taming(taming_ckpt) if family == "taming" else load_llama(llama_ckpt)
    sd, cfg = (taming_sd, TAMING_CFG) if family == "taming" else (llama_sd, LLAMA_CFG)
    codes = tok.encode(images_for(7, 5))
    recon = tok.decode(codes)
    assert recon.shape == (5, R, R, 3) and recon.dtype == np.uint8
    # decode = the public decoder applied to the (normalised) codebook rows, mapped from [-1, 1].
    book = torch.from_numpy(tok.codebook())
    with torch.inference_mode():
        x = ref_reconstruct(sd, family, cfg, book[torch.from_numpy(codes)].permute(0, 3, 1, 2))
    expect = ((x.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(recon.astype(np.float64) - expect).max() <= 1.0
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(np.full((1, 16, 16), tok.vocab_size))
    for bad in (np.zeros((1, 8), np.int64), np.zeros((1, 0, 8), np.int64), np.zeros((1, 2, 8, 8), np.int64)):
        with pytest.raises(ValueError, match="shape"):
            tok.decode(bad)


def test_bad_images_are_refused(taming_ckpt):
    tok = load_taming(taming_ckpt)
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(np.zeros((1, R, R, 3), np.float32))
    # Any size on the downsampling factor's cells (variable grids), and nothing else.
    f = tok.patch_size
    for shape in ((1, R + 1, R, 3), (1, R, R - 1, 3), (1, 0, R, 3), (1, R, R, 4), (R, R, 3)):
        with pytest.raises(ValueError, match=f"multiples of {f}"):
            tok.encode(np.zeros(shape, np.uint8))


# --- variable grids (resize mode "area") ------------------------------------------------------------

@pytest.mark.parametrize("family", ["taming", "llamagen"])
def test_variable_grids_encode_and_decode(family, taming_ckpt, llama_ckpt, taming_sd, llama_sd):
    """patch_size is the downsampling factor f; an (H, W) multiple of f gives an (H/f, W/f) grid
    whose codes are those of the public model's forward on that shape (the attention is global,
    nothing is sized by the square grid), and decode gives (H, W) back."""
    load = load_taming if family == "taming" else load_llama
    tok = load(taming_ckpt if family == "taming" else llama_ckpt, batch_size=3, micro_batch=2)
    sd, cfg = (taming_sd, TAMING_CFG) if family == "taming" else (llama_sd, LLAMA_CFG)
    f = tok.patch_size
    assert f == 2 and tok.grid_shape == (R // f, R // f)
    for h, w in ((2 * f * 3, 2 * f * 5), (R, 2 * R), (2 * R, R // 2)):
        imgs = images_for(12, 5, h, w)
        codes = tok.encode(imgs)
        assert codes.shape == (5, h // f, w // f) and codes.dtype == np.int64
        with torch.inference_mode():
            z = tok.latents(torch.from_numpy(imgs))
            torch.testing.assert_close(z, ref_latents(sd, family, cfg, to_input(imgs)), rtol=1e-4, atol=1e-4)
        assert_nearest(codes, nearest_reference(z, sd["quantize.embedding.weight"], l2=family == "llamagen"))
        # Chunk and micro-batch tails (zero-padded to the same shape) do not change an image's codes.
        np.testing.assert_array_equal(np.concatenate([tok.encode(imgs[i:i + 1]) for i in range(5)]), codes)
        recon = tok.decode(codes)
        assert recon.shape == (5, h, w, 3) and recon.dtype == np.uint8
        assert tok.decode(codes[:0]).shape == (0, h, w, 3)
        assert tok.encode(imgs[:0]).shape == (0, h // f, w // f)
    # The square input keeps the fixed grid's codes: nearest codes of the square latents.
    square = images_for(4, 3)
    with torch.inference_mode():
        z = tok.latents(torch.from_numpy(square))
        want = nearest_code(z, tok.model.quantize.embedding.weight, tok.l2_norm).numpy()
    np.testing.assert_array_equal(tok.encode(square), want)


# --- checkpoint hygiene ---------------------------------------------------------------------------

def test_missing_unexpected_and_wrong_shape_in_one_error(tmp_path, taming_sd, llama_sd):
    bad = dict(taming_sd)
    bad.pop("encoder.down.0.block.0.conv1.bias")
    bad["encoder.extra.weight"] = torch.zeros(3)
    bad["quant_conv.weight"] = torch.zeros(9, 32, 1, 1)
    write_lightning_ckpt(tmp_path / "bad.ckpt", bad)      # its loss.* entries are not reported
    with pytest.raises(TokenizerError) as e:
        TamingVQGAN.load(tmp_path / "bad.ckpt", config=TAMING_CFG)
    msg = str(e.value)
    assert "missing=['encoder.down.0.block.0.conv1.bias']" in msg
    assert "unexpected=['encoder.extra.weight']" in msg
    assert "quant_conv.weight: (9, 32, 1, 1) != (8, 32, 1, 1)" in msg
    assert "loss." not in msg

    lbad = {k: v for k, v in llama_sd.items() if k != "decoder.conv_out.bias"}
    lbad["loss.something"] = torch.zeros(1)               # not an ignored prefix for LlamaGen
    save_file(lbad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(TokenizerError, match=r"missing=\['decoder.conv_out.bias'\] unexpected=\['loss.something'\]"):
        LlamaGenVQ.load(tmp_path / "bad.safetensors", config=LLAMA_CFG, resolution=R)

    # The full-size default config against tiny weights: every list is cut short, not thousands long.
    with pytest.raises(TokenizerError, match=r"more\)"):
        LlamaGenVQ.load(tmp_path / "bad.safetensors")


class _OpensAFile:
    """A pickle payload that would create a file if anything ever called its reducer."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (builtins.open, (str(self.target), "w"))


def test_arbitrary_pickles_are_refused_without_running_them(tmp_path, taming_sd):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {**taming_sd, "trap": _OpensAFile(marker)}}, tmp_path / "evil.ckpt")
    with pytest.raises(TokenizerError, match="weights_only|beyond weights"):
        TamingVQGAN.load(tmp_path / "evil.ckpt", config=TAMING_CFG)
    assert not marker.exists()
    # A weights-only-loadable file whose state dict holds a non-tensor is refused too.
    torch.save({"state_dict": {**taming_sd, "note": "hello"}}, tmp_path / "odd.ckpt")
    with pytest.raises(TokenizerError, match="non-tensor entries: \\['note'\\]"):
        TamingVQGAN.load(tmp_path / "odd.ckpt", config=TAMING_CFG)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TokenizerError, match="cannot read"):
        TamingVQGAN.load(tmp_path / "garbage.pt", config=TAMING_CFG)


# --- identity, options, artifacts --------------------------------------------------------------

def test_identity_tracks_code_weights_and_settings(tmp_path, taming_ckpt, taming_sd):
    base = load_taming(taming_ckpt)
    save_file(taming_sd, str(tmp_path / "same.safetensors"))
    same = TamingVQGAN.load(tmp_path / "same.safetensors", config=TAMING_CFG)
    assert same.identity() == base.identity()            # .ckpt and .safetensors: one identity

    book = dict(taming_sd)
    book["quantize.embedding.weight"] = book["quantize.embedding.weight"].clone()
    book["quantize.embedding.weight"][5, 0] += 1e-3
    save_file(book, str(tmp_path / "book.safetensors"))
    changed = TamingVQGAN.load(tmp_path / "book.safetensors", config=TAMING_CFG).identity()
    assert changed.codebook_hash != base.identity().codebook_hash
    assert changed.config_hash == base.identity().config_hash

    dec = dict(taming_sd)
    dec["decoder.conv_out.bias"] = dec["decoder.conv_out.bias"] + 1   # previews only: same codes
    save_file(dec, str(tmp_path / "dec.safetensors"))
    assert TamingVQGAN.load(tmp_path / "dec.safetensors", config=TAMING_CFG).identity() == base.identity()

    for opts in ({"precision": "bf16"}, {"channels_last": "true"}, {"micro_batch": "8"}, {"resolution": "64"}):
        other = load_taming(taming_ckpt, **opts).identity()
        assert other.config_hash != base.identity().config_hash, opts
        assert other.codebook_hash == base.identity().codebook_hash


def test_precision_and_layout_options_encode(taming_ckpt):
    base = load_taming(taming_ckpt)
    imgs = images_for(8, 4)
    ref = base.encode(imgs)
    cl = load_taming(taming_ckpt, channels_last="1")
    assert cl.channels_last and cl.config()["channels_last"] is True
    assert (cl.encode(imgs) == ref).mean() > 0.95          # same maths, other kernels
    bf = load_taming(taming_ckpt, precision="bf16")
    codes = bf.encode(imgs)
    assert codes.shape == ref.shape and bf.config()["precision"] == "bf16"
    assert codes.min() >= 0 and codes.max() < bf.vocab_size
    with pytest.raises(TokenizerError, match="precision"):
        load_taming(taming_ckpt, precision="fp8")
    with pytest.raises(TokenizerError, match="channels_last"):
        load_taming(taming_ckpt, channels_last="maybe")


@pytest.mark.parametrize("family", ["taming", "llamagen"])
def test_save_load_roundtrip(family, tmp_path, taming_ckpt, llama_ckpt):
    cls = TamingVQGAN if family == "taming" else LlamaGenVQ
    tok = (load_taming(taming_ckpt, micro_batch=3) if family == "taming"
           else load_llama(llama_ckpt, micro_batch=3))
    tok.save(tmp_path / "art")
    doc = json.loads((tmp_path / "art" / "config.json").read_text())
    assert doc["tokenizer"] == cls.name and doc["config"]["micro_batch"] == 3
    again = cls.load(tmp_path / "art")                    # settings come back from config.json
    assert again.identity() == tok.identity()
    imgs = images_for(9, 5)
    np.testing.assert_array_equal(again.encode(imgs), tok.encode(imgs))
    # What the Ray engine does: the artifact plus the original string options.
    opts = {"batch_size": "5", "micro_batch": "3", "config": str(tmp_path / "gone.json")}
    assert cls.from_options(path=str(tmp_path / "art"), **opts).identity() == tok.identity()
    with pytest.raises(TokenizerError, match="disagrees"):
        cls.load(tmp_path / "art", config=cls.default_preset)
    # Tampered weights are caught by the sha256 in config.json.
    from safetensors.torch import load_file
    w = load_file(str(tmp_path / "art" / "model.safetensors"))
    w["quant_conv.bias"] = w["quant_conv.bias"] + 1
    save_file(w, str(tmp_path / "art" / "model.safetensors"))
    with pytest.raises(TokenizerError, match="sha256"):
        cls.load(tmp_path / "art")


def test_config_sources_and_from_options(taming_ckpt, llama_ckpt, tmp_path):
    a = load_taming(taming_ckpt)
    # taming's own project yaml/json (model.params.ddconfig) gives the same architecture.
    b = TamingVQGAN.from_options(path=str(taming_ckpt / "last.ckpt"), config=str(taming_ckpt / "cfg.json"))
    assert b.identity() == a.identity() and b.batch_size == 32
    # A directory holding one checkpoint and a config.json.
    d = tmp_path / "dir"
    d.mkdir()
    (d / "last.ckpt").write_bytes((taming_ckpt / "last.ckpt").read_bytes())
    (d / "config.json").write_text(json.dumps(TAMING_CFG))
    assert TamingVQGAN.from_options(path=str(d), batch_size="4").identity() == a.identity()
    c = LlamaGenVQ.from_options(path=str(llama_ckpt), config=json.dumps(LLAMA_CFG), resolution="32",
                                device="cpu", batch_size="2", precision="fp32", channels_last="false")
    assert c.identity() == load_llama(llama_ckpt).identity() and c.grid_shape == (16, 16)
    with pytest.raises(TokenizerError, match="needs path"):
        TamingVQGAN.from_options()
    with pytest.raises(TokenizerError, match="unknown keys"):
        TamingVQGAN.load(taming_ckpt / "last.ckpt", config='{"chanels": 3}')
    with pytest.raises(TokenizerError, match="batch_size"):
        TamingVQGAN.from_options(path=str(taming_ckpt / "last.ckpt"), config=TAMING_CFG, batch_size="many")
    with pytest.raises(TokenizerError, match="multiple of"):
        load_taming(taming_ckpt, resolution="33")
    # The public presets are what a bare checkpoint gets by default.
    assert TamingVQGAN.canonical_arch({}) == TamingVQGAN.presets["imagenet_f16_1024"]
    assert LlamaGenVQ.canonical_arch({})["codebook_size"] == 16384


def test_registry_loads_them_by_name(taming_ckpt):
    from tokshard.tokenizers import registry
    targets = {"vqgan-taming": "tokshard.tokenizers.vqgan:TamingVQGAN",
               "llamagen-vq16": "tokshard.tokenizers.vqgan:LlamaGenVQ"}
    added = [n for n in targets if n not in registry.available()]
    for n in added:
        registry.register(n, targets[n])
    try:
        tok = registry.load_tokenizer("vqgan-taming", {"path": str(taming_ckpt / "last.ckpt"),
                                                       "config": json.dumps(TAMING_CFG)})
        assert isinstance(tok, TamingVQGAN) and registry.tokenizer_class("llamagen-vq16") is LlamaGenVQ
        with pytest.raises(UsageError, match="unexpected"):
            registry.load_tokenizer("vqgan-taming", {"path": str(taming_ckpt), "colour": "blue"})
    finally:
        for n in added:
            registry._registered.pop(n, None)


@pytest.mark.parametrize("family", ["vqgan-taming", "llamagen-vq16"])
def test_round_trip_through_convert_and_the_loader(family, tmp_path, taming_ckpt, llama_ckpt, photos):
    """As a user runs them: by registry name with CLI-style options, convert, then
    stream the codes back and decode them with the dataset's own copy."""
    import tokshard
    from tokshard.pipeline.convert.job import ConvertConfig, convert
    from tokshard.pipeline.sample_data import jpeg_bytes
    src = tmp_path / "images"
    src.mkdir()
    for key, img, _ in photos[:5]:
        (src / f"{key}.jpg").write_bytes(jpeg_bytes(img, 90))
    if family == "vqgan-taming":
        opts = {"path": str(taming_ckpt / "last.ckpt"), "config": json.dumps(TAMING_CFG), "batch_size": "4"}
        reference = load_taming(taming_ckpt, batch_size=4)
    else:
        opts = {"path": str(llama_ckpt / "vq_ds16_c2i.pt"), "config": json.dumps(LLAMA_CFG),
                "resolution": str(R), "batch_size": "4"}
        reference = load_llama(llama_ckpt, batch_size=4)
    dest = tmp_path / "ds"
    convert(ConvertConfig(sources=[str(src)], out=str(dest), tokenizer=family, tokenizer_options=opts,
                          codec="bitpack"), quiet=True)
    ds = tokshard.open(dest)
    assert ds.record["tokenizer"]["codebook_hash"] == reference.identity().codebook_hash
    batch = next(iter(ds.loader(5, rank=0, world_size=1, shuffle=False)))
    assert batch["tokens"].shape == (5, *reference.grid_shape)
    from tokshard.pipeline.convert.decode import DecodeConfig, decode_image
    jpegs = {k: jpeg_bytes(img, 90) for k, img, _ in photos[:5]}
    pixels = np.stack([decode_image(jpegs[k], DecodeConfig(resolution=R)).image for k in batch["key"]])
    assert np.array_equal(batch["tokens"].numpy(), reference.encode(pixels))
    stored = ds.tokenizer()
    assert stored.identity() == reference.identity()
    assert stored.decode(batch["tokens"].numpy()).shape == (5, R, R, 3)
