from tokshard.pipeline.format.shards.writers import EXTENSIONS, FORMATS, WRITERS, EncodedSample  # noqa: F401
from tokshard.pipeline.format.shards.reader import ShardColumns, parse_shard  # noqa: F401
