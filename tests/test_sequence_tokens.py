"""1-D ordered token sequences: a coarse-to-fine tokenizer plugin registered with
`register()`, converted like any other, and read back with `max_tokens` prefixes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import convert_config

import tokshard
from tokshard.errors import TokenizerError, UsageError
from tokshard.pipeline.convert.decode import DecodeConfig, decode_image
from tokshard.pipeline.convert.job import convert
from tokshard.tokenizers import registry
from tokshard.tokenizers.base import Tokenizer
from tokshard.tokenizers.kmeans_vq import KMeansVQ
from tokshard.tokenizers.registry import available, load_tokenizer, register, tokenizer_class

ORDER_FILE = "sequence.json"


def coarse_to_fine_order(side: int) -> np.ndarray:
    """Flat positions of a side x side grid: the 2x2 lattice first, then 4x4, ... then every cell.

    Each level holds the cells on a lattice of stride side/2, side/4, ..., 1 that no
    coarser level took, so any prefix that ends on a level covers the image evenly.
    """
    stride = 1 << max(0, (side - 1).bit_length() - 1)      # largest power of two < side
    order, taken = [], np.zeros((side, side), bool)
    while stride >= 1:
        for r in range(0, side, stride):
            for c in range(0, side, stride):
                if not taken[r, c]:
                    taken[r, c] = True
                    order.append(r * side + c)
        stride //= 2
    return np.asarray(order, np.int64)


class CoarseToFineVQ(Tokenizer):
    """A 2-D patch tokenizer's grid emitted as one coarse-to-fine ordered sequence.

    Stands in for 1-D ordered tokenizers (TiTok, FlexTok, One-D-Piece): the codes
    are the wrapped k-means VQ's, only reordered, so a prefix is a coarse sketch.
    """

    name = "coarse-to-fine"
    version = 1

    def __init__(self, inner: KMeansVQ):
        h, w = inner.grid_shape
        if h != w:
            raise TokenizerError(f"{self.name} needs a square grid, got {inner.grid_shape}")
        self.inner = inner
        self.order = coarse_to_fine_order(h)

    @property
    def resolution(self) -> int:
        return self.inner.resolution

    @property
    def grid_shape(self) -> tuple[int]:
        return (len(self.order),)

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    def config(self) -> dict:
        return {"order": self.order.tolist(),
                "inner": {"tokenizer": self.inner.name, "version": self.inner.version,
                          "config": self.inner.config()}}

    def weights_digest(self) -> str:
        return self.inner.weights_digest()

    def codebook(self) -> np.ndarray:
        return self.inner.codebook()

    def encode(self, images: np.ndarray) -> np.ndarray:
        grid = self.inner.encode(images)
        return grid.reshape(len(grid), -1)[:, self.order]

    def to_grid(self, seq: np.ndarray) -> np.ndarray:
        """(N, n) sequences or prefixes -> (N, h, w) grid codes.

        A cell the prefix does not reach takes the code of its nearest ancestor on
        a coarser lattice that it does reach (nearest-neighbour upsampling)."""
        seq = np.asarray(seq)
        n, side = seq.shape[-1] if seq.ndim == 2 else 0, self.inner.grid_shape[0]
        if seq.ndim != 2 or not 1 <= n <= len(self.order):
            raise ValueError(f"expected (N, 1..{len(self.order)}) sequences, got {seq.shape}")
        flat = np.full((len(seq), side * side), -1, np.int64)
        flat[:, self.order[:n]] = seq
        grid = flat.reshape(len(seq), side, side)
        known = np.zeros(side * side, bool)
        known[self.order[:n]] = True
        known = known.reshape(side, side)
        rows, cols = np.indices((side, side))
        stride = 1
        while not known.all():
            stride *= 2
            ar, ac = rows // stride * stride, cols // stride * stride
            fill = ~known & known[ar, ac]
            grid[:, fill] = grid[:, ar[fill], ac[fill]]
            known |= fill
        return grid

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.inner.decode(self.to_grid(codes))

    def save(self, directory) -> None:
        # Flat files: convert copies the top level of this directory into the dataset.
        self.inner.save(directory)
        (Path(directory) / ORDER_FILE).write_text(json.dumps({"tokenizer": self.name, **self.config()}))

    @classmethod
    def load(cls, directory, **kwargs) -> CoarseToFineVQ:
        try:
            doc = json.loads((Path(directory) / ORDER_FILE).read_text())
        except FileNotFoundError:
            raise TokenizerError(f"no {ORDER_FILE} in {directory}: not a {cls.name} artifact") from None
        tok = cls(KMeansVQ.load(directory, **kwargs))
        if doc.get("tokenizer") != cls.name or doc.get("order") != tok.order.tolist():
            raise TokenizerError(f"{directory / ORDER_FILE} does not describe this {cls.name} tokenizer")
        return tok

    @classmethod
    def from_options(cls, path: str | None = None, device: str | None = None, **kw) -> CoarseToFineVQ:
        """`path`: a k-means VQ artifact to wrap (or a saved coarse-to-fine one)."""
        if path is None:
            raise TokenizerError(f"tokenizer {cls.name!r} needs path=DIR of a k-means VQ artifact")
        return cls(KMeansVQ.from_options(path=path, device=device, **kw))


register(CoarseToFineVQ.name, CoarseToFineVQ)


# -- the order ------------------------------------------------------------------

def test_order_is_a_coarse_to_fine_permutation():
    order = coarse_to_fine_order(8)
    assert sorted(order.tolist()) == list(range(64))
    pos = [divmod(int(p), 8) for p in order]
    assert pos[:4] == [(0, 0), (0, 4), (4, 0), (4, 4)]                       # 2x2
    assert sorted(pos[:16]) == [(r, c) for r in range(0, 8, 2) for c in range(0, 8, 2)]   # 4x4
    for side in (1, 2, 3, 5, 16):
        assert sorted(coarse_to_fine_order(side).tolist()) == list(range(side * side))


# -- conversion and loading -------------------------------------------------------

@pytest.fixture(scope="module")
def sequence_datasets(tmp_path_factory, tokenizer_dir, photo_jpegs):
    """{(format, codec): dataset dir} of the photos converted with the coarse-to-fine plugin."""
    root = tmp_path_factory.mktemp("seq")
    folder = root / "src"
    folder.mkdir()
    for key, data, _ in photo_jpegs:
        (folder / f"{key}.jpg").write_bytes(data)
    out = {}
    for fmt, codec in (("parquet", "zstd"), ("wds", "raw")):
        dest = root / f"{fmt}-{codec}"
        cfg = convert_config([folder], dest, tokenizer_dir, format=fmt, codec=codec, shard_size=5,
                             tokenizer="coarse-to-fine")
        assert cfg.tokenizer_options == {"path": str(tokenizer_dir)}
        convert(cfg, quiet=True)
        out[(fmt, codec)] = dest
    return out


VARIANTS = [("parquet", "zstd"), ("wds", "raw")]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
def test_manifest_records_the_sequence_tokenizer(sequence_datasets, tokenizer_dir, photo_jpegs, variant):
    ds = tokshard.open(sequence_datasets[variant])
    assert ds.grid == (64,) and list(ds.record["grid"]) == [64]
    assert len(ds) == len(photo_jpegs) and ds.num_shards == -(-len(photo_jpegs) // 5)
    rec = ds.record["tokenizer"]
    plugin = load_tokenizer("coarse-to-fine", {"path": str(tokenizer_dir)})
    assert rec["name"] == "coarse-to-fine" and rec["tokenizer_id"] == "coarse-to-fine/1"
    assert rec["config"]["order"] == coarse_to_fine_order(8).tolist()
    assert rec["config"]["inner"]["config"] == KMeansVQ.load(tokenizer_dir).config()
    assert rec["codebook_hash"] == KMeansVQ.load(tokenizer_dir).weights_digest()
    assert plugin.identity().as_dict() == {k: rec[k] for k in plugin.identity().as_dict()}


def full_sequences(ds) -> dict[int, np.ndarray]:
    return {i: t for s in map(ds.shard, range(ds.num_shards)) for i, t in zip(s["id"].tolist(), s["tokens"])}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
def test_max_tokens_yields_the_prefix_of_every_sample_once(sequence_datasets, variant):
    ds = tokshard.open(sequence_datasets[variant])
    full = full_sequences(ds)
    assert sorted(full) == list(range(len(ds))) and all(t.shape == (64,) for t in full.values())
    for world in (1, 2, 3):
        seen = []
        for rank in range(world):
            loader = ds.loader(4, rank=rank, world_size=world, shuffle=True, seed=1, shuffle_buffer=6,
                               max_tokens=16)
            for b in loader:
                assert b["tokens"].dtype == torch.int64 and b["tokens"].shape[1:] == (16,)
                assert b["tokens"].shape[0] == len(b["id"]) <= 4
                for i, t in zip(b["id"].tolist(), b["tokens"].numpy()):
                    np.testing.assert_array_equal(t, full[i][:16])
                seen += [i for i, pad in zip(b["id"].tolist(), b["pad"].tolist()) if not pad]
        assert Counter(seen) == Counter(range(len(ds))), world
    # The untruncated loader gives the same samples with all 64 tokens, in the same order.
    kw = dict(rank=0, world_size=1, seed=1, shuffle_buffer=6)
    whole, prefix = list(ds.loader(4, **kw)), list(ds.loader(4, max_tokens=16, **kw))
    assert [b["id"].tolist() for b in whole] == [b["id"].tolist() for b in prefix]
    for a, b in zip(whole, prefix):
        assert a["tokens"].shape[1:] == (64,)
        assert np.array_equal(a["tokens"][:, :16].numpy(), b["tokens"].numpy())
    assert next(iter(ds.loader(4, max_tokens=64, **kw)))["tokens"].shape[1:] == (64,)
    assert next(iter(ds.loader(4, max_tokens=1, **kw)))["tokens"].shape[1:] == (1,)
    for bad in (0, -1, 65, 16.0, True):
        with pytest.raises(UsageError, match="max_tokens"):
            ds.loader(4, max_tokens=bad)


def test_sequences_decode_to_the_wrapped_tokenizers_codes(sequence_datasets, tokenizer_dir, photo_jpegs):
    ds = tokshard.open(sequence_datasets[("parquet", "zstd")])
    plugin = ds.tokenizer()                  # found by the manifest's name through the registry
    assert isinstance(plugin, CoarseToFineVQ) and plugin.identity() == load_tokenizer(
        "coarse-to-fine", {"path": str(tokenizer_dir)}).identity()
    kmeans = KMeansVQ.load(tokenizer_dir)
    images = {k: decode_image(d, DecodeConfig(**ds.record["decode"])).image for k, d, _ in photo_jpegs}
    keys, seqs = [], []
    for _, key, tokens, _ in ds:
        keys.append(key)
        seqs.append(tokens)
    assert sorted(keys) == sorted(images)
    seqs = np.stack(seqs)
    grid = kmeans.encode(np.stack([images[k] for k in keys]))
    assert not np.array_equal(seqs, grid.reshape(len(grid), -1))     # a real reordering...
    np.testing.assert_array_equal(plugin.to_grid(seqs), grid)        # ...of the same codes
    np.testing.assert_array_equal(plugin.decode(seqs), kmeans.decode(grid))
    np.testing.assert_array_equal(plugin.encode(np.stack([images[k] for k in keys])), seqs)
    # A 16-token prefix is the 4x4 lattice, each code spread over its 2x2 cell.
    coarse = plugin.to_grid(seqs[:, :16])
    np.testing.assert_array_equal(coarse, np.repeat(np.repeat(grid[:, ::2, ::2], 2, 1), 2, 2))
    assert plugin.decode(seqs[:, :4]).shape == (len(keys), 64, 64, 3)
    with pytest.raises(ValueError):
        plugin.to_grid(seqs[:, :0])


def test_save_and_load_round_trip(tmp_path, tokenizer_dir):
    tok = CoarseToFineVQ.from_options(path=str(tokenizer_dir), device="cpu")
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", ORDER_FILE]
    again = CoarseToFineVQ.load(tmp_path)
    assert again.identity() == tok.identity() and again.grid_shape == (64,)
    with pytest.raises(TokenizerError, match=ORDER_FILE):
        CoarseToFineVQ.load(tokenizer_dir)       # a bare k-means artifact is not this tokenizer
    with pytest.raises(UsageError, match="needs path"):
        load_tokenizer("coarse-to-fine")
    with pytest.raises(UsageError, match="bad options"):
        load_tokenizer("coarse-to-fine", {"path": str(tokenizer_dir), "colour": "blue"})


# -- register() -------------------------------------------------------------------

@pytest.fixture()
def fresh_registry(monkeypatch):
    """The registry as it is, restored afterwards (register() is process-global)."""
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))
    return registry


class OtherSequenceVQ(CoarseToFineVQ):
    name = "other-sequence"


def test_registered_names_resolve_from_class_or_string(fresh_registry, tokenizer_dir):
    assert tokenizer_class("coarse-to-fine") is CoarseToFineVQ
    assert available()["coarse-to-fine"] == f"{__name__}:CoarseToFineVQ"
    register("coarse-to-fine", CoarseToFineVQ)                       # identical: a no-op
    register("kmeans-vq", KMeansVQ)                                  # the built-in's own class: a no-op
    register("kmeans-vq", "tokshard.tokenizers.kmeans_vq:KMeansVQ")
    assert tokenizer_class("kmeans-vq") is KMeansVQ
    register("other-by-string", f"{__name__}:OtherSequenceVQ")
    register("other-by-string", f"{__name__}:OtherSequenceVQ")       # identical string: a no-op
    register("other-by-string", OtherSequenceVQ)                     # the class that string names
    assert tokenizer_class("other-by-string") is OtherSequenceVQ
    assert load_tokenizer("other-by-string", {"path": str(tokenizer_dir)}).name == "other-sequence"


def test_register_refuses_to_replace_or_accept_nonsense(fresh_registry):
    with pytest.raises(UsageError, match="built-in"):
        register("kmeans-vq", CoarseToFineVQ)
    with pytest.raises(UsageError, match="built-in"):
        register("kmeans-vq", f"{__name__}:CoarseToFineVQ")
    assert tokenizer_class("kmeans-vq") is KMeansVQ
    with pytest.raises(UsageError, match="already registered"):
        register("coarse-to-fine", OtherSequenceVQ)
    with pytest.raises(UsageError, match="already registered"):
        register("coarse-to-fine", f"{__name__}:OtherSequenceVQ")
    assert tokenizer_class("coarse-to-fine") is CoarseToFineVQ
    for bad in (object, KMeansVQ.load, 42, "no_colon", ":attr", "mod:"):
        with pytest.raises(UsageError):
            register("bad", bad)
    with pytest.raises(UsageError, match="name"):
        register("", CoarseToFineVQ)
    assert "bad" not in available()
    # A string target is imported only when looked up; a broken one is a UsageError then.
    register("missing", "tokshard.no_such_module:Thing")
    with pytest.raises(UsageError, match="cannot import"):
        tokenizer_class("missing")
    register("not-a-tokenizer", "json:dumps")
    with pytest.raises(UsageError, match="not a Tokenizer"):
        tokenizer_class("not-a-tokenizer")
    with pytest.raises(UsageError, match="unknown tokenizer"):
        tokenizer_class("never-registered")


def test_registered_names_win_over_entry_points(fresh_registry, monkeypatch, tmp_path):
    # A real installed-distribution entry point: a dist-info directory on sys.path.
    info = tmp_path / "seq_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: seq-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[{registry.GROUP}]\ncoarse-to-fine = tokshard.tokenizers.kmeans_vq:KMeansVQ\n"
        f"plugin-only = {__name__}:OtherSequenceVQ\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert available()["plugin-only"] == f"{__name__}:OtherSequenceVQ"
    assert tokenizer_class("plugin-only") is OtherSequenceVQ
    assert tokenizer_class("coarse-to-fine") is CoarseToFineVQ
    assert available()["coarse-to-fine"] == f"{__name__}:CoarseToFineVQ"
    register("plugin-only", CoarseToFineVQ)              # an entry point is not protected
    assert tokenizer_class("plugin-only") is CoarseToFineVQ
