"""Batched, deterministic token-space augmentations (SeiT / SeiT++ / Token-EDA).

Batch contract (what the streaming loader produces):

* ``tokens``: int64 ``(B, H, W)`` token grids (``(B, L)`` for 1-D sequence
  datasets), ids in ``[0, vocab_size)``;
* ``label``: int64 ``(B,)``, ``-1`` where a sample has no label;
* ``key``: ``list[str]`` of length B;
* any other key, passed through untouched.

An augmentation is a callable ``aug(batch, generator) -> dict``. It returns a
new dict (the input dict and its tensors are never modified), draws all its
randomness from ``generator`` (a CPU ``torch.Generator``), and works on the
whole batch with vectorized ops. The same batch and generator state give
bit-identical output, which is what makes a loader that seeds one generator
per (seed, epoch, rank, batch index) reproducible and resumable.

Two stages:

1. token space (CPU, loader workers; int64 in and out): ``TokenRandomResizedCrop``,
   ``TokenHFlip``, ``TokenCutMix``, ``TokenSynonymReplace``, ``TokenPatchSwap``;
2. embedding space (training device; float ``embeddings`` ``(B, C, H, W)``):
   ``TokenEmbed`` (tokens -> embeddings or one-hot maps),
   ``EmbeddingRandomResizedCrop``, ``EmbeddingNoise``, ``ColorAdapt``,
   ``EmbeddingMixup``.

Mixing augmentations add ``target`` (float32 ``(B, num_classes)`` soft labels)
and mix an existing ``target`` again, so e.g. CutMix then Mixup compose.
See ``docs/augmentations.md`` for the table of parameters and citations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .augment_embed import ColorAdapt, EmbeddingMixup, EmbeddingNoise, EmbeddingRandomResizedCrop, TokenEmbed
from .augment_tokens import (
    TokenCutMix,
    TokenHFlip,
    TokenPatchSwap,
    TokenRandomResizedCrop,
    TokenSynonymReplace,
    _new_batch,
    codebook_neighbours,
)

__all__ = [
    "ColorAdapt", "Compose", "EmbeddingMixup", "EmbeddingNoise", "EmbeddingRandomResizedCrop",
    "TokenCutMix", "TokenEmbed", "TokenHFlip", "TokenPatchSwap", "TokenRandomResizedCrop",
    "TokenSynonymReplace", "codebook_neighbours",
]

Augmentation = Callable[[dict, torch.Generator], dict]


class Compose:
    """Apply augmentations in order, all drawing from the same generator.

    Parameters:
        augmentations: callables ``aug(batch, generator) -> dict``.

    Sharing one generator keeps the whole chain reproducible from a single
    per-batch seed. An empty chain returns a shallow copy of the batch.
    """

    def __init__(self, augmentations: Iterable[Augmentation]):
        self.augmentations = list(augmentations)
        for i, aug in enumerate(self.augmentations):
            if not callable(aug):
                raise ValueError(f"Compose: item {i} is not callable: {aug!r}")

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        out = _new_batch(batch, generator, type(self).__name__)
        for aug in self.augmentations:
            out = aug(out, generator)
        return out

    def __repr__(self) -> str:
        inner = ", ".join(type(a).__name__ for a in self.augmentations)
        return f"Compose([{inner}])"
