"""Cosmos discrete tokenizers (cosmos-di / cosmos-dv) on tiny TorchScript models that keep
NVIDIA's JIT contract: the encoder maps (B, 3, [T,] H, W) in [-1, 1] to
(indices int32, codes, loss) with Cosmos' FSQ (levels 8,8,8,5,5,5 -> 64000 codes), the
decoder maps indices back to pixels in [-1, 1]; video models are causal (1 + k*c_t frames
-> 1 + k latent frames)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tokshard.errors import TokenizerError, UsageError
from tokshard.tokenizers.cosmos import (
    CosmosImageTokenizer,
    CosmosVideoTokenizer,
    fsq_codebook,
    parse_model_name,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

LEVELS: list[int] = [8, 8, 8, 5, 5, 5]
VOCAB = 64000
R = 32          # image side in the tests
C = 8           # spatial compression of the tiny models
CT = 4          # temporal compression of the tiny video model
RV = 16         # video frame side


# --- tiny models with the Cosmos contract -------------------------------------------
class FSQ(nn.Module):
    """Cosmos' FSQuantizer.forward (modules/quantizers.py) for channels-first latents."""

    def __init__(self, levels: list[int]):
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.int32))
        self.register_buffer("basis", torch.cumprod(torch.tensor([1] + levels[:-1]), 0).to(torch.int32))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.movedim(1, -1).float()
        levels = self.levels.float()
        half_l = (levels - 1) * (1 + 1e-3) / 2
        offset = (self.levels % 2 == 0).float() * 0.5
        shift = torch.atanh(offset / half_l)
        bounded = torch.tanh(z + shift) * half_l - offset
        half_width = (self.levels // 2).float()
        q = torch.round(bounded) / half_width
        idx = ((q * half_width + half_width) * self.basis.float()).sum(-1).to(torch.int32)
        return idx, q.movedim(-1, 1)


class InvFSQ(nn.Module):
    """Cosmos' InvQuantizerJit: indices -> normalised codes, channels first."""

    def __init__(self, levels: list[int]):
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.int64))
        self.register_buffer("basis", torch.cumprod(torch.tensor([1] + levels[:-1]), 0))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices.to(torch.int64).unsqueeze(-1) // self.basis) % self.levels
        half = self.levels // 2
        return ((digits - half) / half).movedim(-1, 1)


class ImageEncoder(nn.Module):
    def __init__(self, c: int = C, gain: float = 4.0, shift_indices: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(3, len(LEVELS), c, stride=c)
        self.fsq = FSQ(LEVELS)
        self.gain = gain
        self.shift_indices = shift_indices

    @torch.jit.export
    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.gain

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx, codes = self.fsq(self.latent(x))
        return idx + self.shift_indices, codes, torch.zeros(1)


class ImageDecoder(nn.Module):
    def __init__(self, c: int = C):
        super().__init__()
        self.inv = InvFSQ(LEVELS)
        self.deconv = nn.ConvTranspose2d(len(LEVELS), 3, c, stride=c)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.deconv(self.inv(indices).to(self.deconv.weight.dtype)))


class VideoEncoder(nn.Module):
    """Causal: the first frame is repeated CT-1 times in front, then (CT, C, C) blocks."""

    def __init__(self, ct: int = CT, c: int = C):
        super().__init__()
        self.ct = ct
        self.conv = nn.Conv3d(3, len(LEVELS), (ct, c, c), stride=(ct, c, c))
        self.fsq = FSQ(LEVELS)

    @torch.jit.export
    def latent(self, x: torch.Tensor) -> torch.Tensor:
        pad = x[:, :, :1].expand(-1, -1, self.ct - 1, -1, -1)
        return self.conv(torch.cat([pad, x], 2)) * 4.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx, codes = self.fsq(self.latent(x))
        return idx, codes, torch.zeros(1)


