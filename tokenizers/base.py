"""The tokenizer interface every plugin implements.

A tokenizer maps a batch of square uint8 RGB images to integer codes on a
fixed grid, and (optionally) back; one that declares a `patch_size` also takes
images of any size in whole cells (variable grids, `--resize-mode area`). A
`ClipTokenizer` also takes whole video clips (T frames -> one 3-D grid of
codes); the convert job tells the two apart by type. Its identity is three hashes: the id of the
family and version, the hash of its config, and the hash of its codebook/
weights. The manifest records all three so a dataset says exactly which
tokenizer wrote it, and an append with a different one can be refused.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike

from tokshard.errors import TokenizerError


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: a stable input for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TokenizerIdentity:
    tokenizer_id: str      # family/version, e.g. "kmeans-vq/1"
    config_hash: str       # sha256 of the canonical config JSON
    codebook_hash: str     # sha256 of the weights that decide the codes

    def as_dict(self) -> dict[str, str]:
        return {
            "tokenizer_id": self.tokenizer_id,
            "tokenizer_config_hash": self.config_hash,
            "codebook_hash": self.codebook_hash,
        }


class Tokenizer(abc.ABC):
    """Images (N, R, R, 3) uint8 -> codes (N, h, w) of integers < vocab_size.

    Everything the pipeline calls on a tokenizer is declared here. Subclasses
    implement the abstract members; `load`/`from_options` (how an artifact and
    CLI options become an instance), `decode`, `codebook` and `save` have
    defaults that say the tokenizer cannot do it.

    Variable grids: `patch_size` is None by default, "fixed grid only": `encode`
    takes (N, R, R, 3) and nothing else. A tokenizer whose `patch_size` is an int p
    (one code per p x p cell, e.g. a convolutional encoder downsampling by p, or a
    per-patch quantiser) also takes, in one `encode` call, any batch (N, H, W, 3)
    uint8 with H and W positive multiples of p (one shape per call), and returns
    (N, H // p, W // p) codes; the square (N, R, R, 3) still gives exactly the codes
    of the fixed grid. Its `decode`, if it has one, takes (N, h, w) codes of any
    h, w >= 1 and returns (N, h * p, w * p, 3). `check_images` and `check_codes`
    accept those shapes for it.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    # Images per `encode` call the convert job makes (an instance may set its own).
    batch_size: int = 64
    # True when loading an artifact can run code stored in it (TorchScript, pickles):
    # a dataset's copy of such an artifact is loaded only with the user's consent
    # (`trust_tokenizer_code`, docs/security.md). Plain weights (safetensors,
    # `torch.load(weights_only=True)`) run nothing.
    runs_code: ClassVar[bool] = False

    @classmethod
    def load(cls, directory: str | os.PathLike, **options: Any) -> Tokenizer:
        """Rebuild from the artifact `save` wrote (the copy a dataset keeps, or what a
        distributed engine shipped). Read the files here: the folder may be deleted
        once this returns."""
        raise NotImplementedError(f"tokenizer {cls.name!r} cannot be loaded from an artifact")

    @classmethod
    def from_options(cls, path: str | None = None, **options: Any) -> Tokenizer:
        """Build from `--tokenizer-opt` values (strings) or Python values; `path` is the artifact."""
        if path is None:
            raise TokenizerError(f"tokenizer {cls.name!r} needs path=DIR (its artifact)")
        return cls.load(path, **options)

    @property
    @abc.abstractmethod
    def resolution(self) -> int:
        """Side of the square input images, in pixels."""

    @property
    @abc.abstractmethod
    def grid_shape(self) -> tuple[int, ...]:
        """Shape of one sample's codes, e.g. (16, 16)."""

    @property
    def patch_size(self) -> int | None:
        """Pixels per code along each side when the tokenizer takes any (H, W) multiple of
        it (variable grids: (N, H, W, 3) -> (N, H // p, W // p)); None: the fixed
        (resolution, resolution) input and grid_shape only."""
        return None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct codes."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Everything (besides weights) that decides the codes; JSON-able."""

    @abc.abstractmethod
    def weights_digest(self) -> str:
        """sha256 of the weights/codebook that decide the codes."""

    @abc.abstractmethod
    def encode(self, images: np.ndarray) -> np.ndarray:
        """(N, R, R, 3) uint8 -> (N, *grid_shape) integer codes; with a `patch_size` p also
        (N, H, W, 3) -> (N, H // p, W // p)."""

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(N, *grid_shape) codes -> (N, R, R, 3) uint8 reconstructions; with a `patch_size` p
        also (N, h, w) -> (N, h * p, w * p, 3)."""
        raise NotImplementedError(f"tokenizer {self.name!r} has no decoder")

    def codebook(self) -> np.ndarray | None:
        """(vocab_size, dim) code embeddings, for embedding-space augmentation."""
        return None

    def save(self, directory: str) -> None:
        """Write the artifact (weights + config) so `load` can rebuild it."""
        raise NotImplementedError(f"tokenizer {self.name!r} cannot be saved")

    def identity(self) -> TokenizerIdentity:
        return TokenizerIdentity(
            tokenizer_id=f"{self.name}/{self.version}",
            config_hash=sha256_hex(canonical_json(self.config())),
            codebook_hash=self.weights_digest(),
        )

    def check_images(self, images: np.ndarray) -> None:
        """A ValueError unless `images` is (N, R, R, 3) uint8, or, with a `patch_size` p,
        (N, H, W, 3) uint8 with H and W positive multiples of p."""
        p = self.patch_size
        if p is None:
            r = self.resolution
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (r, r, 3):
                raise ValueError(
                    f"{self.name} expects (N, {r}, {r}, 3) uint8 images, got {images.shape} {images.dtype}"
                )
            return
        if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3
                or not all(s >= 1 and s % p == 0 for s in images.shape[1:3])):
            raise ValueError(
                f"{self.name} expects (N, H, W, 3) uint8 images with H and W positive multiples of {p}, "
                f"got {images.shape} {images.dtype}"
            )

    def check_codes(self, codes: ArrayLike, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """`codes` as an array of (N, *shape) integers in [0, vocab_size) (shape: the grid;
        with a `patch_size` and no `shape`, any (N, h, w) with h, w >= 1), for `decode`; a
        ValueError otherwise."""
        codes = np.asarray(codes)
        if shape is None and self.patch_size is not None:
            if codes.ndim != 3 or min(codes.shape[1:]) < 1:
                raise ValueError(f"{self.name} expects codes of shape (N, h, w) with h, w >= 1, got {codes.shape}")
        else:
            shape = tuple(self.grid_shape if shape is None else shape)
            if codes.ndim != len(shape) + 1 or tuple(codes.shape[1:]) != shape:
                raise ValueError(f"{self.name} expects codes of shape (N, {', '.join(map(str, shape))}), "
                                 f"got {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"{self.name} expects integer codes, got {codes.dtype}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.vocab_size):
            raise ValueError(f"{self.name}: codes out of range [0, {self.vocab_size})")
        return codes


class ClipTokenizer(Tokenizer):
    """A video tokenizer: a clip of T frames -> one (t, h, w) grid of codes.

    `encode` still takes single images (frames); the convert job hands a video
    job's clips to `encode_clips` whole."""

    @abc.abstractmethod
    def clip_grid_shape(self, num_frames: int) -> tuple[int, ...]:
        """Shape of one clip's codes; a ValueError for a clip length it cannot take."""

    @abc.abstractmethod
    def encode_clips(self, clips: np.ndarray) -> np.ndarray:
        """(N, T, R, R, 3) uint8 -> (N, *clip_grid_shape(T)) integer codes."""


def artifact_files(tok: Tokenizer) -> dict[str, bytes]:
    """The files `tok.save()` writes, as {relative posix path: bytes}, in sorted order:
    what a dataset keeps a copy of and what a distributed engine ships to its workers."""
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        return {p.relative_to(tmp).as_posix(): p.read_bytes()
                for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
