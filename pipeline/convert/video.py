"""Videos -> clips of frames (PyAV), each clip one sample.

A clip is `frames` consecutive frames, sampled at `fps` (the source rate when
None), starting every `stride` sampled frames (`frames` when None: clips do
not overlap), at most `max_clips` per video. Frames are resized like images
(same DecodeConfig), and each clip carries its timing (start/end seconds,
sampled frame times) so users can trace a sample back to the video.

Bad inputs are counted skips: an undecodable container or stream is a
decode_error, a video with fewer sampled frames than one clip is too_short,
frames above the pixel bound are a decompression_bomb.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from tokshard.errors import SkipSample
from tokshard.pipeline.convert.decode import DecodeConfig, resize_array


@dataclass(frozen=True)
class ClipConfig:
    frames: int = 16
    fps: float | None = None
    stride: int | None = None
    max_clips: int = 64          # bounds memory and time per video; raise it for long videos

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError("clip frames must be at least 1")
        if self.fps is not None and self.fps <= 0:
            raise ValueError("clip fps must be positive")
        if self.stride is not None and self.stride < 1:
            raise ValueError("clip stride must be at least 1")
        if self.max_clips < 1:
            raise ValueError("max clips must be at least 1")


@dataclass
class Clip:
    frames: np.ndarray        # (T, R, R, 3) uint8
    times: list[float]        # presentation time of each sampled frame, seconds
    index: int
    source_fps: float | None


def decode_clips(data: bytes, decode: DecodeConfig, clip: ClipConfig) -> tuple[list[Clip], int, int]:
    """(clips, width, height) of a video; raises SkipSample for a bad one."""
    import av

    if len(data) == 0:
        raise SkipSample("empty_file")
    stride = clip.stride or clip.frames
    needed = (clip.max_clips - 1) * stride + clip.frames   # sampled frames that can end up in a clip
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise SkipSample("decode_error", f"not a readable video container: {e}") from None
    with container:
        if not container.streams.video:
            raise SkipSample("decode_error", "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > decode.max_pixels:
            raise SkipSample("decompression_bomb", f"{width}x{height} frames above {decode.max_pixels} pixels")
        rate = float(stream.average_rate) if stream.average_rate else None
        frames, times, next_t = [], [], None
        try:
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else len(times) / (rate or 1.0)
                if clip.fps is not None:
                    if next_t is None:
                        next_t = t
                    if t + 1e-6 < next_t:
                        continue
                    next_t += 1.0 / clip.fps
                if frame.width * frame.height > decode.max_pixels:
                    raise SkipSample("decompression_bomb", f"a {frame.width}x{frame.height} frame")
                frames.append(resize_array(frame.to_ndarray(format="rgb24"), decode))
                times.append(round(t, 6))
                if len(frames) >= needed:
                    break
        except (av.error.FFmpegError, ValueError, OSError) as e:
            if len(frames) < clip.frames:
                raise SkipSample("decode_error", f"video stream: {e}") from None
            # A damaged tail: the clips before it are good.
    if len(frames) < clip.frames:
        raise SkipSample("too_short", f"{len(frames)} sampled frames, a clip needs {clip.frames}")
    clips = []
    for i, start in enumerate(range(0, len(frames) - clip.frames + 1, stride)):
        if i == clip.max_clips:
            break
        clips.append(Clip(np.stack(frames[start:start + clip.frames]), times[start:start + clip.frames], i, rate))
    return clips, width, height


def clip_meta(c: Clip, clip: ClipConfig) -> dict:
    return {"clip": c.index, "start_s": c.times[0], "end_s": c.times[-1], "frame_times": c.times,
            "fps": clip.fps or c.source_fps, "source_fps": c.source_fps}
