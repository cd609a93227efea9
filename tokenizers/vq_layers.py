"""The convolutional VQ autoencoder shared by taming-transformers' VQGAN and LlamaGen's VQ models.

Both descend from the same "pytorch_diffusion" encoder/decoder: GroupNorm(32) + swish
ResNet blocks, single-head spatial self-attention, stride-2 convs with (0, 1, 0, 1)
padding down and nearest x2 + conv up. The blocks below carry exactly the parameter
names of the originals (norm1/conv1/norm2/conv2/nin_shortcut, norm/q/k/v/proj_out,
conv), so public state dicts load without renaming. Only the containers differ:

  taming (taming/modules/diffusionmodules/model.py)   LlamaGen (tokenizer/tokenizer_image/vq_model.py)
  encoder.down.{i}.block.{j} / .attn.{j} / .downsample   encoder.conv_blocks.{i}.res.{j} / .attn.{j} / .downsample
  {en,de}coder.mid.block_1 / attn_1 / block_2           {en,de}coder.mid.0 / 1 / 2
  decoder.up.{level}  (indexed by resolution level)     decoder.conv_blocks.{k}  (k = 0 is the lowest resolution)

`Naming` captures those differences, so one Encoder/Decoder serves both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Naming:
    enc_levels: str               # ModuleList of encoder levels
    dec_levels: str               # ModuleList of decoder levels
    blocks: str                   # ResNet blocks inside a level
    mid: tuple[str, str, str]     # resnet, attention, resnet of the middle
    dec_low_res_first: bool       # decoder list starts at the lowest resolution


TAMING = Naming("down", "up", "block", ("block_1", "attn_1", "block_2"), dec_low_res_first=False)
LLAMAGEN = Naming("conv_blocks", "conv_blocks", "res", ("0", "1", "2"), dec_low_res_first=True)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _conv3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=padding)


def _conv1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1)


class ResnetBlock(nn.Module):
    # Dropout and the time-embedding projection of the originals are absent: dropout is
    # the identity at inference and VQGANs are built with temb_channels=0 (no temb_proj).
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), _conv3(cin, cout)
        self.norm2, self.conv2 = _norm(cout), _conv3(cout, cout)
        if cin != cout:
            self.nin_shortcut = _conv1(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.silu is x * sigmoid(x) (the originals' swish) as one kernel: less memory traffic.
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v = _conv1(channels, channels), _conv1(channels, channels), _conv1(channels, channels)
        self.proj_out = _conv1(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The originals' bmm/softmax formulation, kept op for op rather than swapped for
        # scaled_dot_product_attention: codes are argmins, so staying close to the
        # reference arithmetic keeps near-ties resolving the same way. It only runs at
        # the lowest resolutions (16x16 at 256 px), where it is cheap.
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
        w = torch.bmm(q, k.reshape(b, c, hh * ww)) * (int(c) ** -0.5)
        w = F.softmax(w, dim=2)
        h = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch convs pad symmetrically; the originals pad right/bottom only.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: ResNet blocks, each followed by attention if the level has it, then a resampler."""

    def __init__(self, naming: Naming, blocks: Sequence[nn.Module], attn: Sequence[nn.Module],
                 resample_name: str, resample: nn.Module | None):
        super().__init__()
        self._blocks = naming.blocks
        setattr(self, naming.blocks, nn.ModuleList(blocks))
        self.attn = nn.ModuleList(attn)
        self._resample = resample_name if resample is not None else None
        if resample is not None:
            setattr(self, resample_name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(getattr(self, self._blocks)):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return getattr(self, self._resample)(h) if self._resample else h


def _mid(naming: Naming, channels: int) -> nn.Sequential:
    # A Sequential with these child names gives exactly mid.block_1.* / mid.0.* keys.
    return nn.Sequential(OrderedDict(zip(naming.mid, (
        ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)))))


