"""Stage-2 augmentations: float embedding (or one-hot) maps (B, C, H, W).

These run after the batch reaches the training device (GPU or CPU). They
keep every tensor on its input device; random numbers are still drawn from
the caller's CPU generator and moved with `.to(device)`, so a batch and a
generator state give the same numbers on any device.

`TokenEmbed` turns `tokens` into `embeddings`; the other classes read and
replace `embeddings` and leave `tokens` as they were (after an embedding-space
crop, `tokens` still describe the uncropped grid).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .augment_tokens import (
    _applied,
    _beta,
    _check_range,
    _mixed_target,
    _new_batch,
    _on,
    _positive_float,
    _positive_int,
    _prob,
    _range_pair,
    _sample_boxes,
    _size,
    _tokens,
)

__all__ = ["ColorAdapt", "EmbeddingMixup", "EmbeddingNoise", "EmbeddingRandomResizedCrop", "TokenEmbed"]


def _codebook(codebook: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2 or not codebook.is_floating_point() \
            or 0 in codebook.shape:
        raise ValueError(f"{name}: codebook must be a non-empty float tensor (vocab_size, dim)")
    if not bool(torch.isfinite(codebook).all()):
        raise ValueError(f"{name}: codebook contains non-finite values")
    return codebook.detach().to(torch.float32)


def _embeddings(batch: Mapping, name: str) -> torch.Tensor:
    x = batch.get("embeddings")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: batch['embeddings'] must be a float tensor (B, C, H, W), got {got}; "
                         f"run TokenEmbed first")
    return x


class TokenEmbed:
    """Look tokens up in the codebook: the bridge from stage 1 to stage 2.

    Parameters:
        codebook: float (vocab_size, dim) VQ codebook.
        one_hot: emit one-hot maps (B, vocab_size, H, W) instead of
            embeddings (B, dim, H, W); SeiT resizes one-hot maps and applies
            the codebook afterwards (as a 1x1 conv in the model stem).

    Adds `embeddings` float32; keeps `tokens` and labels. Tokens must be a
    (B, H, W) grid with ids in [0, vocab_size).

    Citation: SeiT, Park et al., ICCV 2023 (Fig. 3: one-hot conversion and
    codebook projection of the token grid).
    """

    def __init__(self, codebook: torch.Tensor, one_hot: bool = False):
        self.codebook = _codebook(codebook, type(self).__name__)
        self.one_hot = bool(one_hot)
        self._books: dict = {}

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        name = type(self).__name__
        out = _new_batch(batch, generator, name)
        tokens = _tokens(batch, name, spatial=True)
        vocab = self.codebook.shape[0]
        _check_range(tokens, vocab, name)
        if self.one_hot:
            maps = F.one_hot(tokens.long(), vocab).to(torch.float32)
        else:
            maps = F.embedding(tokens.long(), _on(self._books, self.codebook, tokens.device))
        out["embeddings"] = maps.permute(0, 3, 1, 2).contiguous()
        return out


class EmbeddingRandomResizedCrop:
    """SeiT's random resized crop of embedding / one-hot maps, bilinear.

    Parameters:
        size: output map (h, w), or an int for a square map.
        scale: range of the box area as a fraction of the map's area.
        ratio: range of the box aspect ratio (width / height), log-uniform.

    Boxes are sampled like TokenRandomResizedCrop (torchvision semantics,
    whole-cell edges); each box is resampled to `size` with bilinear
    grid_sample (align_corners=False, border padding) through one affine grid
    per sample, so the whole batch is one call. A full box at the input size
    is the identity. `embeddings` (B, C, H, W) -> (B, C, h, w); labels and
    `tokens` are untouched.

    Citation: SeiT, Park et al., ICCV 2023 (Fig. 3: random resized crop of
    the one-hot token map, token augmentations section).
    """

    def __init__(self, size: int | Sequence[int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3)):
        name = type(self).__name__
        self.size = _size(size, name)
        self.scale = _range_pair(scale, name, "scale", upper=1.0)
        self.ratio = _range_pair(ratio, name, "ratio")

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        name = type(self).__name__
        out = _new_batch(batch, generator, name)
        x = _embeddings(batch, name)
        b, c, height, width = x.shape
        boxes = _sample_boxes(generator, b, height, width, self.scale, self.ratio)
        top, left, h, w = (torch.from_numpy(v).double() for v in boxes)
        # Maps output normalized coords onto the box: with align_corners=False
        # cell centers land on cell centers, so the full box is exactly identity.
        theta = torch.zeros(b, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = w / width
        theta[:, 0, 2] = (2 * left + w) / width - 1
        theta[:, 1, 1] = h / height
        theta[:, 1, 2] = (2 * top + h) / height - 1
        if b == 0:  # affine_grid rejects an empty batch
            out["embeddings"] = x.new_empty(0, c, *self.size)
            return out
        theta = theta.to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, [b, c, *self.size], align_corners=False)
        out["embeddings"] = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out


class EmbeddingNoise:
    """SeiT's Emb-Noise: additive Gaussian noise scaled per channel by the codebook.

    Parameters:
        codebook: float (vocab_size, dim) codebook whose per-channel standard
            deviation sigma_c (over codes, unbiased) sets the noise scale.
            For one-hot maps pass torch.eye(vocab_size).
        rel_std: noise standard deviation RELATIVE to sigma_c: channel c gets
            N(0, (rel_std * sigma_c)^2), so one value fits any codebook scale.
        p: probability that a sample receives noise.

    `embeddings` (B, C, H, W) with C == dim gets the noise; labels and
    `tokens` are untouched. The noise is drawn on CPU (for device-independent
    results) and moved to the embeddings' device.

    Citation: SeiT, Park et al., ICCV 2023 (token augmentations section,
    Emb-Noise).
    """

    def __init__(self, codebook: torch.Tensor, rel_std: float = 0.1, p: float = 1.0):
        name = type(self).__name__
        cb = _codebook(codebook, name)
        if cb.shape[0] < 2:
            raise ValueError(f"{name}: need at least 2 codes to measure the codebook's spread")
        if isinstance(rel_std, bool) or not isinstance(rel_std, (int, float)) or not 0 <= rel_std < float("inf"):
            raise ValueError(f"{name}: rel_std must be a finite number >= 0, got {rel_std!r}")
        self.rel_std = float(rel_std)
        self.p = _prob(p, name)
        self.channel_std = cb.std(dim=0)
        self._scales: dict = {}

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        name = type(self).__name__
        out = _new_batch(batch, generator, name)
        x = _embeddings(batch, name)
        if x.shape[1] != self.channel_std.numel():
            raise ValueError(f"{name}: embeddings have {x.shape[1]} channels, codebook has "
                             f"{self.channel_std.numel()}")
        apply = _applied(generator, x.shape[0], self.p)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        noise *= (apply[:, None, None, None] * self.rel_std) * self.channel_std[None, :, None, None]
        out["embeddings"] = x + noise.to(device=x.device, dtype=x.dtype)
        return out


class ColorAdapt:
    """SeiT++'s ColorAdapt: AdaIN-style swap of per-channel statistics between samples.

    Parameters:
        p: probability that a sample is adapted.
        eps: added to variances before the square root (flat channels).

    Each selected sample i is re-normalized to the statistics of a partner
    j = perm[i] from a random permutation of the batch:
    x_i' = (x_i - mean_i) / std_i * std_j + mean_j, with mean/std over (H, W)
    per channel (population std). Channel statistics carry the image's
    global colour/contrast, so this is colour jitter that stays on the
    embedding manifold. Labels and `tokens` are untouched.

    Citation: SeiT++, Lee et al., ECCV 2024 (arXiv 2312.10105; ColorAdapt);
    AdaIN, Huang & Belongie, ICCV 2017.
    """

    def __init__(self, p: float = 0.5, eps: float = 1e-5):
        name = type(self).__name__
        self.p = _prob(p, name)
        self.eps = _positive_float(eps, name, "eps")

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        name = type(self).__name__
        out = _new_batch(batch, generator, name)
        x = _embeddings(batch, name)
        b = x.shape[0]
        apply = _applied(generator, b, self.p).to(x.device)
        partner = torch.randperm(b, generator=generator).to(x.device)
        if x.numel() == 0:  # no statistics to take
            out["embeddings"] = x.clone()
            return out
        var, mean = torch.var_mean(x, dim=(2, 3), correction=0, keepdim=True)
        std = torch.sqrt(var + self.eps)
        adapted = (x - mean) / std * std[partner] + mean[partner]
        out["embeddings"] = torch.where(apply[:, None, None, None], adapted, x)
        return out


class EmbeddingMixup:
    """Mixup in embedding space with soft-label targets.

    Parameters:
        num_classes: number of classes of the soft `target`.
        alpha: Beta(alpha, alpha) parameter of the mixing weight lambda.
        p: probability that a sample is mixed (unmixed samples keep lambda = 1).

    Sample i's partner is sample i-1 (torch.roll(x, 1, 0), as TokenCutMix).
    Per sample, embeddings = lambda * own + (1 - lambda) * partner and
    `target` (B, num_classes) float32 is the same combination of the own
    target (an existing `target`, else one_hot(label)) and the partner's.
    Unlabeled samples (label -1) raise ValueError, as in TokenCutMix.

    Citation: mixup, Zhang et al., ICLR 2018; applied after the codebook
    lookup, where SeiT (Park et al., ICCV 2023, Fig. 3) mixes its inputs.
    """

    def __init__(self, num_classes: int, alpha: float = 0.8, p: float = 1.0):
        name = type(self).__name__
        self.num_classes = _positive_int(num_classes, name, "num_classes")
        self.alpha = _positive_float(alpha, name, "alpha")
        self.p = _prob(p, name)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        name = type(self).__name__
        out = _new_batch(batch, generator, name)
        x = _embeddings(batch, name)
        b = x.shape[0]
        apply = _applied(generator, b, self.p)
        lam = torch.where(apply, _beta(generator, self.alpha, b), 1.0)
        out["target"] = _mixed_target(batch, self.num_classes, lam, name)
        w = lam.to(device=x.device, dtype=x.dtype)[:, None, None, None]
        out["embeddings"] = w * x + (1 - w) * x.roll(1, 0)
        return out
