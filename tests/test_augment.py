"""Semantics of the batched token / embedding augmentations (tokshard.pipeline.stream.augment)."""

from __future__ import annotations

import pytest
import torch

from tokshard.pipeline.stream.augment import (
    ColorAdapt,
    Compose,
    EmbeddingMixup,
    EmbeddingNoise,
    EmbeddingRandomResizedCrop,
    TokenCutMix,
    TokenEmbed,
    TokenHFlip,
    TokenPatchSwap,
    TokenRandomResizedCrop,
    TokenSynonymReplace,
    codebook_neighbours,
)

V, D = 64, 8


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_batch(b: int = 32, h: int = 16, w: int = 16, seed: int = 0) -> dict:
    g = gen(1000 + seed)
    return {
        "tokens": torch.randint(0, V, (b, h, w), generator=g),
        "label": torch.randint(0, 10, (b,), generator=g),
        "key": [f"k{i}" for i in range(b)],
        "extra": torch.arange(b),
    }


def progression_batch(b: int = 16, h: int = 16, w: int = 16) -> dict:
    """Token value = sample * h * w + row * w + col: every value names its source cell."""
    tokens = torch.arange(b * h * w).reshape(b, h, w)
    return {"tokens": tokens, "label": torch.arange(b), "key": [str(i) for i in range(b)]}


@pytest.fixture(scope="module")
def codebook() -> torch.Tensor:
    return torch.randn(V, D, generator=gen(7))


def embedded(codebook, b: int = 32, seed: int = 0) -> dict:
    return TokenEmbed(codebook)(make_batch(b, seed=seed), gen())


# ------------------------------------------------------------------ crop

def test_crop_full_box_is_identity():
    batch = make_batch()
    out = TokenRandomResizedCrop(16, scale=(1, 1), ratio=(1, 1))(batch, gen())
    assert torch.equal(out["tokens"], batch["tokens"])


@pytest.mark.parametrize("size", [(16, 16), (8, 12), (20, 7)])
def test_crop_is_nearest_resample_of_a_box_in_the_same_sample(size):
    b, h, w = 64, 16, 16
    batch = progression_batch(b, h, w)
    out = TokenRandomResizedCrop(size)(batch, gen(3))["tokens"]
    assert out.shape == (b, *size) and out.dtype == torch.int64
    sample, cell = out // (h * w), out % (h * w)
    assert torch.equal(sample, torch.arange(b)[:, None, None].expand_as(sample))
    rows, cols = cell // w, cell % w
    # Separable index grid: source row depends only on the output row, source column on the column.
    assert torch.equal(rows, rows[:, :, :1].expand_as(rows))
    assert torch.equal(cols, cols[:, :1, :].expand_as(cols))
    assert (rows[:, 1:, :] >= rows[:, :-1, :]).all() and (cols[:, :, 1:] >= cols[:, :, :-1]).all()
    # Nearest sampling of a box skips no source row/column when upsampling.
    if size[0] >= h:
        assert (rows[:, 1:, 0] - rows[:, :-1, 0]).max() <= 1
    spans = rows[:, -1, 0] - rows[:, 0, 0] + 1
    assert spans.unique().numel() > 3  # boxes really vary in size


def test_crop_box_area_and_ratio_follow_parameters():
    batch = progression_batch(32)
    out = TokenRandomResizedCrop(16, scale=(0.25, 0.25), ratio=(1, 1))(batch, gen(5))["tokens"] % 256
    rows, cols = out[:, :, 0] // 16, out[:, 0, :] % 16
    for r in (rows, cols):  # an 8x8 box upsampled 2x: 8 consecutive indices, each twice
        assert torch.equal(r[:, ::2], r[:, 1::2])
        assert torch.equal(r[:, 2::2] - r[:, :-2:2], torch.ones(32, 7, dtype=torch.int64))
    assert rows[:, 0].unique().numel() > 1  # random placement


