"""Version 1 of the shard, sample-index and manifest schemas.

Readers accept any 1.x and refuse a newer major version; a minor bump only
adds nullable columns or metadata keys.
"""

import pyarrow as pa

SCHEMA_VERSION = "1.4"   # 1.1: shards.key_min/key_max; 1.2: labels.parquet;
                         # 1.3: shards.index_bytes/index_sha256, record.files (sizes and sha256s);
                         # 1.4: shards.dropped_by_reason, record.dropped_by_reason
METADATA_KEY = b"tokshard"   # Parquet key-value metadata holding the dataset JSON


# A caption's text token ids (a dataset converted with --text-tokenizer): one variable-length
# list per sample, empty without a caption. Parquet stores uint32 in its 4-byte INT32 type
# whatever the vocabulary, so one width serves every vocabulary; zstd takes the slack.
TEXT_TOKENS_TYPE = pa.list_(pa.uint32())


def shard_schema(token_type: pa.DataType, text_tokens: bool = False, variable_grid: bool = False) -> pa.Schema:
    """One row per sample in a Parquet token shard; `text_tokens`: with the text_tokens
    column; `variable_grid`: with each sample's grid (grid_h, grid_w) last (only then: the
    shards of other datasets are unchanged)."""
    schema = pa.schema([
        ("key", pa.string()),
        ("tokens", token_type),             # fixed_size_list<uint16|uint32> (raw) or binary (coded)
        ("caption", pa.string()),
        ("label", pa.int64()),
        ("width", pa.int32()),              # original size, after EXIF orientation
        ("height", pa.int32()),
        ("source", pa.string()),            # source shard URL
        ("meta", pa.string()),              # source JSON metadata, as text
    ])
    if text_tokens:
        schema = schema.append(pa.field("text_tokens", TEXT_TOKENS_TYPE))
    if variable_grid:
        schema = schema.append(pa.field("grid_h", pa.int32())).append(pa.field("grid_w", pa.int32()))
    return schema


SAMPLES = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("row", pa.int64()),                    # row in a Parquet shard / sample number in a tar
    ("offset", pa.int64()),                 # byte offset of the tokens member's header in a tar; -1 for Parquet
    ("size", pa.int64()),                   # stored token payload bytes
    ("label", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("source", pa.string()),
])
# The sample index of a dataset with text tokens (--text-tokenizer) also holds each sample's
# count of text token ids: the loader packs sequences (pack=N) from it without reading shards.
SAMPLES_TEXT = SAMPLES.append(pa.field("text_tokens", pa.int32()))
# A variable-grid dataset's (--resize-mode area) index also holds each sample's grid: the
# loader groups samples by grid (and packs them) without reading shards.
GRID_COLUMNS = ("grid_h", "grid_w")


def samples_schema(text_tokens: bool = False, variable_grid: bool = False) -> pa.Schema:
    """The sample index's schema: SAMPLES, then the text token count and the grid columns
    where the dataset has them (only then: the indexes of other datasets are unchanged)."""
    schema = SAMPLES_TEXT if text_tokens else SAMPLES
    for name in GRID_COLUMNS if variable_grid else ():
        schema = schema.append(pa.field(name, pa.int32()))
    return schema

SKIP = pa.struct([("reason", pa.string()), ("count", pa.int64())])

SHARDS = pa.schema([
    ("shard", pa.string()),
    ("path", pa.string()),                  # relative to the dataset root
    ("format", pa.string()),                # parquet | wds
    ("codec", pa.string()),
    ("codec_version", pa.int32()),
    ("samples", pa.int64()),
    ("tokens", pa.int64()),
    ("raw_bytes", pa.int64()),              # tokens at their natural width (uint16/uint32)
    ("payload_bytes", pa.int64()),          # coded token payloads only
    ("stored_bytes", pa.int64()),           # the shard file
    ("source_bytes", pa.int64()),           # encoded image bytes read for these samples
    ("sha256", pa.string()),
    ("tokenizer_id", pa.string()),
    ("tokenizer_config_hash", pa.string()),
    ("codebook_hash", pa.string()),
    ("grid", pa.list_(pa.int32())),
    ("source_shards", pa.list_(pa.string())),
    ("unit", pa.int64()),
    ("skipped", pa.int64()),
    ("skipped_by_reason", pa.list_(SKIP)),
    ("key_min", pa.string()),               # smallest / largest sample key in the shard (byte order):
    ("key_max", pa.string()),               # routes a key lookup to one sample-index file
    ("index_bytes", pa.int64()),            # the shard's sample-index file: size and sha256 (1.3)
    ("index_sha256", pa.string()),
    ("dropped_by_reason", pa.list_(SKIP)),  # parts of kept samples dropped, by reason (1.4)
])

# labels.parquet: how many samples of each label every shard holds (labelled samples
# only), so label statistics and label-to-shard routing need neither the per-sample
# index nor a manifest that grows with the number of classes.
LABELS = pa.schema([
    ("shard", pa.string()),
    ("label", pa.int64()),
    ("count", pa.int64()),
])

TIMINGS = pa.schema([
    ("shard", pa.string()),
    ("decode_s", pa.float64()),             # read + decode + resize (reading streams into decoding)
    ("encode_s", pa.float64()),
    ("write_s", pa.float64()),
])
