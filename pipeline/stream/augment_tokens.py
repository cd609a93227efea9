"""Stage-1 augmentations: integer token grids in, integer token grids out.

These run on CPU in the loader workers, before any embedding lookup, so they
only ever move, copy or substitute token ids. See `tokshard.pipeline.stream.augment`
for the batch contract and `docs/augmentations.md` for the overview table.

Every random number is drawn from the caller's CPU `torch.Generator`, in a
fixed amount that does not depend on the data, so a batch plus a generator
state replays bit-identically (the loader seeds one generator per batch).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "TokenCutMix", "TokenHFlip", "TokenPatchSwap", "TokenRandomResizedCrop",
    "TokenSynonymReplace", "codebook_neighbours",
]


# ---------------------------------------------------------------- helpers
# Shared with augment_embed (same package, private to the augment modules).

def _new_batch(batch: Mapping, generator: torch.Generator, name: str) -> dict:
    if not isinstance(batch, Mapping):
        raise TypeError(f"{name}: batch must be a dict, got {type(batch).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name}: generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"{name}: generator must be a CPU generator, got one on {generator.device}")
    # A shallow copy is enough because augmentations only ever rebind keys to
    # new tensors; they never write into the caller's tensors.
    return dict(batch)


def _tokens(batch: Mapping, name: str, spatial: bool) -> torch.Tensor:
    t = batch.get("tokens")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: batch['tokens'] must be a tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name}: batch['tokens'] must hold integer token ids, got {t.dtype}")
    if spatial and t.dim() != 3:
        raise ValueError(
            f"{name} is spatial and needs 2-D token grids of shape (B, H, W); got tokens of "
            f"shape {tuple(t.shape)} (1-D sequence datasets have no grid to crop/flip/paste)")
    if not spatial and t.dim() < 1:
        raise ValueError(f"{name}: batch['tokens'] needs a batch dimension, got a scalar")
    return t


def _check_range(tokens: torch.Tensor, vocab: int, name: str) -> None:
    # Table lookups with an out-of-vocabulary id fail with an opaque index
    # error on CPU and a device-side assert on GPU; name the problem instead.
    if tokens.numel():
        lo, hi = torch.aminmax(tokens)
        if int(lo) < 0 or int(hi) >= vocab:
            raise ValueError(f"{name}: token ids must be in [0, {vocab}), got range [{int(lo)}, {int(hi)}]")


def _prob(p: Any, name: str, what: str = "p") -> float:
    # numbers.Real's stub declares no __ge__, so `0.0 <= p` looks unsupported; every Real compares.
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:  # type: ignore[operator]
        raise ValueError(f"{name}: {what} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _positive_int(v: Any, name: str, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name}: {what} must be a positive integer, got {v!r}")
    return int(v)


def _positive_float(v: Any, name: str, what: str) -> float:
    # numbers.Real's stub declares no __gt__, so `0 < v` looks unsupported; every Real compares.
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0 < v < math.inf):  # type: ignore[operator]
        raise ValueError(f"{name}: {what} must be a positive finite number, got {v!r}")
    return float(v)


def _size(size: Any, name: str) -> tuple[int, int]:
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"{name}: size must be an int or an (h, w) pair, got {size!r}")
    return (_positive_int(size[0], name, "size[0]"), _positive_int(size[1], name, "size[1]"))


def _range_pair(v: Any, name: str, what: str, upper: float = math.inf) -> tuple[float, float]:
    ok = isinstance(v, (tuple, list)) and len(v) == 2 and all(
        isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v)
    if not ok or not (0 < v[0] <= v[1] <= upper) or not math.isfinite(v[1]):
        bound = "" if upper == math.inf else f" <= {upper:g}"
        raise ValueError(f"{name}: {what} must be a pair (lo, hi) with 0 < lo <= hi{bound}, got {v!r}")
    return float(v[0]), float(v[1])


def _applied(generator: torch.Generator, n: int, p: float) -> torch.Tensor:
    """Bernoulli(p) per sample; always draws n numbers so the stream length is fixed."""
    return torch.rand(n, generator=generator, dtype=torch.float64) < p


def _beta(generator: torch.Generator, alpha: float, n: int) -> torch.Tensor:
    # torch's Beta/Gamma samplers cannot take a generator, so derive a numpy
    # stream from it: still fully determined by the generator state.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n))


def _on(cache: dict, table: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Tables are copied to a device once, not once per batch.
    if device not in cache:
        cache[device] = table.to(device)
    return cache[device]


def _sample_boxes(generator: torch.Generator, n: int, height: int, width: int, scale: tuple[float, float],
                  ratio: tuple[float, float], attempts: int = 10,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torchvision RandomResizedCrop boxes, for n samples at once.

    Each sample gets `attempts` (area, aspect) candidates and keeps the first
    that fits the grid; samples where none fits fall back to torchvision's
    ratio-clamped center crop. Returns int64 numpy arrays (top, left, h, w):
    the arithmetic runs in numpy because its per-op overhead is a fraction of
    torch's on these tiny arrays (this sits on the loader's hot path).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    u = torch.rand(n, attempts, 2, generator=generator, dtype=torch.float64).numpy()
    offset = torch.rand(n, 2, generator=generator, dtype=torch.float64).numpy()
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    # np.rint is round-half-to-even, like Python's round() in torchvision.
    w = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)  # index of the first fitting candidate (0 if none)
    rows = np.arange(n)
    w, h, found = w[rows, first], h[rows, first], fits[rows, first]

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    w = np.where(found, w, fw)
    h = np.where(found, h, fh)
    top = np.minimum((offset[:, 0] * (height - h + 1)).astype(np.int64), height - h)
    left = np.minimum((offset[:, 1] * (width - w + 1)).astype(np.int64), width - w)
    top = np.where(found, top, (height - h) // 2)
    left = np.where(found, left, (width - w) // 2)
    return top, left, h, w


def _mixed_target(batch: Mapping, num_classes: int, lam: torch.Tensor, name: str) -> torch.Tensor:
    """lam * own target + (1 - lam) * target of the sample rolled in (torch.roll by 1).

    An existing batch['target'] (from an earlier mix) is mixed again, so
    chained mixes stay consistent with what the inputs now contain.
    """
    n = lam.shape[0]
    target = batch.get("target")
    if target is not None:
        if not isinstance(target, torch.Tensor) or target.shape != (n, num_classes) or not target.is_floating_point():
            raise ValueError(f"{name}: existing batch['target'] must be a float tensor of shape ({n}, {num_classes})")
        own = target.to(torch.float32)
    else:
        labels = batch.get("label")
        if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.is_floating_point():
            raise ValueError(f"{name}: batch['label'] must be an integer tensor of shape ({n},)")
        unlabeled = int((labels == -1).sum())
        if unlabeled:
            raise ValueError(
                f"{name}: {unlabeled} of {n} samples have label -1 (unlabeled); label mixing needs a "
                f"label for every sample. Filter unlabeled samples out or leave this augmentation off.")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"{name}: labels must be in [0, {num_classes}) or -1, "
                             f"got range [{int(labels.min())}, {int(labels.max())}]")
        own = torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float32)
    lam = lam.to(device=own.device, dtype=torch.float32)[:, None]
    return lam * own + (1.0 - lam) * own.roll(1, 0)


# ------------------------------------------------------------ augmentations

class TokenRandomResizedCrop:
    """Random resized crop of the token grid with nearest-neighbour resampling.

    Parameters:
        size: output grid (h, w), or an int for a square grid.
        scale: range of the box area as a fraction of the token grid's area.
        ratio: range of the box aspect ratio (width / height), sampled log-uniformly.
        mode: "nearest" (the only mode: token ids cannot be interpolated; use
            TokenEmbed + EmbeddingRandomResizedCrop for bilinear resampling).

    Tokens (B, H, W) -> (B, h, w). Boxes follow torchvision's
    RandomResizedCrop: 10 candidates per sample, the first that fits wins,
    else a ratio-clamped center crop. Box edges are whole tokens. Output cell
    k of a box of length L at `start` reads source cell
    start + floor((k + 0.5) * L / out) (pixel-center, "nearest-exact"), so a
    full box at the same size is the identity. Labels are untouched.

    Citation: SeiT, Park et al., ICCV 2023 (Fig. 3 pipeline, token
    augmentations section), where RRC runs on the token grid before embedding.
    """

    def __init__(self, size: int | Sequence[int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), mode: str = "nearest"):
        name = type(self).__name__
        self.size = _size(size, name)
        self.scale = _range_pair(scale, name, "scale", upper=1.0)
        self.ratio = _range_pair(ratio, name, "ratio")
        if mode != "nearest":
            raise ValueError(f"{name}: mode must be 'nearest' (token ids cannot be interpolated), got {mode!r}")
        self.mode = mode
        oh, ow = self.size
        # 2k+1 numerators of the pixel-center rule; integer math keeps the
        # index exact (no float floor jitter at box edges).
        self._num_h = 2 * np.arange(oh, dtype=np.int64) + 1
        self._num_w = 2 * np.arange(ow, dtype=np.int64) + 1

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        name = type(self).__name__
        out = _new_batch(batch, generator, name)
        tokens = _tokens(batch, name, spatial=True)
        b, height, width = tokens.shape
        oh, ow = self.size
        top, left, h, w = _sample_boxes(generator, b, height, width, self.scale, self.ratio)
        rows = top[:, None] + (self._num_h[None, :] * h[:, None]) // (2 * oh)
        cols = left[:, None] + (self._num_w[None, :] * w[:, None]) // (2 * ow)
        flat = torch.from_numpy((rows[:, :, None] * width + cols[:, None, :]).reshape(b, oh * ow))
        flat = flat.to(tokens.device)
        out["tokens"] = tokens.reshape(b, height * width).gather(1, flat).reshape(b, oh, ow)
        return out


class TokenHFlip:
    """Horizontal flip of the token grid for a random subset of samples.

    Parameters:
        p: probability that a sample is flipped.
        flip_map: optional int64 (vocab_size,) table mapping each code to the
            code of its mirrored patch, for tokenizers that declare one. A
            plain grid flip mirrors the layout but not each patch's content,
            so the map is what makes the result the tokenization of the
            mirrored image.

    Flipped samples get tokens.flip(-1) (then remapped through flip_map when
    given); other samples are copied unchanged. Labels are untouched.

    Citation: standard horizontal flip as used on token grids by SeiT, Park et
    al., ICCV 2023 (token augmentations section).
    """

    def __init__(self, p: float = 0.5, flip_map: torch.Tensor | None = None):
        name = type(self).__name__
        self.p = _prob(p, name)
        if flip_map is not None:
            if not isinstance(flip_map, torch.Tensor) or flip_map.dim() != 1 or flip_map.is_floating_point():
                raise ValueError(f"{name}: flip_map must be a 1-D integer tensor (vocab_size,)")
            flip_map = flip_map.to(torch.int64)
            _check_range(flip_map, flip_map.numel(), f"{name} flip_map")
        self.flip_map = flip_map
        self._maps: dict = {}

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        name = type(self).__name__
        out = _new_batch(batch, generator, name)
        tokens = _tokens(batch, name, spatial=True)
        flip = _applied(generator, tokens.shape[0], self.p).to(tokens.device)
        flipped = tokens.flip(-1)
        if self.flip_map is not None:
            _check_range(tokens, self.flip_map.numel(), name)
            flipped = _on(self._maps, self.flip_map, tokens.device)[flipped]
        out["tokens"] = torch.where(flip[:, None, None], flipped, tokens)
        return out


class TokenCutMix:
    """SeiT's Token-CutMix: paste a box of the partner's token grid, mix labels by area.

    Parameters:
        num_classes: number of classes of the soft `target`.
        alpha: Beta(alpha, alpha) parameter of the kept-area fraction lambda.
        p: probability that a sample is mixed (unmixed samples keep their own
            tokens and a one-hot target).

    Sample i's partner is sample i-1 (the batch rolled by one,
    torch.roll(x, 1, 0), as in timm). Per sample, lambda ~ Beta(alpha, alpha)
    sets a box of side sqrt(1 - lambda) of the grid at a uniform center
    (timm's rand_bbox, clipped at the border); the box is pasted from the
    partner and lambda is corrected to the actual kept fraction. Adds
    `target` (B, num_classes) float32 = lambda * own + (1 - lambda) * partner,
    where "own" is an existing `target` if present (chained mixes) else
    one_hot(label). `label` itself is passed through unchanged.

    Unlabeled samples (label -1) raise ValueError: their share of the mixed
    target is undefined. Filter them out or skip CutMix for such data.

    Citation: SeiT, Park et al., ICCV 2023 (token augmentations section,
    Token-CutMix); CutMix, Yun et al., ICCV 2019.
    """

    def __init__(self, num_classes: int, alpha: float = 1.0, p: float = 1.0):
        name = type(self).__name__
        self.num_classes = _positive_int(num_classes, name, "num_classes")
        self.alpha = _positive_float(alpha, name, "alpha")
        self.p = _prob(p, name)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        name = type(self).__name__
        out = _new_batch(batch, generator, name)
        tokens = _tokens(batch, name, spatial=True)
        b, height, width = tokens.shape
        apply = _applied(generator, b, self.p)
        lam = _beta(generator, self.alpha, b)
        center = torch.rand(b, 2, generator=generator, dtype=torch.float64)
        cut = torch.sqrt(1.0 - lam)
        half_h = torch.where(apply, (height * cut).long(), 0) // 2
        half_w = torch.where(apply, (width * cut).long(), 0) // 2
        cy = (center[:, 0] * height).long()
        cx = (center[:, 1] * width).long()
        y0, y1 = (cy - half_h).clamp(0, height), (cy + half_h).clamp(0, height)
        x0, x1 = (cx - half_w).clamp(0, width), (cx + half_w).clamp(0, width)
        kept = 1.0 - ((y1 - y0) * (x1 - x0)).double() / (height * width)
        target = _mixed_target(batch, self.num_classes, kept, name)

        dev = tokens.device
        r = torch.arange(height, device=dev)[None, :, None]
        c = torch.arange(width, device=dev)[None, None, :]
        y0, y1, x0, x1 = (v.to(dev)[:, None, None] for v in (y0, y1, x0, x1))
        box = (r >= y0) & (r < y1) & (c >= x0) & (c < x1)
        out["tokens"] = torch.where(box, tokens.roll(1, 0), tokens)
        out["target"] = target
        return out


def codebook_neighbours(codebook: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Each code's k nearest other codes by L2 distance: int64 (V, k), nearest first.

    The code itself is excluded; ties go to the lower code index. Distances
    are computed as exact float64 differences (not the |a|^2+|b|^2-2ab
    shortcut) so equal distances compare equal and the table is reproducible.
    """
    name = "codebook_neighbours"
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2 or not codebook.is_floating_point():
        raise ValueError(f"{name}: codebook must be a float tensor (V, D)")
    v = codebook.shape[0]
    k = _positive_int(k, name, "k")
    if k > v - 1:
        raise ValueError(f"{name}: k must be at most V - 1 = {v - 1} (the code itself is excluded), got {k}")
    if not bool(torch.isfinite(codebook).all()):
        raise ValueError(f"{name}: codebook contains non-finite values")
    cb = codebook.detach().to("cpu", torch.float64)
    parts = []
    for start in range(0, v, chunk):
        d = torch.cdist(cb[start:start + chunk], cb, compute_mode="donot_use_mm_for_euclid_dist")
        rows = torch.arange(d.shape[0])
        d[rows, rows + start] = math.inf
        parts.append(torch.sort(d, dim=1, stable=True).indices[:, :k])
    return torch.cat(parts)


class TokenSynonymReplace:
    """Token-EDA synonym replacement: swap tokens for nearby codebook entries.

    Parameters:
        neighbours: int64 (vocab_size, k) table of each code's k "synonyms",
            e.g. codebook_neighbours(codebook, k).
        p: per-token replacement probability.

    Each token is independently replaced with probability p by one of its k
    neighbours chosen uniformly. Works on any token shape (grids or 1-D
    sequences). Labels are untouched.

    Citation: SeiT, Park et al., ICCV 2023 (token augmentations section,
    Token-EDA); EDA, Wei & Zou, EMNLP 2019 (synonym replacement).
    """

    def __init__(self, neighbours: torch.Tensor, p: float = 0.1):
        name = type(self).__name__
        if not isinstance(neighbours, torch.Tensor) or neighbours.dim() != 2 or neighbours.is_floating_point() \
                or neighbours.shape[1] < 1:
            raise ValueError(f"{name}: neighbours must be an integer tensor (vocab_size, k) with k >= 1")
        self.neighbours = neighbours.to(torch.int64)
        _check_range(self.neighbours, self.neighbours.shape[0], f"{name} neighbours")
        self.p = _prob(p, name)
        self._tables: dict = {}

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        name = type(self).__name__
        out = _new_batch(batch, generator, name)
        tokens = _tokens(batch, name, spatial=False)
        vocab, k = self.neighbours.shape
        _check_range(tokens, vocab, name)
        dev = tokens.device
        replace = (torch.rand(tokens.shape, generator=generator) < self.p).to(dev)
        pick = torch.randint(0, k, tokens.shape, generator=generator).to(dev)
        synonyms = _on(self._tables, self.neighbours, dev)[tokens.long(), pick].to(tokens.dtype)
        out["tokens"] = torch.where(replace, synonyms, tokens)
        return out


class TokenPatchSwap:
    """Token-EDA random swap: exchange n random pairs of token positions.

    Parameters:
        n_swaps: number of position pairs swapped (in sequence) per selected sample.
        p: probability that a sample is selected.

    Positions index the flattened non-batch dims, so grids and 1-D sequences
    both work. The two positions of a pair always differ. The swaps compose
    into a per-sample permutation, so each sample keeps its multiset of
    tokens. Labels are untouched.

    Citation: SeiT, Park et al., ICCV 2023 (token augmentations section,
    Token-EDA); EDA, Wei & Zou, EMNLP 2019 (random swap).
    """

    def __init__(self, n_swaps: int = 1, p: float = 0.5):
        name = type(self).__name__
        self.n_swaps = _positive_int(n_swaps, name, "n_swaps")
        self.p = _prob(p, name)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        name = type(self).__name__
        out = _new_batch(batch, generator, name)
        tokens = _tokens(batch, name, spatial=False)
        if tokens.dim() < 2:
            raise ValueError(f"{name}: tokens must be (B, L) or (B, H, W), got shape {tuple(tokens.shape)}")
        b, n = tokens.shape[0], math.prod(tokens.shape[1:])
        if n < 2:
            out["tokens"] = tokens.clone()
            return out
        apply = _applied(generator, b, self.p)
        first = torch.randint(0, n, (b, self.n_swaps), generator=generator)
        # A nonzero offset guarantees each swap moves two distinct positions.
        second = (first + torch.randint(1, n, (b, self.n_swaps), generator=generator)) % n
        perm = torch.arange(n).repeat(b, 1)
        for s in range(self.n_swaps):  # loop over swaps, not samples
            a, c = first[:, s:s + 1], second[:, s:s + 1]
            va, vc = perm.gather(1, a), perm.gather(1, c)
            perm.scatter_(1, a, vc)
            perm.scatter_(1, c, va)
        dev = tokens.device
        flat = tokens.reshape(b, n)
        swapped = flat.gather(1, perm.to(dev))
        out["tokens"] = torch.where(apply.to(dev)[:, None], swapped, flat).reshape(tokens.shape)
        return out
