"""The embedded default tokenizer: a patch k-means vector quantiser.

Each non-overlapping p x p RGB patch is projected onto the top PCA directions
of the fitting data and replaced by the index of the nearest of K centroids.
It needs no download and no GPU, fits in seconds on a few hundred images, and
decodes (code -> mean patch of its cluster) so stored tokens can be looked at.
It stands in for learned VQ/FSQ tokenizers with the same interface.

Codes are per patch, so it takes images of any size on its patches (variable grids,
`patch_size`): an (H, W) image gets an (H/p, W/p) grid, each code that of its patch alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from tokshard.errors import TokenizerError
from tokshard.tokenizers.base import Tokenizer, sha256_hex
from tokshard.tokenizers.device import full_fp32, host_to_device, pick_device

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# Tensor name -> shape as a function of the config; the loader checks both.
# Images per distance block: 2 x 256 patches x 1024 codes x 4 B = 2 MiB, near cache size
# (much faster than whole batches on CPU). Fixed, so the blocks depend only on where images
# sit in a call, never on a setting or the machine.
_STEP = 2
# Near-tie margin, relative to the largest squared centroid norm (the distances' scale). The
# float32 distances differ from exact ones by ~1e-6 of that scale (3.5e-4 absolute against a
# scale of 233 on the default artifact, measured), and by other amounts on another BLAS or a
# GPU; within 1e-4 of the row's minimum, codes are decided again in float64 (see _nearest).
_TIE_MARGIN = 1e-4


def _expected_shapes(cfg: dict[str, int]) -> dict[str, tuple[int, ...]]:
    dim = cfg["patch_size"] ** 2 * 3
    return {
        "mean": (dim,),
        "basis": (dim, cfg["pca_dim"]),
        "centroids": (cfg["codebook_size"], cfg["pca_dim"]),
        "decoder": (cfg["codebook_size"], dim),
    }


class KMeansVQ(Tokenizer):
    name = "kmeans-vq"
    version = 1

    def __init__(
        self,
        weights: dict[str, np.ndarray],
        *,
        patch_size: int,
        resolution: int,
        fit_info: dict[str, Any] | None = None,
        device: str | None = None,
        batch_size: int = 64,
    ):
        if resolution % patch_size:
            raise TokenizerError(f"resolution {resolution} is not a multiple of patch size {patch_size}")
        cfg = {
            "patch_size": patch_size,
            "codebook_size": int(weights["centroids"].shape[0]),
            "pca_dim": int(weights["centroids"].shape[1]),
        }
        _check_weights(weights, cfg)
        self._cfg = cfg
        self._resolution = resolution
        self.fit_info = fit_info or {}
        self.batch_size = batch_size
        self.device = pick_device(device)
        # float32 for the encoder (the codes depend on it); the decoder only
        # affects previews, so it is stored in float16.
        self._weights = {k: np.ascontiguousarray(v, dtype=np.float32 if k != "decoder" else np.float16)
                         for k, v in weights.items()}
        t = {k: torch.from_numpy(v.astype(np.float32)).to(self.device) for k, v in self._weights.items()}
        self._mean, self._basis, self._centroids, self._decoder = t["mean"], t["basis"], t["centroids"], t["decoder"]
        # z = (x/255 - mean) @ basis, folded so the uint8 pixels enter the matmul
        # as they are: one pass over the patches instead of three.
        # Right operands are transposed views of row-major matrices: BLAS's
        # fastest variant for these thin shapes (20% faster than contiguous).
        self._basis_u8 = (self._basis / 255.0).T.contiguous().T
        self._mean_z = (self._mean @ self._basis).contiguous()
        self._centroid_sq = (self._centroids ** 2).sum(1)
        self._tie = float(_TIE_MARGIN * self._centroid_sq.max()) if len(self._centroid_sq) else 0.0
        w64 = {k: torch.from_numpy(self._weights[k].astype(np.float64)).to(self.device)
               for k in ("mean", "basis", "centroids")}
        self._basis64, self._mean64, self._centroids64 = w64["basis"], w64["mean"], w64["centroids"]
        self._centroid_sq64 = (self._centroids64 ** 2).sum(1)

    # --- interface -------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self._resolution

    @property
    def patch_size(self) -> int:
        """Any (H, W) multiple of it encodes (variable grids): the codes are per patch."""
        return self._cfg["patch_size"]

    @property
    def grid_shape(self) -> tuple[int, int]:
        g = self._resolution // self.patch_size
        return (g, g)

    @property
    def vocab_size(self) -> int:
        return self._cfg["codebook_size"]

    def config(self) -> dict[str, Any]:
        return {**self._cfg, "resolution": self._resolution}

    def weights_digest(self) -> str:
        return sha256_hex(b"".join(
            name.encode() + self._weights[name].tobytes() for name in sorted(self._weights)
        ))

    def codebook(self) -> np.ndarray:
        return self._weights["centroids"].copy()

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> np.ndarray:
        self.check_images(images)
        p = self.patch_size
        grid = (images.shape[1] // p, images.shape[2] // p)   # grid_shape for the square input
        out = np.empty((len(images), *grid), dtype=np.int64)
        # Fixed-size chunks: the codes of an image must not depend on which
        # other images share its batch (BLAS may pick kernels by batch size),
        # so callers that batch the same way get bit-identical codes.
        with full_fp32():
            for start in range(0, len(images), self.batch_size):
                chunk = host_to_device(np.ascontiguousarray(images[start:start + self.batch_size]), self.device)
                blocks = [self._nearest(chunk[i:i + _STEP]) for i in range(0, len(chunk), _STEP)]
                codes = torch.cat([c for c, _ in blocks])
                rows = torch.cat([near for _, near in blocks]).nonzero().squeeze(1)
                if len(rows):
                    codes[rows.to(codes.device)] = self._exact(chunk, rows.to(chunk.device)).to(codes.device)
                out[start:start + len(chunk)] = codes.view(len(chunk), *grid).cpu().numpy()
        return out

    def _nearest(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid of every patch by argmin ||c||^2 - 2 z.c (||z||^2 is common to all)
        in float32, and which patches have a runner-up within the near-tie margin.

        The codes `encode` keeps are those of exact arithmetic, whatever the device: float32
        picks the nearest centroid wherever it is clear, and the near ties (~2% of patches)
        are decided again in float64 by `_exact`. float32 sums in the order of the BLAS or
        GPU kernel at hand, so on its own it flipped near ties between a CPU and a GPU (3 of
        20 shards differed on an H200, bench/gpu.py).
        """
        z = torch.addmm(self._mean_z, self._patches(images), self._basis_u8, beta=-1.0)
        # One fused matmul into a cache-sized distance block: the (patches x codes)
        # matrix is the whole cost, and three full-size temporaries made it memory-bound.
        d = torch.addmm(self._centroid_sq, z, self._centroids.T, beta=1.0, alpha=-2.0)
        # The runner-up: the minimum once each row's minimum is set to +inf (one more pass).
        if d.device.type == "cpu":
            # numpy's SIMD argmin/min are ~10x torch's CPU kernels here (a fifth of the
            # encode time); same first-minimum rule, so the same codes.
            dn, at = d.numpy(), np.arange(len(d))
            first = dn.argmin(axis=1)
            low = dn[at, first]
            dn[at, first] = np.inf
            return torch.from_numpy(first), torch.from_numpy(dn.min(axis=1) <= low + self._tie)
        low, codes = d.min(dim=1)
        return codes, d.scatter_(1, codes[:, None], float("inf")).amin(dim=1) <= low + self._tie

    def _exact(self, images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The nearest centroid of the patches `rows` (flat patch indices of `images`) in
        float64 from the uint8 pixels: rounding errors ~1e-16 of the scale, so only
        distances equal to ~13 digits could still be ordered differently by two machines."""
        p = self.patch_size
        h, w = images.shape[1] // p, images.shape[2] // p
        x = images.view(len(images), h, p, w, p, 3)
        img, cell = rows // (h * w), rows % (h * w)
        patches = x[img, cell // w, :, cell % w].reshape(len(rows), p * p * 3)   # as _patches lays them out
        z = (patches.to(torch.float64) / 255.0 - self._mean64) @ self._basis64
        return (self._centroid_sq64 - 2.0 * (z @ self._centroids64.T)).argmin(dim=1)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = self.check_codes(codes)
        idx = torch.from_numpy(codes.astype(np.int64)).to(self.device)
        n, (h, w), p = len(codes), codes.shape[1:], self.patch_size
        patches = self._decoder[idx.view(-1)].view(n, h, w, p, p, 3)
        img = patches.permute(0, 1, 3, 2, 4, 5).reshape(n, h * p, w * p, 3)
        return (img * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (n*h*w, p*p*3) float32 pixel values, patch-major, in one copy."""
        n, p = len(images), self.patch_size
        h, w = images.shape[1] // p, images.shape[2] // p
        x = images.view(n, h, p, w, p, 3).permute(0, 1, 3, 2, 4, 5)
        return x.to(torch.float32, memory_format=torch.contiguous_format).view(n * h * w, p * p * 3)

    # --- artifact ----------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self._weights, str(directory / WEIGHTS_FILE))
        doc = {
            "tokenizer": self.name,
            "version": self.version,
            "config": self.config(),
            "weights_sha256": self.weights_digest(),
            "fit": self.fit_info,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike, **kwargs: Any) -> KMeansVQ:
        directory = Path(directory)
        try:
            doc = json.loads((directory / CONFIG_FILE).read_text())
        except FileNotFoundError as e:
            raise TokenizerError(f"no {CONFIG_FILE} in tokenizer directory {directory}") from e
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{directory / CONFIG_FILE} is not valid JSON: {e}") from e
        if doc.get("tokenizer") != cls.name:
            raise TokenizerError(f"{directory} holds a {doc.get('tokenizer')!r} tokenizer, not {cls.name!r}")
        if int(doc.get("version", 0)) > cls.version:
            raise TokenizerError(f"{directory} was written by a newer {cls.name} (version {doc['version']})")
        try:
            weights = load_file(str(directory / WEIGHTS_FILE))
        except FileNotFoundError as e:
            raise TokenizerError(f"no {WEIGHTS_FILE} in tokenizer directory {directory}") from e
        except Exception as e:  # safetensors raises its own error types on bad headers
            raise TokenizerError(f"cannot read {directory / WEIGHTS_FILE}: {e}") from e
        cfg = doc["config"]
        tok = cls(weights, patch_size=int(cfg["patch_size"]),
                  resolution=int(kwargs.pop("resolution", None) or cfg["resolution"]),
                  fit_info=doc.get("fit"), **kwargs)
        expected = doc.get("weights_sha256")
        if expected and expected != tok.weights_digest():
            raise TokenizerError(f"{directory / WEIGHTS_FILE} does not match the sha256 in {CONFIG_FILE}")
        return tok

    # Narrower than Tokenizer.from_options(path, **options) on purpose: only these named options;
    # an unknown one is a TypeError (load_tokenizer makes it a UsageError).
    @classmethod
    def from_options(cls, path: str | None = None,  # type: ignore[override]
                     device: str | None = None, batch_size: str | int = 64,
                     resolution: str | int | None = None) -> KMeansVQ:
        """Build from CLI options. `path` is required here: the convert job supplies the
        default artifact (fitted on the bundled photos) when none is given."""
        kwargs = {"device": device, "batch_size": int(batch_size),
                  "resolution": int(resolution) if resolution else None}
        if path is None:
            raise TokenizerError("kmeans-vq needs path=DIR (an artifact from `tokshard fit-tokenizer`)")
        return cls.load(path, **kwargs)


def _check_weights(weights: dict[str, np.ndarray], cfg: dict[str, int]) -> None:
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(f"{k}: {tuple(weights[k].shape)} != {v}" for k, v in expected.items()
                   if k in weights and tuple(weights[k].shape) != v)
    if missing or unexpected or wrong:
        raise TokenizerError(
            "kmeans-vq weights do not match the config: "
            f"missing={missing} unexpected={unexpected} wrong_shapes={wrong}"
        )
