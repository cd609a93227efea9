"""Real photos that ship inside installed packages (scikit-image, scikit-learn).

They are the embedded default's data: the demo converts them, the default
tokenizer is fitted on them, and the tests and benchmarks build their inputs
from them, so nothing is downloaded and no large binary lives in the repo.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# Photographs only (no synthetic test charts), in a fixed order.
_SKIMAGE = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
    "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg",
)
_SKLEARN = ("china.jpg", "flower.jpg")


def photo_paths() -> list[Path]:
    """Paths of the bundled photos, in a fixed order."""
    import skimage.data
    import sklearn.datasets

    sk = Path(skimage.data.__file__).parent
    sl = Path(sklearn.datasets.__file__).parent / "images"
    paths = [sk / n for n in _SKIMAGE] + [sl / n for n in _SKLEARN]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"bundled sample photos missing: {missing}")
    return paths


def load_photo(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def random_crops(photo: np.ndarray, n: int, rng: np.random.Generator,
                 min_side: int = 96) -> list[np.ndarray]:
    """`n` random axis-aligned crops (varied size and aspect, random flips)."""
    h, w = photo.shape[:2]
    crops = []
    for _ in range(n):
        ch = int(rng.integers(min(min_side, h), h + 1))
        cw = int(rng.integers(min(min_side, w), w + 1))
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        crop = photo[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crops.append(np.ascontiguousarray(crop))
    return crops


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sample_images(crops_per_photo: int = 0, seed: int = 0) -> list[tuple[str, np.ndarray, int]]:
    """(key, RGB array, label) for every photo, plus `crops_per_photo` crops of each.

    The label is the photo's index, so crops share their photo's label.
    """
    rng = np.random.default_rng(seed)
    out = []
    for label, path in enumerate(photo_paths()):
        photo = load_photo(path)
        out.append((path.stem, photo, label))
        for i, crop in enumerate(random_crops(photo, crops_per_photo, rng)):
            out.append((f"{path.stem}_crop{i:03d}", crop, label))
    return out


def write_img2dataset_shards(dest: str | Path, crops_per_photo: int = 3, shard_size: int = 32,
                             seed: int = 0, quality: int = 95) -> list[Path]:
    """Write the photos (and crops) as WebDataset tars laid out as img2dataset writes them.

    Each sample has `KEY.jpg`, `KEY.txt` (caption), `KEY.json` (metadata) and
    `KEY.cls` (label); keys are zero-padded running numbers, as img2dataset's.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    samples = sample_images(crops_per_photo, seed)
    shards = []
    for s, start in enumerate(range(0, len(samples), shard_size)):
        path = dest / f"{s:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for i, (name, image, label) in enumerate(samples[start:start + shard_size], start):
                key = f"{s:05d}{i:04d}"
                jpg = jpeg_bytes(image, quality)
                meta = {"key": key, "caption": f"a photo: {name}", "width": image.shape[1],
                        "height": image.shape[0], "status": "success", "url": f"bundled://{name}"}
                for ext, data in (("jpg", jpg), ("txt", meta["caption"].encode()),
                                  ("json", json.dumps(meta).encode()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards
