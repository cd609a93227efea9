"""MaskGIT-VQGAN: the convolutional VQ tokenizer of MaskGIT, as TiTok uses it.

TiTok (bytedance/1d-tokenizer) pre-tokenizes ImageNet with MaskGIT's VQGAN
(`maskgit-vqgan-imagenet-f16-256.bin`: 1024 codes of 256 dims, 16x16 grid at
256 px) and trains its 1-D tokenizer on those codes. The network is not
taming's VQGAN, so `vqgan-taming` cannot load it:

- no attention anywhere, no quant_conv/post_quant_conv (the encoder's output is
  quantised directly), and the encoder's convs inside ResNet blocks have no bias;
- downsampling is 2x2 average pooling, not a strided conv;
- when a ResNet block changes width, its 1x1 `nin_shortcut` projects the
  block's *output* (h + nin_shortcut(h)), a quirk of the JAX original that the
  PyTorch ports keep and the weights depend on;
- inputs are in [0, 1], and the distance is one addmm (see `nearest_code`).

Parameter names are those of `modeling/modules/maskgit_vqgan.py`
(encoder.down.{i}.block.{j}, encoder.mid.{j}, decoder.up.{i}.upsample_conv,
quantize.embedding.weight), so its state dict loads as it is. Convolutions pad
as its `Conv2dSame` does (explicit F.pad, then an unpadded conv): the same
arithmetic as the reference, so near-tie argmins resolve the same way.

Fully convolutional (no attention, no positional anything): it takes any (H, W) multiple
of f = 2**levels (`patch_size`, variable grids) and gives an (H/f, W/f) grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokshard.errors import TokenizerError
from tokshard.tokenizers.vq_layers import Codebook, _norm
from tokshard.tokenizers.vqgan import VQGANTokenizer, _group_norm_ok, _positive_ints


class Conv2dSame(nn.Conv2d):
    """TensorFlow-style SAME padding, computed from the input size at call time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            pads.append(max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0))
        (ph, pw) = pads
        if ph > 0 or pw > 0:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), Conv2dSame(cin, cout, kernel_size=3, bias=False)
        self.norm2, self.conv2 = _norm(cout), Conv2dSame(cout, cout, kernel_size=3, bias=False)
        if cin != cout:
            self.nin_shortcut = Conv2dSame(cout, cout, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        # The original's shortcut: the block's output, projected, when the width changes.
        return h + (self.nin_shortcut(h) if hasattr(self, "nin_shortcut") else x)


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout) for j in range(n))
        self.downsample = downsample

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            h = block(h)
        return F.avg_pool2d(h, kernel_size=2, stride=2) if self.downsample else h


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout) for j in range(n))
        if upsample:
            self.upsample_conv = Conv2dSame(cout, cout, kernel_size=3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            h = block(h)
        if hasattr(self, "upsample_conv"):
            h = self.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return h


class MaskGitAutoencoder(nn.Module):
    """encoder -> nearest code ... code -> decoder (no quant convs)."""

    def __init__(self, *, hidden_channels: int, channel_mult: list[int], num_res_blocks: int,
                 z_channels: int, num_embeddings: int):
        super().__init__()
        ch, mult, n = hidden_channels, channel_mult, num_res_blocks
        last = len(mult) - 1
        self.encoder = nn.Module()
        self.encoder.conv_in = Conv2dSame(3, ch, kernel_size=3, bias=False)
        ins = [1] + list(mult)
        self.encoder.down = nn.ModuleList(_Down(ch * ins[i], ch * mult[i], n, i != last) for i in range(len(mult)))
        top = ch * mult[-1]
        self.encoder.mid = nn.ModuleList(ResnetBlock(top, top) for _ in range(n))
        self.encoder.norm_out = _norm(top)
        self.encoder.conv_out = Conv2dSame(top, z_channels, kernel_size=1)

        self.decoder = nn.Module()
        self.decoder.conv_in = Conv2dSame(z_channels, top, kernel_size=3)
        self.decoder.mid = nn.ModuleList(ResnetBlock(top, top) for _ in range(n))
        # up[i] works at level i; the forward pass runs them from the lowest resolution up.
        self.decoder.up = nn.ModuleList(
            _Up(ch * (mult[i + 1] if i != last else mult[-1]), ch * mult[i], n, i != 0) for i in range(len(mult)))
        self.decoder.norm_out = _norm(ch * mult[0])
        self.decoder.conv_out = Conv2dSame(ch * mult[0], 3, kernel_size=3)
        self.quantize = Codebook(num_embeddings, z_channels)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, z_channels, H/f, W/f): any H, W multiples of f = 2**levels."""
        # Children set in __init__ under the reference's names; nn.Module.__getattr__ is typed
        # Tensor | Module, so reading them through a plain nn.Module does not type-check.
        e: Any = self.encoder
        h = e.conv_in(x)
        for level in e.down:
            h = level(h)
        for block in e.mid:
            h = block(h)
        return e.conv_out(F.silu(e.norm_out(h)))

    def reconstruct(self, zq: torch.Tensor) -> torch.Tensor:
        """(N, z_channels, h, w) code vectors -> (N, 3, h*f, w*f), nominally in [0, 1]."""
        d: Any = self.decoder   # as in latents()
        h = d.conv_in(zq)
        for block in d.mid:
            h = block(h)
        for level in reversed(d.up):
            h = level(h)
        return d.conv_out(F.silu(d.norm_out(h)))


class MaskGitVQGAN(VQGANTokenizer):
    """MaskGIT's VQGAN (TiTok's `PretrainedTokenizer`); default: maskgit-vqgan-imagenet-f16-256."""

    name = "maskgit-vqgan"
    version = 1
    presets = {   # TiTok's PretrainedTokenizer config + its Pixel_Quantizer
        "imagenet_f16_256": {"hidden_channels": 128, "channel_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
                             "z_channels": 256, "num_embeddings": 1024, "resolution": 256},
    }
    default_preset = "imagenet_f16_256"
    state_keys = ("state_dict", "model")     # the public .bin is a bare state dict
    ignored_keys = ()
    input_range = (0.0, 1.0)
    fused_distance = True
    # Keys of the original OmegaConf config that must hold these values, or are inference no-ops.
    _FIXED = {"num_channels": 3}
    _IGNORED = ("dropout", "commitment_cost", "num_resolutions", "embedding_dim")
    _KEYS = ("hidden_channels", "channel_mult", "num_res_blocks", "z_channels", "num_embeddings", "resolution")

    @classmethod
    def canonical_arch(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        raw = dict(raw)
        for k, v in cls._FIXED.items():
            if k in raw and raw.pop(k) != v:
                raise TokenizerError(f"maskgit-vqgan: {k} must be {v}")
        mult = raw.get("channel_mult", cls.presets[cls.default_preset]["channel_mult"])
        if "num_resolutions" in raw and raw["num_resolutions"] != len(mult):
            raise TokenizerError(f"maskgit-vqgan config: num_resolutions={raw['num_resolutions']} but "
                                 f"channel_mult has {len(mult)} levels")
        z = raw.get("z_channels", cls.presets[cls.default_preset]["z_channels"])
        if "embedding_dim" in raw and raw["embedding_dim"] != z:
            raise TokenizerError(f"maskgit-vqgan config: embedding_dim={raw['embedding_dim']} must equal "
                                 f"z_channels={z} (the encoder output is quantised as it is)")
        raw = {k: v for k, v in raw.items() if k not in cls._IGNORED}
        unknown = sorted(set(raw) - set(cls._KEYS))
        if unknown:
            raise TokenizerError(f"maskgit-vqgan config: unknown keys {unknown} (known: {list(cls._KEYS)})")
        arch = {**cls.presets[cls.default_preset], **raw}
        arch["channel_mult"] = list(arch["channel_mult"])
        _positive_ints(arch, cls._KEYS, "maskgit-vqgan")
        _group_norm_ok(arch["hidden_channels"], arch["channel_mult"], "maskgit-vqgan")
        return arch

    @classmethod
    def build_model(cls, arch: Mapping[str, Any]) -> nn.Module:
        return MaskGitAutoencoder(**{k: arch[k] for k in cls._KEYS if k != "resolution"})

    @classmethod
    def downsample_levels(cls, arch: Mapping[str, Any]) -> int:
        return len(arch["channel_mult"]) - 1

    @classmethod
    def default_resolution(cls, arch: Mapping[str, Any]) -> int:
        return int(arch["resolution"])