def test_crop_falls_back_to_center_crop_when_no_candidate_fits():
    batch = progression_batch(4)
    out = TokenRandomResizedCrop((4, 16), scale=(1, 1), ratio=(4, 4))(batch, gen())["tokens"] % 256
    # ratio 4 cannot fit a full-area box in 16x16: torchvision falls back to w=16, h=16/4, centred.
    assert torch.equal(out // 16, torch.arange(6, 10)[None, :, None].expand(4, 4, 16))
    assert torch.equal(out % 16, torch.arange(16).expand(4, 4, 16))


# ------------------------------------------------------------------ flip

def test_flip_p1_p0_and_flip_map():
    batch = make_batch()
    flipped = torch.flip(batch["tokens"], [-1])
    assert torch.equal(TokenHFlip(p=1.0)(batch, gen())["tokens"], flipped)
    assert torch.equal(TokenHFlip(p=0.0)(batch, gen())["tokens"], batch["tokens"])
    flip_map = torch.randperm(V, generator=gen(2))
    assert torch.equal(TokenHFlip(p=1.0, flip_map=flip_map)(batch, gen())["tokens"], flip_map[flipped])
    assert torch.equal(TokenHFlip(p=0.0, flip_map=flip_map)(batch, gen())["tokens"], batch["tokens"])


def test_flip_half_flips_whole_samples():
    batch = make_batch(64)
    flip_map = torch.arange(V).flip(0)
    out = TokenHFlip(p=0.5, flip_map=flip_map)(batch, gen())["tokens"]
    same = (out == batch["tokens"]).flatten(1).all(1)
    mirrored = (out == flip_map[batch["tokens"].flip(-1)]).flatten(1).all(1)
    assert (same ^ mirrored).all()
    assert 10 < int(mirrored.sum()) < 54


# ---------------------------------------------------------------- cutmix

def test_cutmix_weight_is_the_pasted_fraction():
    b, nc = 32, 32
    batch = {"tokens": torch.arange(b)[:, None, None].expand(b, 16, 16).clone(),
             "label": torch.arange(b), "key": [str(i) for i in range(b)]}
    out = TokenCutMix(nc, alpha=1.0)(batch, gen(4))
    tokens, target = out["tokens"], out["target"]
    assert target.dtype == torch.float32 and target.shape == (b, nc)
    torch.testing.assert_close(target.sum(1), torch.ones(b))
    partner = torch.arange(b).roll(1)  # sample i receives from sample i-1
    from_partner = tokens == partner[:, None, None]
    assert (from_partner | (tokens == torch.arange(b)[:, None, None])).all()
    frac = from_partner.flatten(1).double().mean(1).float()
    torch.testing.assert_close(target[torch.arange(b), partner], frac)
    torch.testing.assert_close(target[torch.arange(b), torch.arange(b)], 1 - frac)
    for m in from_partner:  # the pasted region is one solid rectangle
        if m.any():
            r, c = m.any(1).nonzero().squeeze(1), m.any(0).nonzero().squeeze(1)
            assert m[r.min():r.max() + 1, c.min():c.max() + 1].all()
    assert (frac > 0).sum() > b // 2


def test_cutmix_p0_gives_one_hot_and_existing_target_is_remixed():
    batch = make_batch()
    out = TokenCutMix(10, p=0.0)(batch, gen())
    assert torch.equal(out["tokens"], batch["tokens"])
    assert torch.equal(out["target"], torch.nn.functional.one_hot(batch["label"], 10).float())
    soft = dict(batch, target=torch.full((32, 10), 0.1))
    torch.testing.assert_close(TokenCutMix(10)(soft, gen())["target"], soft["target"])


def test_cutmix_rejects_unlabeled_and_bad_labels():
    batch = make_batch()
    batch["label"] = batch["label"].clone()
    batch["label"][3] = -1
    with pytest.raises(ValueError, match="label -1"):
        TokenCutMix(10)(batch, gen())
    batch["label"][3] = 10
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        TokenCutMix(10)(batch, gen())


# ------------------------------------------------------------ token EDA

def test_codebook_neighbours_exact_with_tie_break():
    cb = torch.tensor([[0.0], [1.0], [-1.0], [3.0], [1.0]])
    nb = codebook_neighbours(cb, 2)
    assert nb.dtype == torch.int64
    # code 0: distance 1 to codes 1, 2 and 4 -> lowest indices win.
    assert nb.tolist() == [[1, 2], [4, 0], [0, 1], [1, 4], [1, 0]]
    cb = torch.randn(50, 4, generator=gen())
    nb = codebook_neighbours(cb, 5, chunk=7)
    d = ((cb[:, None, :].double() - cb[None, :, :].double()) ** 2).sum(-1).tolist()
    expected = [sorted((j for j in range(50) if j != i), key=lambda j: (d[i][j], j))[:5] for i in range(50)]
    assert nb.tolist() == expected
    with pytest.raises(ValueError):
        codebook_neighbours(cb, 50)


@pytest.mark.parametrize("shape", [(64, 16, 16), (64, 256)])
def test_synonym_replacement_uses_listed_neighbours_at_rate_p(codebook, shape):
    neighbours = codebook_neighbours(codebook, 4)
    tokens = torch.randint(0, V, shape, generator=gen())
    batch = {"tokens": tokens, "label": torch.zeros(shape[0], dtype=torch.int64), "key": [""] * shape[0]}
    out = TokenSynonymReplace(neighbours, p=0.3)(batch, gen())["tokens"]
    changed = out != tokens
    assert abs(changed.double().mean().item() - 0.3) < 0.01
    assert (neighbours[tokens[changed]] == out[changed][:, None]).any(1).all()
    assert torch.equal(TokenSynonymReplace(neighbours, p=0.0)(batch, gen())["tokens"], tokens)


@pytest.mark.parametrize("shape", [(32, 16, 16), (32, 100)])
def test_patch_swap_preserves_multiset(shape):
    tokens = torch.arange(32 * shape[-1] * (shape[1] if len(shape) == 3 else 1)).reshape(shape)
    batch = {"tokens": tokens, "label": torch.zeros(32, dtype=torch.int64), "key": [""] * 32}
    out = TokenPatchSwap(n_swaps=1, p=1.0)(batch, gen())["tokens"]
    assert torch.equal(out.flatten(1).sort(1).values, tokens.flatten(1))
    assert ((out != tokens).flatten(1).sum(1) == 2).all()  # one swap of distinct positions
    out = TokenPatchSwap(n_swaps=5, p=1.0)(batch, gen())["tokens"]
    assert torch.equal(out.flatten(1).sort(1).values, tokens.flatten(1))
    assert torch.equal(TokenPatchSwap(p=0.0)(batch, gen())["tokens"], tokens)


# ------------------------------------------------------------ embedding

def test_embed_matches_codebook_lookup(codebook):
    batch = make_batch()
    out = TokenEmbed(codebook)(batch, gen())
    assert torch.equal(out["embeddings"], codebook[batch["tokens"]].permute(0, 3, 1, 2))
    assert out["tokens"] is batch["tokens"]
    hot = TokenEmbed(codebook, one_hot=True)(batch, gen())["embeddings"]
    assert hot.shape == (32, V, 16, 16) and hot.dtype == torch.float32
    assert torch.equal(hot.argmax(1), batch["tokens"]) and torch.equal(hot.sum(1), torch.ones(32, 16, 16))
    with pytest.raises(ValueError, match="token ids"):
        TokenEmbed(codebook)(dict(batch, tokens=batch["tokens"] + V), gen())


def test_embedding_crop_full_box_is_identity(codebook):
    batch = embedded(codebook)
    out = EmbeddingRandomResizedCrop(16, scale=(1, 1), ratio=(1, 1))(batch, gen())
    torch.testing.assert_close(out["embeddings"], batch["embeddings"], atol=1e-5, rtol=0)


def test_embedding_crop_agrees_with_token_crop_on_one_hot_maps(codebook):
    # A box the size of the output is an exact sub-window for both resamplers,
    # and both draw the same boxes from the same generator state.
    batch = make_batch()
    hot = TokenEmbed(codebook, one_hot=True)(batch, gen())
    emb = EmbeddingRandomResizedCrop(8, scale=(0.25, 0.25), ratio=(1, 1))(hot, gen(9))["embeddings"]
    tok = TokenRandomResizedCrop(8, scale=(0.25, 0.25), ratio=(1, 1))(batch, gen(9))["tokens"]
    assert emb.shape == (32, V, 8, 8)
    torch.testing.assert_close(emb, torch.nn.functional.one_hot(tok, V).permute(0, 3, 1, 2).float(),
                               atol=1e-5, rtol=0)


def test_embedding_noise_scale_is_relative_to_codebook_channel_std(codebook):
    batch = embedded(codebook, b=256)
    x = batch["embeddings"]
    assert torch.equal(EmbeddingNoise(codebook, rel_std=0.0)(batch, gen())["embeddings"], x)
    assert torch.equal(EmbeddingNoise(codebook, rel_std=0.5, p=0.0)(batch, gen())["embeddings"], x)
    noise = EmbeddingNoise(codebook, rel_std=0.5)(batch, gen())["embeddings"] - x
    measured = noise.transpose(0, 1).flatten(1).std(1)
    torch.testing.assert_close(measured, 0.5 * codebook.std(0), rtol=0.02, atol=0)
    with pytest.raises(ValueError, match="channels"):
        EmbeddingNoise(torch.randn(V, D + 1))(batch, gen())


def test_color_adapt_takes_partner_statistics():
    g = gen(11)
    x = torch.randn(16, 4, 8, 8, generator=g) * torch.rand(16, 4, 1, 1, generator=g).add(0.5) \
        + torch.randn(16, 4, 1, 1, generator=g) * 3
    batch = {"embeddings": x, "label": torch.arange(16), "key": [""] * 16}
    out = ColorAdapt(p=1.0)(batch, gen())["embeddings"]
    var_in, mean_in = torch.var_mean(x, dim=(2, 3), correction=0)
    var_out, mean_out = torch.var_mean(out, dim=(2, 3), correction=0)
    stats_in, stats_out = torch.cat([mean_in, var_in.sqrt()], 1), torch.cat([mean_out, var_out.sqrt()], 1)
    dist = torch.cdist(stats_out, stats_in)
    partner = dist.argmin(1)
    assert dist.min(1).values.max() < 1e-4
    assert sorted(partner.tolist()) == list(range(16))  # a permutation of the batch
    assert (partner != torch.arange(16)).any()
    # Normalized content is kept: each channel is an affine map of the input channel.
    z = lambda t, m, v: (t - m[..., None, None]) / v.sqrt()[..., None, None]  # noqa: E731
    torch.testing.assert_close(z(out, mean_out, var_out), z(x, mean_in, var_in), atol=1e-4, rtol=0)
    assert torch.equal(ColorAdapt(p=0.0)(batch, gen())["embeddings"], x)


def test_mixup_targets_and_embeddings_are_the_same_combination(codebook):
    batch = embedded(codebook)
    batch["label"] = torch.arange(32)
    out = EmbeddingMixup(32, alpha=0.8)(batch, gen())
    target, x = out["target"], batch["embeddings"]
    torch.testing.assert_close(target.sum(1), torch.ones(32))
    lam = target[torch.arange(32), torch.arange(32)]
    torch.testing.assert_close(target[torch.arange(32), torch.arange(32).roll(1)], 1 - lam)
    w = lam[:, None, None, None]
    torch.testing.assert_close(out["embeddings"], w * x + (1 - w) * x.roll(1, 0))
    assert ((lam > 0.01) & (lam < 0.99)).sum() > 16
    unlabeled = dict(batch, label=torch.full((32,), -1))
    with pytest.raises(ValueError, match="label -1"):
        EmbeddingMixup(32)(unlabeled, gen())


def test_cutmix_then_mixup_keeps_targets_consistent(codebook):
    batch = make_batch()
    out = Compose([TokenCutMix(10), TokenEmbed(codebook), EmbeddingMixup(10)])(batch, gen())
    torch.testing.assert_close(out["target"].sum(1), torch.ones(32))
    assert (out["target"] > 0).sum(1).max() > 2  # up to four labels contribute after two mixes


# ------------------------------------------------ contract for every aug

def all_augs(codebook):
    """(augmentation, batch factory) pairs covering every class."""
    tok = lambda: make_batch()  # noqa: E731
    emb = lambda: embedded(codebook)  # noqa: E731
    return [
        (TokenRandomResizedCrop(12), tok),
        (TokenHFlip(flip_map=torch.arange(V).flip(0)), tok),
        (TokenCutMix(10), tok),
        (TokenSynonymReplace(codebook_neighbours(codebook, 3), p=0.2), tok),
        (TokenPatchSwap(n_swaps=3), tok),
        (EmbeddingRandomResizedCrop(12), emb),
        (EmbeddingNoise(codebook, rel_std=0.2), emb),
        (ColorAdapt(p=0.5), emb),
        (EmbeddingMixup(10), emb),
        (Compose([TokenRandomResizedCrop(16), TokenHFlip(), TokenEmbed(codebook, one_hot=True),
                  EmbeddingRandomResizedCrop(14)]), tok),
    ]


def _snapshot(batch: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else list(v) if isinstance(v, list) else v)
            for k, v in batch.items()}


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_contract_determinism_no_mutation_passthrough(codebook):
    for aug, make in all_augs(codebook):
        batch = make()
        batch["extra"] = torch.arange(32)
        before = _snapshot(batch)
        first = aug(batch, gen(5))
        assert first is not batch and _same(batch, before), type(aug).__name__
        assert first["extra"] is batch["extra"] and first["key"] is batch["key"]
        assert _same(first, aug(batch, gen(5))), f"{type(aug).__name__} not deterministic"
        assert not _same(first, aug(batch, gen(6))), f"{type(aug).__name__} ignores the seed"


