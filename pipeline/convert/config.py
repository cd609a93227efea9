"""The convert job's configuration: one dataclass, the single source of its
fields, defaults and choices (the CLI and `jobs/convert.py` take theirs from here).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tokshard.pipeline.convert.decode import RESIZE_MODES, DecodeConfig
from tokshard.pipeline.convert.engines import ENGINES
from tokshard.pipeline.convert.sources import INPUT_FORMATS
from tokshard.pipeline.convert.views import VIEWS
from tokshard.pipeline.format.codecs import CODECS
from tokshard.pipeline.format.shards import FORMATS
from tokshard.pipeline.storage import redact_url
from tokshard.tokenizers.text import DEFAULT_MAX_TEXT_TOKENS

DEFAULT_TOKENIZER = "kmeans-vq"
# Images `tokshard fit-tokenizer` decodes at most unless asked otherwise.
FIT_MAX_IMAGES = 5000
_DECODE = DecodeConfig()

# The choices of every enumerated field, from the modules that own them.
CHOICES: dict[str, tuple[str, ...]] = {
    "format": FORMATS, "codec": tuple(CODECS), "resize_mode": RESIZE_MODES, "input_format": INPUT_FORMATS,
    "views": tuple(VIEWS), "engine": tuple(ENGINES),
}


@dataclass
class ConvertConfig:
    sources: list[str]
    out: str
    format: str = "parquet"
    codec: str = "zstd"
    codec_params: dict = field(default_factory=dict)
    tokenizer: str = DEFAULT_TOKENIZER
    tokenizer_options: dict = field(default_factory=dict)
    shard_size: int = 10_000
    resolution: int | None = None
    resize_mode: str = _DECODE.resize_mode
    input_format: str = "auto"
    # Keep only this split's files (Hugging Face layouts: data/train-*.parquet, test/...). None:
    # every file; if more than one split is found, each record's meta gets its `split`.
    split: str | None = None
    max_pixels: int = _DECODE.max_pixels          # the decompression-bomb bound (--max-image-pixels)
    # resize_mode "area" (variable grids, --max-pixels / --patch): each image resized to at most
    # max_area pixels in cells of patch x patch, keeping its aspect ratio; patch None: the tokenizer's.
    max_area: int = 0
    patch: int | None = None
    min_image_size: int = _DECODE.min_image_size
    codec_fit_samples: int = 2048
    decode_workers: int = 2
    storage_options: dict | None = None
    columns: dict = field(default_factory=dict)   # image/caption/label/key column names for Parquet sources
    views: str = "none"                           # none | hflip | tencrop: stored views per image
    clip_frames: int | None = None                # set: a video job, one sample per clip of this many frames
    clip_fps: float | None = None                 # sample frames at this rate (default: the source's)
    clip_stride: int | None = None                # sampled frames between clip starts (default: clip_frames)
    max_clips: int = 64                           # clips per video at most
    where: str | None = None                      # keep only source samples this SQL predicate selects
    engine: str = "local"                         # local | ray
    address: str | None = None                    # Ray cluster address ("auto" inside `ray job submit`)
    encoders: int = 0                             # Ray tokenizer actors (0: one per GPU; no GPU: whole-unit tasks)
    gpus_per_encoder: float | None = None         # None: 1 where the cluster has GPUs, else 0
    retries: int = 2                              # extra attempts for a unit that fails
    # A local Hugging Face tokenizer.json: each caption also becomes text token ids (text_tokens).
    text_tokenizer: str | None = None
    max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS  # ids kept per caption; longer ones are cut and counted

    def job_identity(self) -> dict[str, Any]:
        """What decides the output bytes (not where it goes or how fast). It is written to the
        job spec, so the sources are in their redact_url form: no credentials at rest, and a
        presigned URL signed anew is the same job (a URL without credentials is unchanged)."""
        d = asdict(self)
        d["sources"] = [redact_url(s) for s in d["sources"]]
        for k in ("out", "decode_workers", "storage_options", "engine", "address", "encoders",
                  "gpus_per_encoder", "retries"):
            d.pop(k)
        if self.resize_mode != "area":   # (absent unless area: the other jobs keep their hash)
            d.pop("max_area")
            d.pop("patch")
        if d["split"] is None:   # (absent unless set: jobs planned before it existed keep their hash)
            d.pop("split")
        # The text tokenizer is a path: its identity, the file's sha256, is the job spec's. The
        # cap counts only with it (and is absent without it: those jobs keep their hash).
        d.pop("text_tokenizer")
        if self.text_tokenizer is None:
            d.pop("max_text_tokens")
        d["tokenizer_options"] = {k: v for k, v in d["tokenizer_options"].items()
                                  if k not in ("device", "path")}
        return d


def default(name: str) -> Any:
    """The default of ConvertConfig field `name`."""
    f = ConvertConfig.__dataclass_fields__[name]
    return f.default_factory() if callable(f.default_factory) else f.default
