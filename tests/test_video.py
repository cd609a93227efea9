"""Video sources: clips decoded with PyAV, tokenized frame by frame, with timing."""

import io
import json
import tarfile

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import RES, convert_config

import tokshard
from tokshard.errors import UsageError
from tokshard.pipeline.convert.decode import DecodeConfig, resize_array
from tokshard.pipeline.convert.job import convert
from tokshard.tokenizers.kmeans_vq import KMeansVQ


def make_video(photo: np.ndarray, frames: int, fps: int = 30, container: str = "mp4",
               codec: str = "libx264", size=(64, 48)) -> bytes:
    """A real encoded clip: a window panning across a bundled photo."""
    w, h = size
    buf = io.BytesIO()
    with av.open(buf, mode="w", format={"mkv": "matroska"}.get(container, container)) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            x = (i * 3) % max(1, photo.shape[1] - w)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(photo[:h, x:x + w]), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def frames_of(data: bytes, every: int = 1) -> list[np.ndarray]:
    """Decoded, resized frames, computed without the pipeline."""
    with av.open(io.BytesIO(data)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return [resize_array(f, DecodeConfig(resolution=RES)) for f in frames[::every]]


@pytest.fixture(scope="module")
def videos(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("videos")
    big = [p for _, p, _ in photos if p.shape[1] >= 120]
    data = {
        "a.mp4": make_video(big[0], 30),
        "b.webm": make_video(big[1], 20, container="webm", codec="libvpx-vp9"),
        "c.mkv": make_video(big[2], 12, container="mkv"),
        "short.mp4": make_video(big[3], 3),
    }
    data["broken.mp4"] = data["a.mp4"][:200]
    for name, blob in data.items():
        (root / name).write_bytes(blob)
    (root / "a.txt").write_text("a panning shot")
    (root / "a.cls").write_text("7")
    return root, data


def read_meta(dest):
    out = {}
    for path in sorted((dest / "shards").glob("*.parquet")):
        t = pq.read_table(path, columns=["key", "meta", "caption", "label"])
        for key, meta, caption, label in zip(*(t.column(c).to_pylist() for c in ("key", "meta", "caption", "label"))):
            out[key] = (json.loads(meta), caption, label)
    return out


def test_clips_are_tokenized_frame_by_frame_with_their_timing(tmp_path, videos, tokenizer_dir):
    root, data = videos
    dest = tmp_path / "ds"
    result = convert(convert_config([root], dest, tokenizer_dir, clip_frames=8), quiet=True)
    record = result["dataset"]
    assert record["skipped_by_reason"] == {"decode_error": 1, "too_short": 1}
    assert record["video"]["tokenized"] == "per_frame" and record["sample_shape"] == [8, 8, 8]
    ds = tokshard.open(dest)
    assert ds.sample_shape == (8, 8, 8)
    tok = KMeansVQ.load(tokenizer_dir)
    stored = {key: tokens for _, key, tokens, _ in ds}
    # 30 frames -> 3 clips of 8, 20 -> 2, 12 -> 1 (non-overlapping, no partial clip).
    assert sorted(stored) == ["a_0000", "a_0001", "a_0002", "b_0000", "b_0001", "c_0000"]
    for name in ("a.mp4", "b.webm", "c.mkv"):
        frames = frames_of(data[name])
        stem = name.split(".")[0]
        for i in range(len(frames) // 8):
            want = tok.encode(np.stack(frames[i * 8:(i + 1) * 8]))
            assert np.array_equal(stored[f"{stem}_{i:04d}"], want), (name, i)
    meta = read_meta(dest)
    video, caption, label = meta["a_0001"]
    assert (caption, label) == ("a panning shot", 7)
    assert video["video"]["clip"] == 1 and video["video"]["source_fps"] == 30
    assert video["video"]["frame_times"] == pytest.approx([(8 + k) / 30 for k in range(8)], abs=1e-3)
    assert video["video"]["start_s"] == pytest.approx(8 / 30, abs=1e-3)
    batch = next(iter(ds.loader(4, rank=0, world_size=1, shuffle=False)))
    assert batch["tokens"].shape == (4, 8, 8, 8)


def test_fps_and_stride_sample_the_frames(tmp_path, videos, tokenizer_dir):
    _, data = videos
    dest = tmp_path / "ds"
    src = tmp_path / "only-a"
    src.mkdir()
    (src / "a.mp4").write_bytes(data["a.mp4"])
    convert(convert_config([src], dest, tokenizer_dir, clip_frames=4, clip_fps=10, clip_stride=2, max_clips=3),
            quiet=True)
    ds = tokshard.open(dest)
    tok = KMeansVQ.load(tokenizer_dir)
    every_third = frames_of(data["a.mp4"], every=3)          # 30 fps sampled at 10 fps
    stored = {key: tokens for _, key, tokens, _ in ds}
    assert sorted(stored) == ["a_0000", "a_0001", "a_0002"]   # 10 sampled frames, stride 2, capped at 3
    for i in range(3):
        assert np.array_equal(stored[f"a_{i:04d}"], tok.encode(np.stack(every_third[2 * i:2 * i + 4])))
    times = read_meta(dest)["a_0001"][0]["video"]["frame_times"]
    assert times == pytest.approx([0.2, 0.3, 0.4, 0.5], abs=1e-3)


def test_context_codec_learns_the_clip_geometry(tmp_path, videos, tokenizer_dir):
    root, _ = videos
    dest = tmp_path / "ds"
    result = convert(convert_config([root], dest, tokenizer_dir, clip_frames=8, codec="rans-ctx"), quiet=True)
    params = result["dataset"]["codec"]["params"]
    assert (params["width"], params["plane"]) == (8, 64)      # rows of 8 codes, 8x8 codes per frame
    plain = tmp_path / "plain"
    convert(convert_config([root], plain, tokenizer_dir, clip_frames=8, codec="raw"), quiet=True)
    want = {k: t for _, k, t, _ in tokshard.open(plain)}
    assert all(np.array_equal(t, want[k]) for _, k, t, _ in tokshard.open(dest))


def test_video2dataset_tars(tmp_path, videos, tokenizer_dir):
    _, data = videos
    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key, name in (("000000000", "a.mp4"), ("000000001", "c.mkv")):
            for ext, blob in ((name.split(".")[1], data[name]), ("txt", b"caption"),
                              ("json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    dest = tmp_path / "ds"
    result = convert(convert_config([tar_path], dest, tokenizer_dir, clip_frames=8, format="wds"), quiet=True)
    assert result["dataset"]["totals"]["samples"] == 4
    keys = sorted(k for _, k, _, _ in tokshard.open(dest))
    assert keys == ["000000000_0000", "000000000_0001", "000000000_0002", "000000001_0000"]


def test_video_options_are_checked(tmp_path, videos, tokenizer_dir):
    root, _ = videos
    with pytest.raises(UsageError, match="--views applies to images"):
        convert(convert_config([root], tmp_path / "x", tokenizer_dir, clip_frames=8, views="hflip"), quiet=True)
    with pytest.raises(UsageError, match="clip frames"):
        convert(convert_config([root], tmp_path / "y", tokenizer_dir, clip_frames=0), quiet=True)