class Encoder(nn.Module):
    def __init__(self, naming: Naming, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_levels: Sequence[bool], z_channels: int, in_channels: int = 3):
        super().__init__()
        self._levels = naming.enc_levels
        self.conv_in = _conv3(in_channels, ch)
        levels, block_in = [], ch
        for i, mult in enumerate(ch_mult):
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                if attn_levels[i]:
                    attn.append(AttnBlock(block_in))
            last = i == len(ch_mult) - 1
            levels.append(Level(naming, blocks, attn, "downsample", None if last else Downsample(block_in)))
        setattr(self, naming.enc_levels, nn.ModuleList(levels))
        self.mid = _mid(naming, block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = _conv3(block_in, z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in getattr(self, self._levels):
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, naming: Naming, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_levels: Sequence[bool], z_channels: int, out_channels: int = 3):
        super().__init__()
        self._levels, self._low_first = naming.dec_levels, naming.dec_low_res_first
        block_in = ch * ch_mult[-1]
        self.conv_in = _conv3(z_channels, block_in)
        self.mid = _mid(naming, block_in)
        built: dict[int, Level] = {}
        for i in reversed(range(len(ch_mult))):    # built top-down: channels flow from the lowest resolution
            blocks, attn = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[i]))
                block_in = ch * ch_mult[i]
                if attn_levels[i]:
                    attn.append(AttnBlock(block_in))
            built[i] = Level(naming, blocks, attn, "upsample", Upsample(block_in) if i != 0 else None)
        by_level = [built[i] for i in range(len(ch_mult))]
        stored = by_level[::-1] if self._low_first else by_level
        setattr(self, naming.dec_levels, nn.ModuleList(stored))
        self.norm_out = _norm(block_in)
        self.conv_out = _conv3(block_in, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        levels = getattr(self, self._levels)
        for level in (levels if self._low_first else reversed(levels)):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Codebook(nn.Module):
    """Holds `embedding` so the checkpoint key is quantize.embedding.weight, as in both originals."""

    def __init__(self, n_embed: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, dim)


class VQAutoencoder(nn.Module):
    """encoder -> quant_conv -> nearest code ... code -> post_quant_conv -> decoder."""

    def __init__(self, naming: Naming, *, ch: int, enc_mult: Sequence[int], dec_mult: Sequence[int],
                 num_res_blocks: int, enc_attn: Sequence[bool], dec_attn: Sequence[bool],
                 z_channels: int, embed_dim: int, n_embed: int):
        super().__init__()
        self.encoder = Encoder(naming, ch=ch, ch_mult=enc_mult, num_res_blocks=num_res_blocks,
                               attn_levels=enc_attn, z_channels=z_channels)
        self.decoder = Decoder(naming, ch=ch, ch_mult=dec_mult, num_res_blocks=num_res_blocks,
                               attn_levels=dec_attn, z_channels=z_channels)
        self.quantize = Codebook(n_embed, embed_dim)
        self.quant_conv = _conv1(z_channels, embed_dim)
        self.post_quant_conv = _conv1(embed_dim, z_channels)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, R, R) in [-1, 1] -> (N, embed_dim, h, w): what the quantiser sees."""
        return self.quant_conv(self.encoder(x))

    def reconstruct(self, zq: torch.Tensor) -> torch.Tensor:
        """(N, embed_dim, h, w) code vectors -> (N, 3, R, R), nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(zq))


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, l2_norm: bool, fused: bool = False) -> torch.Tensor:
    """(N, D, h, w) latents -> (N, h, w) index of the nearest codebook row.

    The distance is the originals' expansion, op for op: ||z||^2 + ||e||^2 - 2 z.e
    (VectorQuantizer2 in taming; LlamaGen's VectorQuantizer after L2-normalising both
    sides when codebook_l2_norm). ||z||^2 does not change the argmin in exact
    arithmetic, but it does change float rounding, so it stays, to resolve near-ties
    as the reference does. `fused`: MaskGIT-VQGAN's form, the same expansion as one
    addmm(||z||^2 + ||e||^2, z, e^T, alpha=-2). Always float32, also under bf16
    autocast: a bf16 distance would merge distinct codes into ties.
    """
    n, d, h, w = z.shape
    with torch.autocast(device_type=z.device.type, enabled=False):
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, d)
        book = codebook.float()
        if l2_norm:
            flat, book = F.normalize(flat, p=2, dim=-1), F.normalize(book, p=2, dim=-1)
        if fused:
            dist = torch.addmm(flat.pow(2.0).sum(dim=1, keepdim=True) + book.T.pow(2.0).sum(dim=0, keepdim=True),
                               flat, book.T, alpha=-2.0)
        else:
            dist = (flat ** 2).sum(1, keepdim=True) + (book ** 2).sum(1) - 2 * (flat @ book.T)
        return dist.argmin(dim=1).view(n, h, w)