def test_compose_is_sequential_application_with_one_generator(codebook):
    crop, flip = TokenRandomResizedCrop(10), TokenHFlip()
    batch = make_batch()
    g = gen(3)
    expected = flip(crop(batch, g), g)
    assert _same(Compose([crop, flip])(batch, gen(3)), expected)
    assert _same(Compose([])(batch, gen()), batch)


@pytest.mark.parametrize("aug", [TokenRandomResizedCrop(8), TokenHFlip(), TokenCutMix(10)])
def test_spatial_token_augs_reject_sequences(aug):
    batch = {"tokens": torch.zeros(4, 256, dtype=torch.int64), "label": torch.zeros(4, dtype=torch.int64),
             "key": [""] * 4}
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        aug(batch, gen())


@pytest.mark.parametrize("make", [
    lambda: TokenRandomResizedCrop(0),
    lambda: TokenRandomResizedCrop(8, scale=(0.0, 1.0)),
    lambda: TokenRandomResizedCrop(8, scale=(0.9, 0.1)),
    lambda: TokenRandomResizedCrop(8, scale=(0.5, 1.5)),
    lambda: TokenRandomResizedCrop(8, ratio=(-1.0, 1.0)),
    lambda: TokenRandomResizedCrop(8, mode="bilinear"),
    lambda: TokenHFlip(p=1.5),
    lambda: TokenHFlip(flip_map=torch.tensor([0, 5])),
    lambda: TokenCutMix(0),
    lambda: TokenCutMix(10, alpha=0.0),
    lambda: TokenSynonymReplace(torch.zeros(4, dtype=torch.int64)),
    lambda: TokenSynonymReplace(torch.full((4, 2), 9)),
    lambda: TokenPatchSwap(n_swaps=0),
    lambda: TokenEmbed(torch.zeros(4, 2, dtype=torch.int64)),
    lambda: EmbeddingRandomResizedCrop((8, 0)),
    lambda: EmbeddingNoise(torch.randn(4, 2), rel_std=-0.1),
    lambda: ColorAdapt(p=-0.1),
    lambda: EmbeddingMixup(10, alpha=-1.0),
    lambda: Compose([1]),
])
def test_bad_parameters_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_bad_inputs_raise_clear_errors(codebook):
    batch = make_batch()
    with pytest.raises(ValueError, match="embeddings"):
        ColorAdapt()(batch, gen())  # stage 2 before TokenEmbed
    with pytest.raises(ValueError, match="integer token ids"):
        TokenHFlip()(dict(batch, tokens=batch["tokens"].float()), gen())
    with pytest.raises(TypeError, match="Generator"):
        TokenHFlip()(batch, 0)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_stay_on_the_input_device_and_match_cpu(codebook, device):
    # On a GPU machine this runs the whole chain on CUDA; on CPU it checks the
    # chain keeps every tensor where it found it (no silent .cpu()/.cuda()).
    aug = Compose([TokenRandomResizedCrop(12), TokenHFlip(), TokenCutMix(10), TokenEmbed(codebook.to(device)),
                   EmbeddingRandomResizedCrop(10), ColorAdapt(), EmbeddingNoise(codebook.to(device)),
                   EmbeddingMixup(10)])
    batch = make_batch()
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out_cpu, out_dev = aug(batch, gen()), aug(moved, gen())
    for k in ("tokens", "target", "embeddings"):
        assert out_dev[k].device.type == device
        torch.testing.assert_close(out_dev[k].cpu(), out_cpu[k], atol=1e-4, rtol=1e-4)
