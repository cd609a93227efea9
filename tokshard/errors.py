"""Typed errors and the vocabulary of counted skips.

A *skip* is a bad input that the job counts (by reason) and steps over; an
*error* stops the operation it belongs to with a message naming what is wrong.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[TokshardError], args: tuple, state: dict[str, Any]) -> TokshardError:
    """Unpickle a tokshard error: its args and fields as they were, without calling __init__ again."""
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class TokshardError(Exception):
    """Base of every error tokshard raises on purpose.

    Every one pickles with its fields (`ShardError.shard`, `SkipSample.reason`, ...)
    and its notes intact, whatever its __init__ takes, so it can cross a process
    boundary (a DataLoader worker, an engine's worker) as itself.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException's own reduce unpickles through type(self)(*self.args), which
        # fails for an __init__ that takes other arguments than the one message
        # (ShardError, SkipSample); restore args and __dict__ directly instead.
        return _rebuild, (type(self), self.args, dict(self.__dict__))


class UsageError(TokshardError):
    """A bad argument or configuration: the CLI prints one line and exits 2."""


class SourceError(TokshardError):
    """A source that cannot be listed or opened at all."""


class CodecError(TokshardError):
    """A token payload that does not decode to exactly what was encoded."""


class ManifestError(TokshardError):
    """A manifest that is missing, malformed, or of an unsupported version."""


class JobError(TokshardError):
    """A convert that could not commit every unit; re-running retries only those."""


class ShardError(TokshardError):
    """A token shard that is missing, fails its checksum or does not parse.

    ``shard`` names it (the manifest's shard id) so a user can find, verify or
    re-convert exactly that one.
    """

    def __init__(self, shard: str, message: str):
        self.shard = shard
        super().__init__(f"shard {shard}: {message}")


class CacheError(TokshardError):
    """The local shard cache cannot be read or written: a full disk or quota, a
    read-only or unreadable cache directory (ENOSPC, EDQUOT, EROFS, EACCES, EFBIG, EIO, ...).

    ``errno`` is the operating system's error number (None when there is none) and
    ``directory`` the cache's directory. The cache only ever holds copies of shards
    the dataset's store has, so a dataset read does not fail on it: it counts and
    warns, and reads on without the cache (pipeline/stream/shard_cache.py).
    """

    def __init__(self, message: str = "", *, directory: str | None = None, errno: int | None = None):
        self.directory, self.errno = directory, errno
        super().__init__(message)


class TokenizerError(TokshardError):
    """A tokenizer artifact that is missing, malformed, or does not match."""


# Reasons a sample is skipped. Kept as a closed set so the manifest's
# skipped-by-reason counts are comparable across datasets and versions.
SKIP_REASONS = (
    "empty_file",          # zero bytes
    "decode_error",        # not decodable as an image (corrupt, truncated, not an image)
    "decompression_bomb",  # declared pixel count above the configured bound
    "too_small",           # shorter side below --min-image-size
    "unsupported_image",   # decodable container but unusable content (e.g. zero-size frame)
    "no_image",            # a source sample with no image member/column value
    "duplicate_key",       # a key already seen in the same source unit
    "unsafe_key",          # a member name that tries to escape (absolute, '..')
    "unreadable_source",   # a source shard that cannot be opened or read to the end
    "not_an_image",        # a file in a folder source that has no image or video extension
    "too_short",           # a video with fewer (sampled) frames than one clip
    "not_selected",        # excluded by the job's --where predicate
)


# Reasons a part of a sample is dropped: a field stored as null or a member ignored, while
# the sample itself is kept (counted per shard in `dropped_by_reason`, schema 1.4). The parts
# a skipped sample had dropped are counted too (a tar sample made of a link only is one
# `no_image` skip and one `link_member` drop), so every ignored member has its count.
# A closed set, like SKIP_REASONS.
DROP_REASONS = (
    "nonfinite_number",    # NaN / Infinity in metadata or a float label: stored as null
    "deep_metadata",       # JSON metadata nested deeper than the reader accepts: stored as null
    "invalid_metadata",    # a JSON sidecar or metadata value that does not parse: stored as null
    "bad_label",           # a label that is not an integer in int64 range: stored as null
    "non_utf8_text",       # text that is not UTF-8 (caption, member name): undecodable bytes replaced
    "link_member",         # a symbolic or hard link member of a tar: ignored
    "duplicate_member",    # a second member with the same name and extension in one sample, or a
                           # JSON metadata field a text member of the same name replaces: ignored
    "unknown_member",      # a member no reader takes (not media, not a sidecar): ignored
    "extra_media",         # a media member of a sample besides the one taken as its image: ignored
    "mixed_type",          # a metadata field whose type differs from other samples' under --where: null
    "text_truncated",      # a caption's text token ids beyond --max-text-tokens: cut (the first N kept)
)


class SkipSample(TokshardError):
    """Raised for one bad sample; the caller counts ``reason`` and moves on."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