class VideoDecoder(nn.Module):
    def __init__(self, ct: int = CT, c: int = C):
        super().__init__()
        self.ct = ct
        self.inv = InvFSQ(LEVELS)
        self.deconv = nn.ConvTranspose3d(len(LEVELS), 3, (ct, c, c), stride=(ct, c, c))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.deconv(self.inv(indices).to(self.deconv.weight.dtype)))
        return y[:, :, self.ct - 1:]


class SingleTensor(nn.Module):
    """A continuous-tokenizer-like encoder: one latent tensor, no indices."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, C, stride=C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FloatIndices(ImageEncoder):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx, codes = self.fsq(self.latent(x))
        return idx.float(), codes, torch.zeros(1)


def _script_save(module: nn.Module, path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    for m in module.modules():           # re-initialise deterministically per seed
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    torch.jit.save(torch.jit.script(module.eval()), str(path))


def _make_dir(root, name, encoder, decoder=None, seed=0):
    d = root / name
    d.mkdir(parents=True)
    _script_save(encoder, d / "encoder.jit", seed)
    if decoder is not None:
        _script_save(decoder, d / "decoder.jit", seed + 1)
    return d


@pytest.fixture(scope="module")
def di_dir(tmp_path_factory):
    return _make_dir(tmp_path_factory.mktemp("cosmos"), "Cosmos-0.1-Tokenizer-DI8x8", ImageEncoder(), ImageDecoder())


@pytest.fixture(scope="module")
def dv_dir(tmp_path_factory):
    return _make_dir(tmp_path_factory.mktemp("cosmos"), "Cosmos-0.1-Tokenizer-DV4x8x8", VideoEncoder(), VideoDecoder())


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (9, R // 4, R // 4, 3)).astype(np.uint8)
    # smooth-ish images: blocks plus noise, so the codes vary but are not pure noise
    up = np.repeat(np.repeat(base, 4, 1), 4, 2).astype(np.int16)
    return np.clip(up + rng.integers(-20, 21, up.shape), 0, 255).astype(np.uint8)


def _clips(n, t, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, t, RV, RV, 3)).astype(np.uint8)


# --- an independent reference ------------------------------------------------------
def _reference_input(pixels: np.ndarray) -> torch.Tensor:
    """utils.numpy2tensor: channels first, (x / 255) * 2 - 1 in float64, cast to float32."""
    x = pixels.transpose((0, pixels.ndim - 1, *range(1, pixels.ndim - 1))) / 255.0
    return torch.from_numpy(2.0 * x - 1.0).to(torch.float32)


def _reference_fsq(z: np.ndarray, levels=LEVELS) -> np.ndarray:
    """FSQ indices of channels-first latents, in float64 numpy (bound -> round -> mixed radix)."""
    z = np.moveaxis(z.astype(np.float64), 1, -1)
    lv = np.asarray(levels, np.float64)
    half_l = (lv - 1) * (1 + 1e-3) / 2
    offset = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0)
    bounded = np.tanh(z + np.arctanh(offset / half_l)) * half_l - offset
    digits = np.round(bounded) + np.asarray(levels) // 2       # 0 .. L-1
    basis = np.cumprod([1] + list(levels[:-1]))
    return (digits * basis).sum(-1).astype(np.int64)


def _reference_indices(directory, pixels):
    enc = torch.jit.load(str(directory / "encoder.jit"))
    with torch.no_grad():
        z = enc.latent(_reference_input(pixels)).numpy()
    return _reference_fsq(z)


# --- image tokenizer --------------------------------------------------------------
def test_encode_shapes_dtype_and_independent_fsq(di_dir, images):
    tok = CosmosImageTokenizer.load(di_dir, resolution=R, device="cpu")
    assert (tok.name, tok.vocab_size, tok.grid_shape, tok.spatial_compression) == ("cosmos-di", VOCAB, (4, 4), 8)
    assert tok.precision == "fp32" and tok.config()["precision"] == "fp32"   # the CPU default
    codes = tok.encode(images)
    assert codes.dtype == np.int64 and codes.shape == (len(images), 4, 4)
    assert codes.min() >= 0 and codes.max() < VOCAB
    np.testing.assert_array_equal(codes, _reference_indices(di_dir, images))
    assert len(np.unique(codes)) > 20          # a real spread of codes, not one constant


def test_codebook_is_cosmos_implicit_fsq_codebook(di_dir, images):
    book = fsq_codebook(LEVELS)
    assert book.shape == (VOCAB, 6) and book.dtype == np.float32
    np.testing.assert_array_equal(book[0], [-1] * 6)
    np.testing.assert_array_equal(book[1], [-0.75, -1, -1, -1, -1, -1])       # least significant first
    np.testing.assert_array_equal(book[8], [-1, -0.75, -1, -1, -1, -1])
    np.testing.assert_array_equal(book[512], [-1, -1, -1, -0.5, -1, -1])
    np.testing.assert_array_equal(book[VOCAB - 1], [0.75, 0.75, 0.75, 1, 1, 1])
    assert len(np.unique(book, axis=0)) == VOCAB
    # the encoder's own codes output is codebook[indices]: index order matches Cosmos' FSQ
    tok = CosmosImageTokenizer.load(di_dir, resolution=R)
    np.testing.assert_array_equal(tok.codebook(), book)
    enc = torch.jit.load(str(di_dir / "encoder.jit"))
    with torch.no_grad():
        idx, codes, _ = enc(_reference_input(images))
    np.testing.assert_array_equal(np.moveaxis(codes.numpy(), 1, -1), book[idx.numpy()])


def test_codes_are_deterministic_and_independent_of_batch_composition(di_dir, images):
    tok = CosmosImageTokenizer.load(di_dir, resolution=R, batch_size=4)
    together = tok.encode(images)
    np.testing.assert_array_equal(together, tok.encode(images))
    alone = np.concatenate([tok.encode(images[i:i + 1]) for i in range(len(images))])
    np.testing.assert_array_equal(alone, together)
    order = np.random.default_rng(3).permutation(len(images))
    np.testing.assert_array_equal(tok.encode(images[order]), together[order])
    assert tok.encode(images[:0]).shape == (0, 4, 4)


def test_decode_shape_and_matches_codebook_through_the_decoder(di_dir, images):
    tok = CosmosImageTokenizer.load(di_dir, resolution=R, batch_size=4)
    codes = tok.encode(images)
    recon = tok.decode(codes)
    assert recon.dtype == np.uint8 and recon.shape == images.shape
    dec = torch.jit.load(str(di_dir / "decoder.jit"))
    latent = torch.from_numpy(np.moveaxis(tok.codebook()[codes], -1, 1))
    with torch.no_grad():
        y = torch.tanh(dec.deconv(latent)).numpy()
    expected = (np.clip((y + 1) / 2, 0, 1).transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(recon, expected)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(np.full((1, 4, 4), VOCAB))
    with pytest.raises(ValueError, match="shape"):
        tok.decode(codes[:, :2])


def test_without_decoder_encode_works_and_decode_is_a_clear_error(tmp_path, images):
    d = _make_dir(tmp_path, "Cosmos-0.1-Tokenizer-DI8x8", ImageEncoder())
    tok = CosmosImageTokenizer.load(d, resolution=R)
    assert not tok.has_decoder
    codes = tok.encode(images[:2])
    with pytest.raises(TokenizerError, match="no decoder.jit"):
        tok.decode(codes)


def test_bf16_precision_runs_and_is_part_of_the_identity(di_dir, images):
    fp32 = CosmosImageTokenizer.load(di_dir, resolution=R)
    bf16 = CosmosImageTokenizer.load(di_dir, resolution=R, precision="bf16")
    assert bf16.config()["precision"] == "bf16"
    assert bf16.identity().config_hash != fp32.identity().config_hash
    assert bf16.identity().codebook_hash == fp32.identity().codebook_hash
    codes = bf16.encode(images[:3])
    assert codes.shape == (3, 4, 4) and codes.dtype == np.int64 and codes.max() < VOCAB
    assert bf16.decode(codes).shape == (3, R, R, 3)


def test_spatial_compression_from_name_probe_or_option(tmp_path, images):
    # DI16x16 by name
    d16 = _make_dir(tmp_path, "Cosmos-0.1-Tokenizer-DI16x16", ImageEncoder(c=16), ImageDecoder(c=16))
    tok = CosmosImageTokenizer.load(d16, resolution=R)
    assert tok.grid_shape == (2, 2) and tok.encode(images[:2]).shape == (2, 2, 2)
    # a folder name that says nothing: the probe reads the compression off the output grid
    anon = _make_dir(tmp_path, "my-tokenizer", ImageEncoder(c=16))
    assert CosmosImageTokenizer.load(anon, resolution=R).spatial_compression == 16
    # an option that contradicts the model is refused at load
    with pytest.raises(TokenizerError, match=r"indices have shape \(1, 2, 2\), expected \(1, 4, 4\)"):
        CosmosImageTokenizer.load(d16, resolution=R, spatial_compression=8)
    with pytest.raises(TokenizerError, match="not a multiple"):
        CosmosImageTokenizer.load(d16, resolution=40)


def test_model_names_are_parsed():
    assert parse_model_name("Cosmos-0.1-Tokenizer-DV4x8x8") == {
        "kind": "video", "discrete": True, "spatial": 8, "temporal": 4}
    assert parse_model_name("Cosmos-1.0-Tokenizer-DI16x16-LowRes") == {
        "kind": "image", "discrete": True, "spatial": 16, "temporal": None}
    assert parse_model_name("CosmosCausalDV_f8x16x16")["temporal"] == 8
    assert parse_model_name("Cosmos-0.1-Tokenizer-CV8x8x8")["discrete"] is False
    assert parse_model_name("tokenizer") is None


# --- bad artifacts ---------------------------------------------------------------
def test_missing_broken_or_remote_paths_are_tokenizer_errors(tmp_path, di_dir):
    with pytest.raises(TokenizerError, match="not a local directory"):
        CosmosImageTokenizer.load(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="does not download"):
        CosmosImageTokenizer.load("nvidia/Cosmos-0.1-Tokenizer-DI8x8")
    with pytest.raises(TokenizerError, match="needs path="):
        CosmosImageTokenizer.from_options()
    empty = tmp_path / "Cosmos-0.1-Tokenizer-DI8x8"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="no encoder.jit"):
        CosmosImageTokenizer.load(empty)
    (empty / "encoder.jit").write_bytes(b"PK\x03\x04 this is not a torchscript archive")
    with pytest.raises(TokenizerError, match="cannot load .*encoder.jit as a TorchScript module"):
        CosmosImageTokenizer.load(empty)
    # a truncated real archive
    (empty / "encoder.jit").write_bytes((di_dir / "encoder.jit").read_bytes()[:2000])
    with pytest.raises(TokenizerError, match="as a TorchScript module"):
        CosmosImageTokenizer.load(empty)


@pytest.mark.parametrize("module, message", [
    (SingleTensor(), r"returned a float32 tensor of shape \(1, 16, 4, 4\).*continuous"),
    (FloatIndices(), r"indices are a float32 tensor"),
    (ImageEncoder(c=4), r"indices have shape \(1, 8, 8\), expected \(1, 4, 4\)"),
    (ImageEncoder(shift_indices=VOCAB), r"Cosmos-0.1-Tokenizer-DI8x8 .*indices in \[\d+, \d+\], outside \[0, 64000\)"),
])
def test_wrong_output_contract_is_one_tokenizer_error(tmp_path, images, module, message):
    d = _make_dir(tmp_path, "Cosmos-0.1-Tokenizer-DI8x8", module)
    with pytest.raises(TokenizerError, match=message):
        CosmosImageTokenizer.load(d, resolution=R)                      # caught by the load probe
    tok = CosmosImageTokenizer.load(d, resolution=R, probe=False, spatial_compression=8, batch_size=4)
    with pytest.raises(TokenizerError, match=message.replace(r"\(1, ", r"\(4, ")):
        tok.encode(images[:3])                                          # and at encode without it


def test_encoder_that_fails_on_the_input_is_a_tokenizer_error(tmp_path):
    d = _make_dir(tmp_path, "some-model", VideoEncoder())
    with pytest.raises(TokenizerError, match="some-model: encoder.jit failed on input"):
        CosmosImageTokenizer.load(d, resolution=R, spatial_compression=8)   # 4-D input to a 3-D conv


def test_kind_mismatch_and_continuous_models_are_refused(di_dir, dv_dir):
    with pytest.raises(TokenizerError, match="load it as 'cosmos-dv'"):
        CosmosImageTokenizer.load(dv_dir)
    with pytest.raises(TokenizerError, match="load it as 'cosmos-di'"):
        CosmosVideoTokenizer.load(di_dir)
    with pytest.raises(TokenizerError, match="continuous"):
        CosmosImageTokenizer.load(di_dir, model="Cosmos-0.1-Tokenizer-CI8x8")


# --- identity and artifact --------------------------------------------------------
def test_identity_follows_the_encoder_file(tmp_path, di_dir):
    a = CosmosImageTokenizer.load(di_dir, resolution=R)
    assert a.identity() == CosmosImageTokenizer.load(di_dir, resolution=R).identity()
    assert a.identity().tokenizer_id == "cosmos-di/1"
    other = _make_dir(tmp_path, "Cosmos-0.1-Tokenizer-DI8x8", ImageEncoder(), ImageDecoder(), seed=7)
    b = CosmosImageTokenizer.load(other, resolution=R)
    assert b.weights_digest() != a.weights_digest()
    assert b.identity().config_hash == a.identity().config_hash
    # the decoder does not decide codes, so it is not part of the identity
    (other / "decoder.jit").write_bytes((di_dir / "decoder.jit").read_bytes())
    assert CosmosImageTokenizer.load(other, resolution=R).weights_digest() == b.weights_digest()
    assert CosmosImageTokenizer.load(di_dir, resolution=2 * R).identity().config_hash != a.identity().config_hash


def test_save_load_round_trip(tmp_path, di_dir, images):
    tok = CosmosImageTokenizer.load(di_dir, resolution=R, batch_size=4)
    out = tmp_path / "saved"
    tok.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "decoder.jit", "encoder.jit"]
    doc = json.loads((out / "config.json").read_text())
    assert doc["tokenizer"] == "cosmos-di" and doc["model"] == "Cosmos-0.1-Tokenizer-DI8x8"
    assert doc["config"]["spatial_compression"] == 8 and doc["config"]["levels"] == LEVELS
    again = CosmosImageTokenizer.load(out)                    # resolution, precision from config.json
    assert again.identity() == tok.identity() and again.resolution == R and again.model == tok.model
    np.testing.assert_array_equal(again.encode(images), tok.encode(images))
    np.testing.assert_array_equal(again.decode(tok.encode(images[:2])), tok.decode(tok.encode(images[:2])))
    tok.save(out)                                             # saving again over itself is fine
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"_class_name": "SomethingElse"}')
    with pytest.raises(TokenizerError, match="not written by tokshard"):
        tok.save(foreign)
    again.save(out)                                           # ... even from the same directory
    # a saved artifact is refused by the other class, and a changed encoder is noticed
    with pytest.raises(TokenizerError, match="holds a 'cosmos-di' tokenizer"):
        CosmosVideoTokenizer.load(out, temporal_compression=4)
    _script_save(ImageEncoder(), out / "encoder.jit", seed=5)
    with pytest.raises(TokenizerError, match="does not match the encoder_sha256"):
        CosmosImageTokenizer.load(out)


def test_from_options_takes_cli_strings(di_dir, images):
    tok = CosmosImageTokenizer.from_options(path=str(di_dir), device="cpu", batch_size="3", precision="fp32",
                                            resolution=str(R), probe="false")
    assert tok.batch_size == 3 and tok.resolution == R
    assert tok.encode(images[:2]).shape == (2, 4, 4)
    with pytest.raises(TypeError, match="unexpected option"):
        CosmosImageTokenizer.from_options(path=str(di_dir), temporal_window="17")
    with pytest.raises(TokenizerError, match="precision"):
        CosmosImageTokenizer.from_options(path=str(di_dir), precision="int8")
    with pytest.raises(TokenizerError, match="batch_size"):
        CosmosImageTokenizer.from_options(path=str(di_dir), batch_size="many")


def test_registry_loads_it_by_name(di_dir):
    from tokshard.tokenizers import registry
    tok = registry.load_tokenizer("cosmos-di", {"path": str(di_dir), "resolution": str(R)})
    assert isinstance(tok, CosmosImageTokenizer)
    with pytest.raises(UsageError, match="unexpected option"):
        registry.load_tokenizer("cosmos-di", {"path": str(di_dir), "colour": "blue"})
    with pytest.raises(UsageError, match="not a local directory"):
        registry.load_tokenizer("cosmos-di", {"path": str(di_dir / "missing")})


def test_images_and_videos_round_trip_through_convert_and_the_loader(tmp_path, di_dir, dv_dir, photos):
    """Both built-ins as a user runs them: convert (the jit files copied into the
    dataset), then stream the codes back and decode them with the dataset's copy."""
    from test_video import make_video

    import tokshard
    from tokshard.pipeline.convert.job import ConvertConfig, convert
    from tokshard.pipeline.sample_data import jpeg_bytes

    src = tmp_path / "images"
    src.mkdir()
    for key, img, _ in photos[:6]:
        (src / f"{key}.jpg").write_bytes(jpeg_bytes(img, 90))
    dest = tmp_path / "di"
    convert(ConvertConfig(sources=[str(src)], out=str(dest), tokenizer="cosmos-di",
                          tokenizer_options={"path": str(di_dir), "resolution": str(R)}), quiet=True)
    with pytest.raises(TokenizerError, match="trust_tokenizer_code=True"):
        tokshard.open(dest).tokenizer()           # TorchScript runs code: not without consent
    from tokshard.pipeline.tools.report import write_report
    page = write_report(str(dest), str(tmp_path / "r.html"))    # everything but the reconstructions
    assert 'id="storage"' in page and "preview grid" not in page and "trust_tokenizer_code=True" in page
    page = write_report(str(dest), str(tmp_path / "r.html"), trust_tokenizer_code=True)
    assert "preview grid" in page
    ds = tokshard.open(dest, trust_tokenizer_code=True)
    tok = ds.tokenizer()
    assert isinstance(tok, CosmosImageTokenizer) and ds.vocab_size == 64000 and ds.token_dtype == np.uint16
    batch = next(iter(ds.loader(6, rank=0, world_size=1, shuffle=False)))
    assert batch["tokens"].shape == (6, R // C, R // C)
    assert tok.decode(batch["tokens"].numpy()).shape == (6, R, R, 3)

    videos = tmp_path / "videos"
    videos.mkdir()
    wide = [img for _, img, _ in photos if img.shape[1] >= 120]
    for i in range(2):
        (videos / f"v{i}.mp4").write_bytes(make_video(wide[i], 11))
    dest = tmp_path / "dv"
    result = convert(ConvertConfig(sources=[str(videos)], out=str(dest), tokenizer="cosmos-dv", clip_frames=5,
                                   tokenizer_options={"path": str(dv_dir), "resolution": str(RV)}), quiet=True)
    assert result["dataset"]["video"]["tokenized"] == "per_clip"
    ds = tokshard.open(dest)
    t, h, w = CosmosVideoTokenizer.load(dv_dir, resolution=RV).clip_grid_shape(5)
    assert ds.sample_shape == (t, h, w) == (1 + 4 // CT, RV // C, RV // C)
    keys = sorted(k for _, k, _, _ in ds)
    assert keys == ["v0_0000", "v0_0001", "v1_0000", "v1_0001"]     # 11 frames -> 2 clips of 5


# --- video tokenizer ----------------------------------------------------------------
def test_video_one_plus_t_rule(dv_dir):
    tok = CosmosVideoTokenizer.load(dv_dir, resolution=RV, temporal_window=0)
    assert (tok.temporal_compression, tok.spatial_compression, tok.grid_shape) == (4, 8, (2, 2))
    for k in range(4):
        clips = _clips(2, 1 + 4 * k, seed=k)
        codes = tok.encode_clips(clips)
        assert codes.shape == (2, 1 + k, 2, 2) and codes.dtype == np.int64
        assert tok.clip_grid_shape(1 + 4 * k) == (1 + k, 2, 2)
        np.testing.assert_array_equal(codes, _reference_indices(dv_dir, clips))
    for t in (2, 4, 6, 8):
        with pytest.raises(ValueError, match=rf"clip of {t} frames cannot be encoded: it is not 1 \+ k \* 4"):
            tok.encode_clips(_clips(1, t))
    assert [tok.usable_frames(t) for t in (1, 4, 5, 8, 9)] == [1, 1, 5, 5, 9]


def test_video_windows_are_encoded_independently(dv_dir):
    tok = CosmosVideoTokenizer.load(dv_dir, resolution=RV, temporal_window=9, batch_size=2)
    assert tok.config()["temporal_window"] == 9
    clips = _clips(3, 14)                                     # windows of 9 and 5 frames
    codes = tok.encode_clips(clips)
    assert codes.shape == (3, 3 + 2, 2, 2)
    whole = CosmosVideoTokenizer.load(dv_dir, resolution=RV, temporal_window=0)
    separate = np.concatenate([whole.encode_clips(clips[:, :9]), whole.encode_clips(clips[:, 9:])], axis=1)
    np.testing.assert_array_equal(codes, separate)
    # one clip at a time gives the same codes as three together
    np.testing.assert_array_equal(np.concatenate([tok.encode_clips(clips[i:i + 1]) for i in range(3)]), codes)
    # decoding goes window by window too
    frames = tok.decode_clips(codes)
    assert frames.shape == (3, 14, RV, RV, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(
        frames, np.concatenate([whole.decode_clips(codes[:, :3]), whole.decode_clips(codes[:, 3:])], axis=1))
    # a last window that breaks the rule is named, with the longest usable length
    with pytest.raises(ValueError, match=r"window 1 \(frames 9..12\) has 4 frames.*longest usable clip is 10"):
        tok.encode_clips(_clips(1, 13))
    with pytest.raises(TokenizerError, match="temporal_window=8"):
        CosmosVideoTokenizer.load(dv_dir, resolution=RV, temporal_window=8)


def test_video_tokenizer_encodes_images_as_one_frame_clips(dv_dir):
    tok = CosmosVideoTokenizer.load(dv_dir, resolution=RV, batch_size=3)
    assert tok.temporal_window == 17 and tok.name == "cosmos-dv"
    imgs = _clips(5, 1, seed=9)[:, 0]
    codes = tok.encode(imgs)
    assert codes.shape == (5, 2, 2) and tuple(tok.grid_shape) == (2, 2)
    np.testing.assert_array_equal(codes, tok.encode_clips(imgs[:, None])[:, 0])
    np.testing.assert_array_equal(codes, _reference_indices(dv_dir, imgs[:, None])[:, 0])
    assert tok.decode(codes).shape == (5, RV, RV, 3)


def test_video_temporal_compression_is_required_and_saved(tmp_path, dv_dir):
    anon = _make_dir(tmp_path, "video-model", VideoEncoder())
    with pytest.raises(TokenizerError, match="temporal_compression=4 or 8"):
        CosmosVideoTokenizer.load(anon, resolution=RV)
    tok = CosmosVideoTokenizer.load(anon, resolution=RV, temporal_compression="4", temporal_window="9")
    tok.save(tmp_path / "saved")
    again = CosmosVideoTokenizer.load(tmp_path / "saved")
    assert again.identity() == tok.identity() and again.temporal_window == 9
    clips = _clips(2, 9)
    np.testing.assert_array_equal(again.encode_clips(clips), tok.encode_clips(clips))
