"""Pretrained VQGAN tokenizers: taming-transformers' VQGAN and LlamaGen's VQ-16.

Both load public checkpoints from a local path (never a download at run time) into
`vq_layers.VQAutoencoder`, whose parameter names are those of the originals, and
quantise exactly as the originals do (nearest codebook row by squared L2; LlamaGen
L2-normalises latents and codebook first). Images are scaled to [-1, 1] as both
projects' preprocessing does.

A checkpoint is read with `safetensors` or `torch.load(weights_only=True)` only, so
loading never runs code from the file. The one allowance: the training metadata the
public checkpoints carry (an old Lightning callback class used as a dict key, an
argparse.Namespace of training args) unpickles into inert stand-ins that keep nothing.
Anything else is a TokenizerError that says how to convert the file.

Codes depend on more than weights: the arithmetic precision, the memory format and
the size of the batches the network runs on pick different kernels, and argmins flip
on near-ties. Those are fixed per tokenizer, recorded in `config()` (and so in the
config hash), and every batch runs at exactly `micro_batch` images (the last one
zero-padded) so an image's codes never depend on what else is in the call.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tokshard.errors import TokenizerError
from tokshard.tokenizers.base import Tokenizer, canonical_json
from tokshard.tokenizers.device import full_fp32, host_to_device, pick_device
from tokshard.tokenizers.options import as_bool, as_int
from tokshard.tokenizers.vq_layers import LLAMAGEN, TAMING, Naming, VQAutoencoder, nearest_code

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PRECISIONS = ("fp32", "bf16")
# 4 keeps the zero-padding of a short last batch cheap and already fills a GPU at
# 256 px (one f16 encoder pass is ~100 GFLOP per image).
DEFAULT_MICRO_BATCH = 4
# Prefixes of the weights that decide the codes; the decoder only affects previews.
CODE_WEIGHTS = ("encoder.", "quant_conv.", "quantize.embedding.")
# Names listed in an error before it is cut short: a wrong config can mismatch hundreds.
_LIST_LIMIT = 12


# --- reading checkpoints -------------------------------------------------------------

class _Inert:
    """Stand-in for a training-metadata class: can be a dict key, takes and drops any state."""

    def __setstate__(self, state: Any) -> None:
        pass


# Globals the public checkpoints need beyond plain weights, all metadata we never read:
# Lightning <= 1.2 (taming's .ckpt) keys `callbacks` by the ModelCheckpoint class itself;
# LlamaGen's training script stores its argparse.Namespace under `args`.
_TOLERATED_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "argparse.Namespace",
)


def read_checkpoint(path: Path) -> Any:
    """The object stored in `path`, loaded without executing anything from it."""
    if not path.is_file():
        raise TokenizerError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types on bad headers
            raise TokenizerError(f"cannot read {path}: {e}") from e
    stubs: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (type(name.rsplit(".", 1)[1], (_Inert,), {"__module__": __name__}), name) for name in _TOLERATED_GLOBALS]
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # Objects the weights-only unpickler will not build (as opposed to a corrupt file).
        detail = next((line for line in lines if "global" in line.lower() or "reduce" in line
                       or "new object" in line), None)
        detail = detail.split(". Please", 1)[0] if detail else None   # not torch's "allowlist it" advice
        if detail is None:
            raise TokenizerError(f"cannot read checkpoint {path}: {lines[0] if lines else e}") from None
        raise TokenizerError(
            f"{path} holds Python objects beyond weights ({detail}); tokshard only loads "
            "checkpoints with torch.load(weights_only=True) or safetensors, never arbitrary pickles. "
            "In an environment you trust, re-save just the tensors, e.g. "
            "safetensors.torch.save_file(torch.load(p, weights_only=False)[KEY], 'model.safetensors') with KEY "
            "the entry holding the weights ('state_dict' for taming, 'ema' or 'model' for LlamaGen), "
            "and load that file") from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise TokenizerError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def _state_dict(obj: Any, keys: tuple[str, ...], path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The weights inside a loaded checkpoint: under the first of `keys` present, else `obj` itself."""
    if not isinstance(obj, Mapping):
        raise TokenizerError(f"{path} holds a {type(obj).__name__}, not a state dict")
    source = next((k for k in keys if isinstance(obj.get(k), Mapping)), None)
    sd = obj[source] if source else obj
    bad = sorted(str(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad or not sd:
        where = f"under {source!r}" if source else f"at the top level (looked for {list(keys)})"
        raise TokenizerError(f"{path}: no state dict {where}; non-tensor entries: {_clip(bad)}")
    return dict(sd), source


def _clip(names: list[str]) -> list[str]:
    return names if len(names) <= _LIST_LIMIT else names[:_LIST_LIMIT] + [f"... (+{len(names) - _LIST_LIMIT} more)"]


def _check_state(sd: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], ignore: tuple[str, ...],
                 label: str) -> dict[str, torch.Tensor]:
    """`sd` restricted to the model's keys as float32; one error naming every mismatch otherwise."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(k for k in sd if k not in expected and not k.startswith(ignore))
    wrong = sorted(f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}"
                   for k, v in expected.items() if k in sd and sd[k].shape != v.shape)
    not_float = sorted(f"{k}: {sd[k].dtype}" for k in expected if k in sd and not sd[k].is_floating_point())
    if missing or unexpected or wrong or not_float:
        raise TokenizerError(
            f"{label} does not match the architecture: missing={_clip(missing)} unexpected={_clip(unexpected)} "
            f"wrong_shapes={_clip(wrong)}" + (f" not_floating={_clip(not_float)}" if not_float else ""))
    # float32 whatever the file holds: the encoder computes in float32 (or autocasts from it).
    return {k: sd[k].to(torch.float32).contiguous() for k in expected}


def _digest(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, little-endian bytes) of the code-deciding weights, by name."""
    h = hashlib.sha256()
    for name in sorted(k for k in sd if k.startswith(CODE_WEIGHTS)):
        t = sd[name].detach().to("cpu").contiguous()
        h.update((canonical_json([name, str(t.dtype), list(t.shape)]) + "\n").encode())
        # ndarray has the buffer protocol; numpy's stubs declare __buffer__ only for Python >= 3.12.
        h.update(memoryview(t.numpy()).cast("B"))  # type: ignore[arg-type]
    return h.hexdigest()


# --- options arriving as CLI strings ------------------------------------------------------

def _read_config_text(value: Any, presets: Mapping[str, dict]) -> dict:
    """`config` option: a dict, a preset name, inline JSON, or a .json/.yaml file."""
    if isinstance(value, Mapping):
        return dict(value)
    text = str(value).strip()
    if text in presets:
        return dict(presets[text])
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise TokenizerError(f"config option is not valid JSON: {e}") from None
    path = Path(text)
    if not path.is_file():
        raise TokenizerError(f"config {text!r} is neither a preset ({', '.join(presets)}), JSON, nor a file")
    try:
        if path.suffix in (".yaml", ".yml"):   # taming's own configs/*.yaml
            import yaml  # optional: only needed for YAML configs
            return yaml.safe_load(path.read_text())
        return json.loads(path.read_text())
    except ImportError:
        raise TokenizerError(f"reading {path} needs PyYAML; pass the config as JSON instead") from None
    except Exception as e:
        raise TokenizerError(f"cannot parse config {path}: {e}") from None


def _find_weights(directory: Path) -> Path:
    if (directory / WEIGHTS_FILE).is_file():
        return directory / WEIGHTS_FILE
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if len(found) != 1:
        raise TokenizerError(f"{directory} must hold {WEIGHTS_FILE} or exactly one checkpoint "
                             f"({'/'.join(CHECKPOINT_SUFFIXES)}); found {[p.name for p in found]}")
    return found[0]


# --- the tokenizers -------------------------------------------------------------------

class VQGANTokenizer(Tokenizer):
    """Shared machinery; subclasses say how a family names, configures and stores its model."""

    naming: ClassVar[Naming]
    presets: ClassVar[dict[str, dict]]
    default_preset: ClassVar[str]
    state_keys: ClassVar[tuple[str, ...]]      # where in a .pt/.ckpt the weights live, by preference
    ignored_keys: ClassVar[tuple[str, ...]]    # prefixes/names of checkpoint entries that are not the model
    l2_norm: bool = False
    input_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)   # pixel range the network was trained on
    fused_distance: ClassVar[bool] = False     # the family's quantiser computes distances with one addmm

    def __init__(self, state_dict: Mapping[str, torch.Tensor], arch: Mapping[str, Any], *,
                 resolution: int | None = None, device: str | torch.device | None = None,
                 batch_size: int = 32, precision: str = "fp32", channels_last: bool | None = None,
                 micro_batch: int = DEFAULT_MICRO_BATCH, source: dict | None = None, label: str = "checkpoint"):
        self._arch = self.canonical_arch(arch)
        try:
            self.device = pick_device(device)
        except (ValueError, RuntimeError) as e:   # e.g. device=cuda on a CPU-only host
            raise TokenizerError(f"device {device!r}: {e}") from None
        if precision not in PRECISIONS:
            raise TokenizerError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        # channels_last is what cuDNN's fastest convs want (and 1.3x faster on an AVX-512 CPU),
        # but it is part of the identity (it can change codes), so it is the same default on
        # every device: a CPU driver and GPU workers of one Ray job must agree. Ask for it
        # with channels_last=true.
        self.channels_last = False if channels_last is None else bool(channels_last)
        self.batch_size, self.micro_batch = int(batch_size), int(micro_batch)
        self._resolution = int(resolution or self.default_resolution(self._arch))
        levels = self.downsample_levels(self._arch)
        if self._resolution % (2 ** levels):
            raise TokenizerError(f"resolution {self._resolution} is not a multiple of the downsampling factor "
                                 f"{2 ** levels}")
        self._factor = 2 ** levels
        self._grid = (self._resolution // self._factor,) * 2
        self.source = source or {}

        # Built on the meta device, then the checked weights are assigned: no time is
        # spent initialising 72M parameters (f16 configs) only to overwrite them.
        with torch.device("meta"):
            model = self.build_model(self._arch)
        weights = _check_state(dict(state_dict), model.state_dict(), self.ignored_keys, label)
        model.load_state_dict(weights, strict=True, assign=True)
        self._digest = _digest(weights)
        model.requires_grad_(False).eval()
        # Module.to takes memory_format at run time; torch's overloads of it leave it out.
        self.model = model.to(self.device, memory_format=torch.channels_last  # type: ignore[call-overload]
                              if self.channels_last else torch.contiguous_format)
        book = self.model.quantize.embedding.weight
        # What a code stands for: the (normalised, for LlamaGen) codebook row.
        self._book = torch.nn.functional.normalize(book, p=2, dim=-1) if self.l2_norm else book

    # --- family hooks --------------------------------------------------------------
    @classmethod
    def canonical_arch(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def build_model(cls, arch: Mapping[str, Any]) -> torch.nn.Module:
        """A module with .latents(x), .reconstruct(zq) and .quantize.embedding, named as the original."""
        return VQAutoencoder(cls.naming, **cls._model_kwargs(arch))

    @classmethod
    def downsample_levels(cls, arch: Mapping[str, Any]) -> int:
        return len(cls._model_kwargs(arch)["enc_mult"]) - 1

    @classmethod
    def _model_kwargs(cls, arch: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def default_resolution(cls, arch: Mapping[str, Any]) -> int:
        raise NotImplementedError

    # --- interface -----------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self._resolution

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self._grid

    @property
    def patch_size(self) -> int:
        """The downsampling factor 2**levels: any (H, W) multiple of it encodes (variable grids).

        The networks are fully convolutional plus global self-attention over all positions
        (taming's and LlamaGen's AttnBlock, placed by the *architecture's* resolution, not the
        input's), with no positional embedding and no reshape by a fixed grid, so an (H, W)
        input gives an (H/f, W/f) latent grid; MaskGIT's Conv2dSame pads from the input's size."""
        return self._factor

    @property
    def vocab_size(self) -> int:
        return int(self._book.shape[0])

    def config(self) -> dict[str, Any]:
        return {
            "arch": dict(self._arch),
            "resolution": self._resolution,
            "input_range": list(self.input_range),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "micro_batch": self.micro_batch,
        }

    def weights_digest(self) -> str:
        return self._digest

    def codebook(self) -> np.ndarray:
        return self._book.detach().float().cpu().numpy().copy()

    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def _autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """(n, H, W, 3) uint8 on the device -> latents (n, D, H/f, W/f), as the quantiser sees them."""
        # x / 255 in float32 (torchvision's ToTensor), then onto the model's range: the
        # projects' `2 * x - 1` for [-1, 1] (x + (-1) is x - 1 exactly).
        x = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        lo, hi = self.input_range
        if (lo, hi) != (0.0, 1.0):
            x = x.mul_(hi - lo).add_(lo)
        with self._autocast():
            return self.model.latents(x.contiguous(memory_format=self._memory_format()))

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> np.ndarray:
        self.check_images(images)
        f = self._factor
        out = np.empty((len(images), images.shape[1] // f, images.shape[2] // f), dtype=np.int64)
        m = self.micro_batch
        # "fp32" means float32 on a GPU too (TF32 convolutions change codes).
        with full_fp32(self.precision == "fp32"):
            for start in range(0, len(images), self.batch_size):
                chunk = host_to_device(_c_contiguous(images[start:start + self.batch_size]), self.device)
                codes = []
                for i in range(0, len(chunk), m):
                    part = chunk[i:i + m]
                    # Every network pass sees exactly m images, so kernels (and roundings) never
                    # depend on how many images came with this one.
                    if len(part) < m:
                        part = torch.cat([part, part.new_zeros((m - len(part), *part.shape[1:]))])
                    codes.append(nearest_code(self.latents(part), self.model.quantize.embedding.weight,
                                              self.l2_norm, fused=self.fused_distance)[:len(chunk) - i])
                out[start:start + len(chunk)] = torch.cat(codes).cpu().numpy()
        return out

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = self.check_codes(codes)
        out = []
        for i in range(0, len(codes), self.micro_batch):
            idx = torch.from_numpy(codes[i:i + self.micro_batch].astype(np.int64)).to(self.device)
            zq = self._book[idx].permute(0, 3, 1, 2).contiguous(memory_format=self._memory_format())
            with self._autocast():
                img = self.model.reconstruct(zq)
            lo, hi = self.input_range
            img = ((img.float().clamp(lo, hi) - lo) * (255.0 / (hi - lo))).round().to(torch.uint8)
            out.append(img.permute(0, 2, 3, 1).cpu().numpy())
        f = self._factor
        return np.concatenate(out) if out else np.empty((0, codes.shape[1] * f, codes.shape[2] * f, 3), np.uint8)

    # --- artifact ------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """model.safetensors in the public layout + config.json; `load` rebuilds the same identity."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        save_file(weights, str(directory / WEIGHTS_FILE))
        doc = {"tokenizer": self.name, "version": self.version, "config": self.config(),
               "weights_sha256": self.weights_digest(), "source": self.source}
        (directory / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")

    # Narrower than Tokenizer.load(directory, **options) on purpose: a family takes its own
    # named options, and an unknown one is a TypeError (load_tokenizer makes it a UsageError).
    @classmethod
    def load(cls, path: str | os.PathLike, *,  # type: ignore[override]
             config: Any = None, device: str | None = None,
             batch_size: int | str = 32, precision: str | None = None, channels_last: Any = None,
             micro_batch: int | str | None = None, resolution: int | str | None = None,
             weights_key: str | None = None) -> VQGANTokenizer:
        """A saved artifact directory, a directory holding one public checkpoint, or a checkpoint file.

        The architecture comes from the artifact's/directory's config.json, else `config`,
        else the family's default preset; a `config` given with a config.json must agree.
        """
        path = Path(path)
        doc: Any = None   # config.json as parsed: any JSON value
        arch: dict[str, Any] | None = None
        if path.is_dir():
            if (path / CONFIG_FILE).is_file():
                try:
                    doc = json.loads((path / CONFIG_FILE).read_text())
                except json.JSONDecodeError as e:
                    raise TokenizerError(f"{path / CONFIG_FILE} is not valid JSON: {e}") from None
            weights_file = _find_weights(path)
        else:
            weights_file = path
        stored: dict[str, Any] = {}
        if isinstance(doc, dict) and "tokenizer" in doc:          # written by save()
            if doc["tokenizer"] != cls.name:
                raise TokenizerError(f"{path} holds a {doc['tokenizer']!r} tokenizer, not {cls.name!r}")
            if int(doc.get("version", 0)) > cls.version:
                raise TokenizerError(f"{path} was written by a newer {cls.name} (version {doc['version']})")
            stored = doc.get("config") or {}
            arch = cls.canonical_arch(stored.get("arch") or {})
        elif doc is not None:                                      # a hand-written architecture config
            arch = cls.canonical_arch(doc)
        # The Ray engine re-sends the options with the saved artifact; a config *file* named
        # there need not exist on the worker, and the artifact already carries the architecture.
        if config is not None and not (stored and _is_absent_file(config, cls.presets)):
            given = cls.canonical_arch(_read_config_text(config, cls.presets))
            if arch is not None and given != arch:
                raise TokenizerError(f"config option {given} disagrees with {path / CONFIG_FILE}: {arch}")
            arch = given
        if arch is None:
            arch = cls.canonical_arch(cls.presets[cls.default_preset])

        keys = (weights_key,) if weights_key else cls.state_keys
        sd, key = _state_dict(read_checkpoint(weights_file), keys, weights_file)
        if weights_key and key != weights_key:
            raise TokenizerError(f"{weights_file} has no state dict under {weights_key!r}")

        # Options win; an artifact's recorded settings come next, so reloading it (e.g. from a
        # dataset) reproduces the identity it was saved with.
        def pick(option: Any, name: str, default: Any) -> Any:
            return option if option is not None else stored.get(name, default)

        layout = pick(channels_last, "channels_last", None)
        tok = cls(sd, arch, device=device, batch_size=as_int(batch_size, "batch_size"),
                  resolution=as_int(pick(resolution, "resolution", cls.default_resolution(arch)), "resolution"),
                  precision=str(pick(precision, "precision", "fp32")),
                  channels_last=None if layout is None else as_bool(layout, "channels_last"),
                  micro_batch=as_int(pick(micro_batch, "micro_batch", DEFAULT_MICRO_BATCH), "micro_batch"),
                  source=doc.get("source", {}) if stored else {"checkpoint": weights_file.name, "state_key": key},
                  label=str(weights_file))
        expected = doc.get("weights_sha256") if stored else None
        if expected and expected != tok.weights_digest():
            raise TokenizerError(f"{weights_file} does not match the sha256 in {path / CONFIG_FILE}")
        return tok

    # Named options only, as in load() above.
    @classmethod
    def from_options(cls, path: str | None = None,  # type: ignore[override]
                     device: str | None = None, batch_size: str | int = 32,
                     config: Any = None, precision: str | None = None, channels_last: Any = None,
                     micro_batch: str | int | None = None, resolution: str | int | None = None,
                     weights_key: str | None = None) -> VQGANTokenizer:
        """Build from `--tokenizer-opt` strings. `path` is required: nothing is downloaded."""
        if not path:
            raise TokenizerError(f"{cls.name} needs path=<local checkpoint file or directory>; "
                                 "tokshard never downloads weights at run time")
        return cls.load(path, config=config, device=device, batch_size=batch_size, precision=precision,
                        channels_last=channels_last, micro_batch=micro_batch, resolution=resolution,
                        weights_key=weights_key)


def _c_contiguous(array: np.ndarray) -> np.ndarray:
    # numpy calls a reversed one-image slice contiguous (size-1 axes' strides do not count),
    # but torch.from_numpy refuses its negative stride: copy in that case too.
    out = np.ascontiguousarray(array)
    return out if all(s >= 0 for s in out.strides) else out.copy()


def _is_absent_file(value: Any, presets: Mapping[str, dict]) -> bool:
    """`value` names a config file that does not exist here (not a dict, preset or inline JSON)."""
    if isinstance(value, Mapping):
        return False
    text = str(value).strip()
    return text not in presets and not text.startswith("{") and not Path(text).exists()


def _positive_ints(arch: Mapping[str, Any], names: tuple[str, ...], family: str) -> None:
    for n in names:
        values = arch[n] if isinstance(arch[n], list) else [arch[n]]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise TokenizerError(f"{family} config: {n}={arch[n]!r} must be positive integer(s)")


def _group_norm_ok(ch: int, mults: list[int], family: str) -> None:
    bad = [ch * m for m in mults if (ch * m) % 32]
    if bad:
        raise TokenizerError(f"{family} config: channel counts {bad} are not multiples of 32 (GroupNorm groups)")


class TamingVQGAN(VQGANTokenizer):
    """taming-transformers `VQModel` (VQGAN) with `VectorQuantizer2`; default: vqgan_imagenet_f16_1024."""

    name = "vqgan-taming"
    version = 1
    naming = TAMING
    presets = {   # model.params of taming's / LDM's configs/*.yaml
        "imagenet_f16_1024": {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
                              "resolution": 256, "z_channels": 256, "embed_dim": 256, "n_embed": 1024},
        "imagenet_f16_16384": {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
                               "resolution": 256, "z_channels": 256, "embed_dim": 256, "n_embed": 16384},
        "openimages_f8_16384": {"ch": 128, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [32],
                                "resolution": 256, "z_channels": 4, "embed_dim": 4, "n_embed": 16384},
        "openimages_f8_256": {"ch": 128, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [32],
                              "resolution": 256, "z_channels": 4, "embed_dim": 4, "n_embed": 256},
    }
    default_preset = "imagenet_f16_1024"
    state_keys = ("state_dict",)            # Lightning .ckpt; a bare state dict also loads
    ignored_keys = ("loss.",)                # LPIPS + discriminator of VQLPIPSWithDiscriminator
    # ddconfig entries that must hold these values (anything else changes the network).
    _FIXED = {"double_z": False, "in_channels": 3, "out_ch": 3, "resamp_with_conv": True, "give_pre_end": False}
    _KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels", "embed_dim", "n_embed")

    @classmethod
    def canonical_arch(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        raw = dict(raw)
        if isinstance(raw.get("model"), Mapping):                 # a whole configs/*.yaml
            raw = dict(raw["model"].get("params", raw["model"]))
        if isinstance(raw.get("ddconfig"), Mapping):              # VQModel params
            if raw.get("remap"):
                raise TokenizerError("vqgan-taming: quantizer index remapping (remap=...) is not supported")
            raw = {**raw["ddconfig"], "embed_dim": raw.get("embed_dim"), "n_embed": raw.get("n_embed")}
        for k, v in cls._FIXED.items():
            if k in raw and raw.pop(k) != v:
                raise TokenizerError(f"vqgan-taming: {k} must be {v} for a VQGAN")
        raw.pop("dropout", None)                                  # identity at inference
        unknown = sorted(set(raw) - set(cls._KEYS))
        if unknown:
            raise TokenizerError(f"vqgan-taming config: unknown keys {unknown} (known: {list(cls._KEYS)})")
        arch = {**cls.presets[cls.default_preset], **{k: v for k, v in raw.items() if v is not None}}
        arch["ch_mult"], arch["attn_resolutions"] = list(arch["ch_mult"]), list(arch["attn_resolutions"])
        _positive_ints(arch, ("ch", "ch_mult", "num_res_blocks", "resolution", "z_channels", "embed_dim", "n_embed"),
                       "vqgan-taming")
        _group_norm_ok(arch["ch"], arch["ch_mult"], "vqgan-taming")
        return arch

    @classmethod
    def _model_kwargs(cls, arch: Mapping[str, Any]) -> dict[str, Any]:
        # Attention where the *architecture's* resolution, halved per level, is listed,
        # whatever the input size: as in taming's Encoder/Decoder constructors.
        attn, res = [], arch["resolution"]
        for _ in arch["ch_mult"]:
            attn.append(res in arch["attn_resolutions"])
            res //= 2
        return dict(ch=arch["ch"], enc_mult=arch["ch_mult"], dec_mult=arch["ch_mult"],
                    num_res_blocks=arch["num_res_blocks"], enc_attn=attn, dec_attn=attn,
                    z_channels=arch["z_channels"], embed_dim=arch["embed_dim"], n_embed=arch["n_embed"])

    @classmethod
    def default_resolution(cls, arch: Mapping[str, Any]) -> int:
        return int(arch["resolution"])


class LlamaGenVQ(VQGANTokenizer):
    """LlamaGen's `VQModel` (tokenizer/tokenizer_image/vq_model.py); default: VQ-16 (vq_ds16_c2i.pt)."""

    name = "llamagen-vq16"
    version = 1
    naming = LLAMAGEN
    presets = {   # ModelArgs defaults + VQ_16 / VQ_8
        "VQ-16": {"ch": 128, "encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4],
                  "num_res_blocks": 2, "z_channels": 256, "codebook_size": 16384, "codebook_embed_dim": 8,
                  "codebook_l2_norm": True},
        "VQ-8": {"ch": 128, "encoder_ch_mult": [1, 2, 2, 4], "decoder_ch_mult": [1, 2, 2, 4],
                 "num_res_blocks": 2, "z_channels": 256, "codebook_size": 16384, "codebook_embed_dim": 8,
                 "codebook_l2_norm": True},
    }
    default_preset = "VQ-16"
    # LlamaGen's own scripts (vq_demo.py, extract_codes_c2i.py) take "ema" over "model" over "state_dict".
    state_keys = ("ema", "model", "state_dict")
    ignored_keys = ("quantize.codebook_used",)   # usage-statistics buffer (codebook_show_usage=True)
    _TRAINING_ONLY = ("codebook_show_usage", "commit_loss_beta", "entropy_loss_ratio", "dropout_p")
    _KEYS = ("ch", "encoder_ch_mult", "decoder_ch_mult", "num_res_blocks", "z_channels", "codebook_size",
             "codebook_embed_dim", "codebook_l2_norm")

    @property
    def l2_norm(self) -> bool:  # type: ignore[override]
        return bool(self._arch["codebook_l2_norm"])

    @classmethod
    def canonical_arch(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        raw = {k: v for k, v in dict(raw).items() if k not in cls._TRAINING_ONLY}
        unknown = sorted(set(raw) - set(cls._KEYS))
        if unknown:
            raise TokenizerError(f"llamagen-vq16 config: unknown keys {unknown} (known: {list(cls._KEYS)})")
        arch = {**cls.presets[cls.default_preset], **raw}
        arch["encoder_ch_mult"], arch["decoder_ch_mult"] = list(arch["encoder_ch_mult"]), list(arch["decoder_ch_mult"])
        arch["codebook_l2_norm"] = as_bool(arch["codebook_l2_norm"], "codebook_l2_norm")
        _positive_ints(arch, ("ch", "encoder_ch_mult", "decoder_ch_mult", "num_res_blocks", "z_channels",
                              "codebook_size", "codebook_embed_dim"), "llamagen-vq16")
        if len(arch["encoder_ch_mult"]) != len(arch["decoder_ch_mult"]):
            raise TokenizerError("llamagen-vq16 config: encoder and decoder must have as many levels")
        _group_norm_ok(arch["ch"], arch["encoder_ch_mult"] + arch["decoder_ch_mult"], "llamagen-vq16")
        return arch

    @classmethod
    def _model_kwargs(cls, arch: Mapping[str, Any]) -> dict[str, Any]:
        # LlamaGen puts attention in the lowest-resolution level only (plus the middle).
        def last_only(mult: list[int]) -> list[bool]:
            return [i == len(mult) - 1 for i in range(len(mult))]
        return dict(ch=arch["ch"], enc_mult=arch["encoder_ch_mult"], dec_mult=arch["decoder_ch_mult"],
                    num_res_blocks=arch["num_res_blocks"], enc_attn=last_only(arch["encoder_ch_mult"]),
                    dec_attn=last_only(arch["decoder_ch_mult"]), z_channels=arch["z_channels"],
                    embed_dim=arch["codebook_embed_dim"], n_embed=arch["codebook_size"])

    @classmethod
    def default_resolution(cls, arch: Mapping[str, Any]) -> int:
        return 256   # vq_ds16_c2i.pt's training size; its convs also run at 384/512 (resolution=...)
