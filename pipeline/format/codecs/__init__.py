"""Token codecs: one sample's integer tokens <-> a compact, bit-exact payload.

- `base`: the `TokenCodec` contract and `token_dtype`;
- `registry`: codecs by name, and rebuilding one from a manifest's description;
- `basic`: raw, bitpack, zstd, zstd-dict;
- `rans`: the entropy codecs rans-unigram and rans-ctx.
"""

# Importing the built-in modules registers their classes, in import order.
from tokshard.pipeline.format.codecs.base import TokenCodec, token_dtype
from tokshard.pipeline.format.codecs.basic import BitpackCodec, RawCodec, ZstdCodec, ZstdDictCodec
from tokshard.pipeline.format.codecs.rans import RansCtxCodec, RansUnigramCodec
from tokshard.pipeline.format.codecs.registry import CODECS, codec_from_description, get_codec, register_codec

__all__ = [
    "CODECS", "BitpackCodec", "RansCtxCodec", "RansUnigramCodec", "RawCodec", "TokenCodec", "ZstdCodec",
    "ZstdDictCodec", "codec_from_description", "get_codec", "register_codec", "token_dtype",
]
