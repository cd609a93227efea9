"""NVIDIA Cosmos discrete tokenizers (Cosmos-Tokenizer DI / DV), run from their TorchScript files.

NVIDIA publishes each Cosmos tokenizer as `encoder.jit`, `decoder.jit` and
`autoencoder.jit` (Hugging Face repos `nvidia/Cosmos-0.1-Tokenizer-DI8x8`,
`-DI16x16`, `-DV4x8x8`, `-DV8x8x8`, `-DV8x16x16`, `nvidia/Cosmos-1.0-Tokenizer-DV8x16x16`,
the `-LowRes` variants, ...). Fetch one yourself and point `path` at the local folder:

    tokshard convert SRC --out DST --tokenizer cosmos-di \
        --tokenizer-opt path=checkpoints/Cosmos-0.1-Tokenizer-DI8x8 --tokenizer-opt device=cuda

tokshard never downloads a model: `path` must be an existing local directory.

The contract followed here is that of NVIDIA's own inference code
(`cosmos_tokenizer/image_lib.py`, `video_lib.py`, `utils.py`, `networks/discrete_*.py`,
`modules/quantizers.py` in github.com/NVIDIA/Cosmos-Tokenizer):

* pixels: uint8 -> `2 * (x / 255) - 1` computed in float64, then cast to the model dtype
  (`utils.numpy2tensor`), laid out (B, 3, H, W) for images and (B, 3, T, H, W) for videos;
* the encoder JIT is `Sequential(encoder, quant_conv, FSQuantizer)` and so returns the
  quantiser's `(indices, codes, dummy_loss)`; `image_lib.encode` keeps `(indices, codes)`.
  `indices` are int32 (B, h, w) or (B, t, h, w) in [0, prod(levels)); with the released
  levels (8, 8, 8, 5, 5, 5) that is a vocabulary of 64000. `codes` are the quantised
  latents (B, 6, [t,] h, w);
* the decoder JIT is `Sequential(InvQuantizerJit, post_quant_conv, decoder)`: it takes the
  indices and returns pixels in [-1, 1], turned back into uint8 as `utils.tensor2numpy` does;
* video: the tokenizers are causal, a clip of 1 + k * c_t frames becomes 1 + k latent
  frames (c_t = 4 or 8), and long videos are cut into windows of `temporal_window` frames
  (17 in `video_cli.py` / `video_lib.forward`) that are encoded independently and
  concatenated along time.

Where the reference code *pads* (spatially to a multiple of 16, temporally to 1 + 8k by
repeating the edge frames, then crops the reconstruction), this module refuses instead:
padded frames would become tokens that stand for nothing. Images here are square and of
a fixed resolution that must be a multiple of the spatial compression, and a clip (or
each temporal window of it) must hold 1 + k * c_t frames; `usable_frames(T)` gives the
longest clip length <= T that is accepted.

Precision: the reference runs bfloat16 on CUDA. Precision can change codes, so it is part
of `config()` (and of the tokenizer identity): "bf16" by default on CUDA, "fp32" elsewhere,
and whatever was saved in an artifact's config.json once written.

Security: `torch.jit.load` reads a TorchScript archive: serialized TorchScript code and
tensors, not arbitrary pickled Python objects, but the code in it *is* run by the encoder.
Files are only ever read from the local directory the user named; load model files you
trust (e.g. checked against the checksums NVIDIA publishes). The encoder bytes that are
hashed for the identity are the very bytes that are loaded (one read, no re-open).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from tokshard.errors import TokenizerError
from tokshard.tokenizers.base import ClipTokenizer, Tokenizer, canonical_json, sha256_hex
from tokshard.tokenizers.device import full_fp32, host_to_device, pick_device
from tokshard.tokenizers.options import as_bool, as_int

ENCODER_FILE = "encoder.jit"
DECODER_FILE = "decoder.jit"
CONFIG_FILE = "config.json"

# Released Cosmos discrete tokenizers all use FSQ with these levels (networks/configs.py).
DEFAULT_LEVELS = (8, 8, 8, 5, 5, 5)
DEFAULT_RESOLUTION = 256
DEFAULT_TEMPORAL_WINDOW = 17          # video_cli.py --temporal_window default
DEFAULT_BATCH_SIZE = {"image": 16, "video": 2}

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_PRECISION_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                      "fp32": "fp32", "float32": "fp32", "float": "fp32"}

# Model names as published: "Cosmos-0.1-Tokenizer-DV4x8x8", "Cosmos-1.0-Tokenizer-DI16x16-LowRes",
# and the first release's folder names "CosmosCausalDV_f4x8x8", "CosmosDI_f8x8".
_DISCRETE_NAME = re.compile(r"(?:^|[^A-Za-z]|Cosmos)(?:Causal)?D([IV])_?f?(\d+)x(\d+)(?:x(\d+))?")
_CONTINUOUS_NAME = re.compile(r"(?:^|[^A-Za-z]|Cosmos)(?:Causal)?C([IV])_?f?(\d+)x(\d+)(?:x(\d+))?")

_UINT8_MAX_F = 255.0


# --- FSQ ---------------------------------------------------------------------
def fsq_codebook(levels: tuple[int, ...] | list[int] = DEFAULT_LEVELS) -> np.ndarray:
    """The implicit FSQ codebook: (prod(levels), len(levels)) float32, row i = code of index i.

    Exactly `FSQuantizer.indices_to_codes(arange(codebook_size))` of Cosmos
    (modules/quantizers.py): digit d of index i in the mixed radix `levels`, least
    significant first (basis = cumprod([1] + levels[:-1])), mapped to
    (digit - levels // 2) / (levels // 2). An odd level L spans [-1, 1] in steps of
    2 / (L - 1); an even level L spans [-1, 1 - 2 / L] (8 levels: -1, -0.75, ..., 0.75).
    """
    lv = np.asarray(levels, dtype=np.int64)
    basis = np.cumprod(np.concatenate([[1], lv[:-1]]))
    half = lv // 2
    idx = np.arange(int(np.prod(lv)), dtype=np.int64)[:, None]
    digits = (idx // basis) % lv
    return ((digits - half).astype(np.float32) / half.astype(np.float32)).astype(np.float32)


def parse_model_name(name: str) -> dict[str, Any] | None:
    """{"kind": "image"|"video", "discrete": bool, "spatial": c, "temporal": t|None} from a
    Cosmos model or folder name ("Cosmos-0.1-Tokenizer-DV4x8x8", "CosmosDI_f8x8"), else None."""
    for pattern, discrete in ((_DISCRETE_NAME, True), (_CONTINUOUS_NAME, False)):
        m = pattern.search(name or "")
        if not m:
            continue
        kind, a, b, c = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if kind == "I" and c is None and a == b:
            return {"kind": "image", "discrete": discrete, "spatial": a, "temporal": None}
        if kind == "V" and c is not None and b == int(c):
            return {"kind": "video", "discrete": discrete, "spatial": b, "temporal": a}
    return None


# --- option parsing ------------------------------------------------------------
def _int_option(value: Any, name: str, *, minimum: int = 1) -> int | None:
    return None if value is None or value == "" else as_int(value, name, minimum)


def _precision_option(value: Any) -> str | None:
    if value is None or value == "":
        return None
    name = _PRECISION_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise TokenizerError(f"precision must be one of bf16, fp16, fp32; got {value!r}")
    return name


def _levels_option(value: Any) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        levels = tuple(int(v) for v in items)
    except (TypeError, ValueError):
        raise TokenizerError(f"levels must be integers like 8,8,8,5,5,5; got {value!r}") from None
    if not levels or any(v < 2 for v in levels):
        raise TokenizerError(f"every FSQ level must be >= 2; got {levels}")
    return levels


def _local_directory(path: str | os.PathLike | None) -> Path:
    if path is None or str(path) == "":
        raise TokenizerError(
            "a Cosmos tokenizer needs path=DIR, a local folder holding encoder.jit (and decoder.jit "
            "to decode), e.g. a copy of nvidia/Cosmos-0.1-Tokenizer-DI8x8; tokshard never downloads models")
    text = str(path)
    directory = Path(text).expanduser()
    if not directory.is_dir():
        hint = ""
        if "://" in text or (not directory.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", text)):
            hint = (" (tokshard does not download models: fetch the repository's encoder.jit/decoder.jit "
                    "yourself and pass the local folder)")
        elif directory.is_file():
            hint = f" (it is a file: pass the folder that holds {ENCODER_FILE})"
        raise TokenizerError(f"Cosmos tokenizer path {text!r} is not a local directory{hint}")
    return directory


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"no {path.name} in Cosmos tokenizer directory {path.parent} ({what})") from None
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e


def _load_jit(data: bytes, path: Path, device: torch.device, dtype: torch.dtype, model: str) -> torch.jit.ScriptModule:
    """TorchScript from bytes already read (so the hashed bytes are the loaded bytes)."""
    try:
        with warnings.catch_warnings():
            # torch.jit is deprecated in favour of torch.export, but the Cosmos releases are
            # TorchScript archives: there is no other loader for them.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(io.BytesIO(data), map_location=device)
    except Exception as e:  # a corrupt zip, a non-TorchScript file, an op this torch lacks ...
        raise TokenizerError(f"{model}: cannot load {path} as a TorchScript module: "
                             f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    if not callable(getattr(module, "forward", None)):
        raise TokenizerError(f"{model}: {path} holds no TorchScript module with a forward()")
    try:
        return module.eval().to(dtype)
    except Exception as e:
        raise TokenizerError(f"{model}: cannot move {path} to {device} / {dtype}: {e}") from e


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {str(obj.dtype).removeprefix('torch.')} tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} ({', '.join(_describe(o) for o in obj[:4])})"
    return f"a {type(obj).__name__}"


_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# --- the tokenizers ----------------------------------------------------------------
class _CosmosDiscrete(Tokenizer):
    """What the image (DI) and video (DV) tokenizers share: artifact, JIT contract, batching."""

    version = 1
    # torch.jit.load runs the TorchScript code in the archive: a dataset's copy needs consent.
    runs_code = True
    kind: ClassVar[str]
    _options: ClassVar[frozenset[str]] = frozenset({
        "device", "batch_size", "precision", "resolution", "model", "spatial_compression", "levels", "probe"})

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        spatial_compression: int | None = None,
        resolution: int = DEFAULT_RESOLUTION,
        levels: tuple[int, ...] = DEFAULT_LEVELS,
        precision: str | None = None,
        model: str | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        probe: bool = True,
        temporal_compression: int | None = None,
        temporal_window: int | None = None,
        expected_encoder_sha256: str | None = None,
    ):
        self.directory = _local_directory(directory)
        self.model = model or self.directory.name
        try:
            self.device = pick_device(device)
        except (ValueError, RuntimeError) as e:
            raise TokenizerError(f"{self.model}: {e}") from None
        self.precision = _precision_option(precision) or ("bf16" if self.device.type == "cuda" else "fp32")
        self.dtype = PRECISIONS[self.precision]
        self.batch_size = _int_option(batch_size, "batch_size") or DEFAULT_BATCH_SIZE[self.kind]
        self._levels = tuple(int(v) for v in levels)
        self._resolution = int(resolution)
        self._spatial = spatial_compression
        self._temporal = temporal_compression
        self._window = temporal_window
        if self._spatial is not None and self._resolution % self._spatial:
            raise TokenizerError(f"{self.model}: resolution {self._resolution} is not a multiple of "
                                 f"the spatial compression {self._spatial}")

        encoder_path = self.directory / ENCODER_FILE
        data = _read_file(encoder_path, "the encoder is required")
        self._encoder_sha256 = hashlib.sha256(data).hexdigest()
        if expected_encoder_sha256 and expected_encoder_sha256 != self._encoder_sha256:
            raise TokenizerError(f"{encoder_path} does not match the encoder_sha256 in "
                                 f"{self.directory / CONFIG_FILE} (changed since it was saved?)")
        self._encoder = _load_jit(data, encoder_path, self.device, self.dtype, self.model)
        del data
        self._decoder: torch.jit.ScriptModule | None = None
        # uint8 -> model input, exactly as utils.numpy2tensor: (x / 255) * 2 - 1 in float64, then cast.
        lut = torch.from_numpy(np.arange(256, dtype=np.float64) / _UINT8_MAX_F * 2.0 - 1.0)
        self._lut = lut.to(self.dtype).to(self.device)
        if probe or self._spatial is None:
            self._probe()

    # --- interface ----------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self._resolution

    @property
    def spatial_compression(self) -> int:
        assert self._spatial is not None  # given, or read off the encoder by _probe() in __init__
        return self._spatial

    @property
    def levels(self) -> tuple[int, ...]:
        return self._levels

    @property
    def grid_shape(self) -> tuple[int, int]:
        g = self._resolution // self.spatial_compression
        return (g, g)

    @property
    def vocab_size(self) -> int:
        return math.prod(self._levels)

    @property
    def has_decoder(self) -> bool:
        return (self.directory / DECODER_FILE).is_file()

    def config(self) -> dict[str, Any]:
        return {"quantizer": "fsq", "levels": list(self._levels), "spatial_compression": self._spatial,
                "resolution": self._resolution, "precision": self.precision}

    def weights_digest(self) -> str:
        # The decoder does not decide codes; the encoder (with the FSQ it contains) and the
        # levels that give the indices their meaning do.
        return sha256_hex(canonical_json({"encoder_sha256": self._encoder_sha256,
                                          "levels": list(self._levels)}))

    def codebook(self) -> np.ndarray:
        return fsq_codebook(self._levels)

    # --- JIT plumbing ---------------------------------------------------------
    def _to_input(self, pixels: np.ndarray) -> torch.Tensor:
        """(n, [T,] R, R, 3) uint8 -> (n, 3, [T,] R, R) in [-1, 1] on the device, model dtype.

        Channels-first as a permuted view of channels-last memory, which is the layout
        utils.numpy2tensor hands the reference encoder (transpose, then from_numpy).
        """
        x = self._lut[host_to_device(np.ascontiguousarray(pixels), self.device).int()]
        return x.permute(0, x.ndim - 1, *range(1, x.ndim - 1))

    def _encode_fixed(self, pixels: np.ndarray, latent_shape: tuple[int, ...]) -> np.ndarray:
        # "fp32" means float32 on a GPU too (TF32 convolutions change codes).
        with full_fp32(self.precision == "fp32"):
            return self._encode_padded(pixels, latent_shape)

    def _encode_padded(self, pixels: np.ndarray, latent_shape: tuple[int, ...]) -> np.ndarray:
        """Encode n <= batch_size samples in a batch of exactly batch_size (the last sample is
        repeated as padding), so a sample's codes never depend on how many others share its
        call: kernels that are picked by batch size always see the same size."""
        n = len(pixels)
        if n < self.batch_size:
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], self.batch_size - n, axis=0)])
        x = self._to_input(pixels)
        idx = self._indices(self._run(self._encoder, x, ENCODER_FILE), len(pixels), latent_shape)
        return idx[:n].to("cpu", torch.int64).numpy()

    def _run(self, module: torch.nn.Module, x: torch.Tensor, filename: str) -> Any:
        try:
            return module(x)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            msg = str(e).strip().splitlines()
            raise TokenizerError(f"{self.model}: {filename} failed on input {tuple(x.shape)} {x.dtype}: "
                                 f"{type(e).__name__}: {msg[0] if msg else ''}") from e

    def _indices(self, out: object, n: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The indices of the encoder's `(indices, codes[, loss])`, with the contract checked."""
        where = f"{self.model} ({self.directory / ENCODER_FILE})"
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            raise TokenizerError(
                f"{where}: the encoder returned {_describe(out)}; a Cosmos discrete encoder returns "
                "(indices, codes) or (indices, codes, loss) - is this a continuous (CI/CV) tokenizer?")
        idx, codes = out[0], out[1]
        want = (n, *latent_shape)
        if not isinstance(idx, torch.Tensor) or idx.dtype not in _INTEGER_DTYPES:
            raise TokenizerError(f"{where}: the encoder's indices are {_describe(idx)}, expected an integer "
                                 f"tensor of shape {want}")
        if tuple(idx.shape) != want:
            raise TokenizerError(f"{where}: the encoder's indices have shape {tuple(idx.shape)}, expected {want} "
                                 f"(spatial compression {self._spatial}"
                                 + (f", temporal compression {self._temporal}" if self._temporal else "") + ")")
        want_codes = (n, len(self._levels), *latent_shape)
        if not isinstance(codes, torch.Tensor) or tuple(codes.shape) != want_codes:
            raise TokenizerError(f"{where}: the encoder's codes are {_describe(codes)}, expected shape "
                                 f"{want_codes} (one channel per FSQ level {list(self._levels)})")
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.vocab_size:
                raise TokenizerError(f"{where}: the encoder produced indices in [{lo}, {hi}], outside "
                                     f"[0, {self.vocab_size}) of FSQ levels {list(self._levels)}")
        return idx

    def _decoder_module(self) -> torch.jit.ScriptModule:
        if self._decoder is None:
            path = self.directory / DECODER_FILE
            if not path.is_file():
                raise TokenizerError(f"{self.model}: no {DECODER_FILE} in {self.directory}, so it cannot decode; "
                                     f"copy the model's {DECODER_FILE} there (encoding needs only {ENCODER_FILE})")
            self._decoder = _load_jit(_read_file(path, "needed to decode"), path, self.device, self.dtype,
                                      self.model)
        return self._decoder

    def _decode_fixed(self, codes: np.ndarray, pixel_shape: tuple[int, ...]) -> np.ndarray:
        """(n, *latent) indices -> (n, *pixel_shape) uint8, as utils.tensor2numpy converts."""
        # int32, the dtype the reference encoder emits and its decoder was traced with.
        idx = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int32)).to(self.device)
        out = self._run(self._decoder_module(), idx, DECODER_FILE)
        # pixel_shape is ([T,] R, R, 3); the decoder gives (n, 3, [T,] R, R)
        want = (len(codes), 3, *pixel_shape[:-1])
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or tuple(out.shape) != want:
            raise TokenizerError(f"{self.model} ({self.directory / DECODER_FILE}): the decoder returned "
                                 f"{_describe(out)}, expected a float tensor of shape {want}")
        img = ((out.float() + 1.0) / 2.0).clamp(0, 1)
        img = img.permute(0, *range(2, img.ndim), 1)
        return (img * _UINT8_MAX_F + 0.5).to(torch.uint8).cpu().numpy()

    def _probe(self) -> None:
        """One sample through the encoder at load: the output contract is checked up front, and
        an unknown spatial compression is read off the grid."""
        r = self._resolution
        shape = (1, 1, r, r, 3) if self.kind == "video" else (1, r, r, 3)
        x = self._to_input(np.full(shape, 128, np.uint8))
        with torch.inference_mode():
            out = self._run(self._encoder, x, ENCODER_FILE)
        if self._spatial is None:
            idx = out[0] if isinstance(out, (tuple, list)) and out else None
            hw = tuple(idx.shape[-2:]) if isinstance(idx, torch.Tensor) and idx.ndim >= 3 else None
            if not hw or hw[0] != hw[1] or hw[0] < 1 or r % hw[0]:
                raise TokenizerError(f"{self.model}: cannot tell the spatial compression from the encoder's "
                                     f"output {_describe(out)}; pass spatial_compression=8 or 16")
            self._spatial = r // hw[0]
        latent = (1, *self.grid_shape) if self.kind == "video" else self.grid_shape
        self._indices(out, 1, latent)

    # --- artifact ----------------------------------------------------------
    def _artifact_doc(self) -> dict[str, Any]:
        return {"tokenizer": self.name, "version": self.version, "model": self.model, "config": self.config(),
                "encoder_sha256": self._encoder_sha256, "weights_sha256": self.weights_digest(),
                "has_decoder": self.has_decoder}

    def save(self, directory: str | os.PathLike) -> None:
        """Copy encoder.jit (and decoder.jit if present) and write config.json into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config_path = directory / CONFIG_FILE
        if config_path.is_file():
            try:
                ours = isinstance(json.loads(config_path.read_text()).get("tokenizer"), str)
            except (ValueError, AttributeError):
                ours = False
            if not ours:
                raise TokenizerError(f"{config_path} exists and was not written by tokshard; "
                                     "save the tokenizer into another folder")
        for name in (ENCODER_FILE, DECODER_FILE):
            src, dst = self.directory / name, directory / name
            if not src.is_file():
                continue
            data = _read_file(src, "to save")
            if name == ENCODER_FILE and hashlib.sha256(data).hexdigest() != self._encoder_sha256:
                raise TokenizerError(f"{src} changed since this tokenizer was loaded; reload it before saving")
            if dst.exists() and dst.resolve() == src.resolve():
                continue
            tmp = dst.with_name(dst.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dst)
        tmp = config_path.with_name(CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(self._artifact_doc(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, config_path)

    @classmethod
    def load(cls, directory: str | os.PathLike | None, **options: Any) -> _CosmosDiscrete:
        """Load from a folder with encoder.jit [+ decoder.jit] [+ config.json].

        Without config.json (a folder as NVIDIA ships it) the compression factors come from
        the options, else from the model/folder name (e.g. "Cosmos-0.1-Tokenizer-DV4x8x8"),
        else (spatial only) from a probe of the encoder. Options override config.json.
        """
        unknown = sorted(set(options) - cls._options)
        if unknown:
            raise TypeError(f"unexpected option(s) {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(cls._options))})")
        directory = _local_directory(directory)
        doc = _read_config(directory, cls.name)
        cfg = doc.get("config", {})
        model = options.get("model") or doc.get("model") or directory.name
        named = parse_model_name(str(model)) or parse_model_name(directory.name)
        if named is not None:
            if not named["discrete"]:
                raise TokenizerError(f"{model} is a continuous Cosmos tokenizer (C{named['kind'][0].upper()}); "
                                     f"{cls.name} needs a discrete one (D{cls.kind[0].upper()})")
            if named["kind"] != cls.kind:
                other = "cosmos-dv" if named["kind"] == "video" else "cosmos-di"
                raise TokenizerError(f"{model} is a Cosmos {named['kind']} tokenizer: load it as {other!r}, "
                                     f"not {cls.name!r}")
        kwargs: dict[str, Any] = {
            "model": str(model),
            "device": options.get("device") or None,
            "batch_size": _int_option(options.get("batch_size"), "batch_size"),
            "precision": _precision_option(options.get("precision")) or cfg.get("precision"),
            "resolution": _int_option(options.get("resolution"), "resolution") or cfg.get("resolution")
            or DEFAULT_RESOLUTION,
            "spatial_compression": _int_option(options.get("spatial_compression"), "spatial_compression")
            or cfg.get("spatial_compression") or (named or {}).get("spatial"),
            "levels": _levels_option(options.get("levels")) or _levels_option(cfg.get("levels")) or DEFAULT_LEVELS,
            "probe": as_bool(options.get("probe", True), "probe"),
            "expected_encoder_sha256": doc.get("encoder_sha256"),
        }
        kwargs.update(cls._load_extra(options, cfg, named))
        return cls(directory, **kwargs)

    @classmethod
    def _load_extra(cls, options: dict[str, Any], cfg: dict[str, Any],
                    named: dict[str, Any] | None) -> dict[str, Any]:
        return {}

    @classmethod
    def from_options(cls, path: str | None = None, **options: Any) -> _CosmosDiscrete:
        """Build from CLI options (strings): path=DIR is required; see `load` for the rest."""
        return cls.load(path, **options)


def _read_config(directory: Path, name: str) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or "tokenizer" not in doc:
        # Not ours (e.g. some other tool's config.json beside the JIT files): ignore it.
        return {}
    if doc.get("tokenizer") != name:
        raise TokenizerError(f"{directory} holds a {doc.get('tokenizer')!r} tokenizer, not {name!r}")
    if int(doc.get("version", 0)) > _CosmosDiscrete.version:
        raise TokenizerError(f"{directory} was written by a newer {name} (version {doc['version']})")
    if not isinstance(doc.get("config", {}), dict):
        raise TokenizerError(f"{path}: 'config' is not an object")
    return doc


class CosmosImageTokenizer(_CosmosDiscrete):
    """Cosmos-Tokenizer DI8x8 / DI16x16: (N, R, R, 3) uint8 -> (N, R/c, R/c) FSQ indices < 64000.

    Options: path (required, local folder), device, batch_size (images per encoder call;
    every call is padded to exactly this many), precision (bf16 | fp16 | fp32), resolution
    (multiple of the spatial compression), model, spatial_compression, levels, probe.
    """

    name = "cosmos-di"
    kind = "image"

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> np.ndarray:
        self.check_images(images)
        out = np.empty((len(images), *self.grid_shape), dtype=np.int64)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            out[start:start + len(chunk)] = self._encode_fixed(chunk, self.grid_shape)
        return out

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = self.check_codes(codes)
        r = self.resolution
        out = np.empty((len(codes), r, r, 3), dtype=np.uint8)
        for start in range(0, len(codes), self.batch_size):
            chunk = codes[start:start + self.batch_size]
            out[start:start + len(chunk)] = self._decode_fixed(chunk, (r, r, 3))
        return out


class CosmosVideoTokenizer(_CosmosDiscrete, ClipTokenizer):
    """Cosmos-Tokenizer DV4x8x8 / DV8x8x8 / DV8x16x16 (causal video, FSQ, 64000 codes).

    `encode_clips((N, T, R, R, 3) uint8) -> (N, t, R/c, R/c)`: the clip is cut into windows of
    `temporal_window` frames (0 = one window), each window of 1 + k * c_t frames becomes
    1 + k latent frames, windows are encoded independently and concatenated, as
    `CausalVideoTokenizer.forward` does. `encode(images)` treats each image as a one-frame
    clip (-> one latent frame), so the image pipeline can run a video tokenizer.

    Options: those of cosmos-di, plus temporal_compression (4 or 8; read from the model
    name when not given) and temporal_window (default 17; must be 1 + k * c_t, or 0).
    `batch_size` counts clips per encoder call.
    """

    name = "cosmos-dv"
    kind = "video"
    _options = _CosmosDiscrete._options | {"temporal_compression", "temporal_window"}
    # Always set by __init__ (None only on the image tokenizer).
    _temporal: int
    _window: int

    def __init__(self, directory: str | os.PathLike, *, temporal_compression: int | None = None,
                 temporal_window: int | None = DEFAULT_TEMPORAL_WINDOW, **kwargs: Any):
        model = kwargs.get("model") or Path(str(directory)).name
        if not temporal_compression:
            raise TokenizerError(f"{model}: unknown temporal compression; pass temporal_compression=4 or 8 "
                                 "(the first number of the model name, e.g. DV4x8x8 -> 4)")
        temporal_compression = int(temporal_compression)
        window = DEFAULT_TEMPORAL_WINDOW if temporal_window is None else int(temporal_window)
        if window < 0 or (window and (window - 1) % temporal_compression):
            raise TokenizerError(f"{model}: temporal_window={window} must be 1 + k * {temporal_compression} "
                                 f"frames (e.g. {1 + 2 * temporal_compression}), or 0 to encode each clip "
                                 "in one window")
        super().__init__(directory, temporal_compression=temporal_compression, temporal_window=window, **kwargs)

    @classmethod
    def _load_extra(cls, options: dict[str, Any], cfg: dict[str, Any],
                    named: dict[str, Any] | None) -> dict[str, Any]:
        window = _int_option(options.get("temporal_window"), "temporal_window", minimum=0)
        if window is None:
            window = cfg.get("temporal_window", DEFAULT_TEMPORAL_WINDOW)
        return {
            "temporal_compression": _int_option(options.get("temporal_compression"), "temporal_compression")
            or cfg.get("temporal_compression") or (named or {}).get("temporal"),
            "temporal_window": window,
        }

    @property
    def temporal_compression(self) -> int:
        return self._temporal

    @property
    def temporal_window(self) -> int:
        return self._window

    def config(self) -> dict[str, Any]:
        return {**super().config(), "temporal_compression": self._temporal, "temporal_window": self._window}

    # --- the 1 + T rule and windows ----------------------------------------------
    def windows(self, num_frames: int) -> list[tuple[int, int]]:
        """[(start, end)) frame windows of a clip, as video_lib.forward cuts them; each checked."""
        if num_frames < 1:
            raise ValueError(f"{self.name}: a clip needs at least one frame")
        step = self._window or num_frames
        out = [(s, min(s + step, num_frames)) for s in range(0, num_frames, step)]
        ct = self._temporal
        for i, (s, e) in enumerate(out):
            if (e - s - 1) % ct:
                where = (f"its window {i} (frames {s}..{e - 1}) has {e - s} frames; with temporal_window="
                         f"{self._window} a clip must be {self._window} * n + (1 + k * {ct}) frames long, "
                         "or set temporal_window=0" if len(out) > 1 else f"it is not 1 + k * {ct}")
                raise ValueError(
                    f"{self.model}: a clip of {num_frames} frames cannot be encoded: {where} "
                    f"(Cosmos' causal {ct}x temporal compression maps 1 + k * {ct} frames to 1 + k latent "
                    f"frames; the longest usable clip is {self.usable_frames(num_frames)} frames)")
        return out

    def usable_frames(self, num_frames: int) -> int:
        """The longest clip length <= num_frames that encode_clips accepts (0 if none)."""
        ct, tw = self._temporal, self._window
        if num_frames < 1:
            return 0
        if not tw:
            return 1 + (num_frames - 1) // ct * ct
        full, rest = divmod(num_frames, tw)
        return full * tw + (1 + (rest - 1) // ct * ct if rest else 0)

    def latent_frames(self, num_frames: int) -> int:
        return sum(1 + (e - s - 1) // self._temporal for s, e in self.windows(num_frames))

    def clip_grid_shape(self, num_frames: int) -> tuple[int, int, int]:
        return (self.latent_frames(num_frames), *self.grid_shape)

    def _latent_windows(self, latent_frames: int) -> list[tuple[int, int]]:
        step = 1 + (self._window - 1) // self._temporal if self._window else latent_frames
        return [(s, min(s + step, latent_frames)) for s in range(0, latent_frames, step)]

    # --- encode / decode -----------------------------------------------------------
    @torch.inference_mode()
    def encode_clips(self, clips: np.ndarray) -> np.ndarray:
        r = self.resolution
        if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[2:] != (r, r, 3):
            raise ValueError(f"{self.name} expects (N, T, {r}, {r}, 3) uint8 clips, got {clips.shape} {clips.dtype}")
        wins = self.windows(clips.shape[1])
        lat = [1 + (e - s - 1) // self._temporal for s, e in wins]
        out = np.empty((len(clips), sum(lat), *self.grid_shape), dtype=np.int64)
        for start in range(0, len(clips), self.batch_size):
            chunk = clips[start:start + self.batch_size]
            col = 0
            for (s, e), t in zip(wins, lat):
                out[start:start + len(chunk), col:col + t] = self._encode_fixed(chunk[:, s:e], (t, *self.grid_shape))
                col += t
        return out

    @torch.inference_mode()
    def decode_clips(self, codes: np.ndarray) -> np.ndarray:
        """(N, t, h, w) indices -> (N, T, R, R, 3) uint8, window by window as they were encoded."""
        codes = np.asarray(codes)
        if codes.ndim != 4 or codes.shape[1] < 1:
            raise ValueError(f"{self.name} expects clip codes of shape (N, t, {', '.join(map(str, self.grid_shape))})"
                             f", got {codes.shape}")
        codes = self.check_codes(codes, (codes.shape[1], *self.grid_shape))
        r, ct = self.resolution, self._temporal
        wins = self._latent_windows(codes.shape[1])
        frames = [1 + (e - s - 1) * ct for s, e in wins]
        out = np.empty((len(codes), sum(frames), r, r, 3), dtype=np.uint8)
        for start in range(0, len(codes), self.batch_size):
            chunk = codes[start:start + self.batch_size]
            col = 0
            for (s, e), f in zip(wins, frames):
                out[start:start + len(chunk), col:col + f] = self._decode_fixed(chunk[:, s:e], (f, r, r, 3))
                col += f
        return out

    def encode(self, images: np.ndarray) -> np.ndarray:
        self.check_images(images)
        return self.encode_clips(images[:, None])[:, 0]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = self.check_codes(codes)
        return self.decode_clips(codes[:, None])[:, 0]
