"""Several stored views per image, made at convert time.

Token augmentation cannot undo what the tokenizer saw: a flipped token grid is
not the tokens of the flipped image unless the tokenizer is flip-equivariant.
LlamaGen and TiTok therefore pre-tokenize extra views (horizontal flip; ten
crops of the image enlarged by 1.1, LlamaGen's `extract_codes` with
crop_range=1.1) and the loader picks one at random per sample.
"""

from __future__ import annotations

import numpy as np

from tokshard.errors import UsageError

_FIVE = ("top_left", "top_right", "bottom_left", "bottom_right", "center")
VIEWS = {
    "none": ("orig",),
    "hflip": ("orig", "hflip"),
    # torchvision TenCrop order: five crops, then the same five of the flipped image.
    "tencrop": _FIVE + tuple(f"{c}_hflip" for c in _FIVE),
}
TENCROP_RANGE = 1.1


def view_names(views: str) -> tuple[str, ...]:
    try:
        return VIEWS[views]
    except KeyError:
        raise UsageError(f"unknown views {views!r} (one of {', '.join(VIEWS)})") from None


def decode_resolution(views: str, resolution: int) -> int:
    """The side images are decoded to before the views are cut from them."""
    return int(resolution * TENCROP_RANGE) if views == "tencrop" else resolution


def make_views(image: np.ndarray, views: str, resolution: int) -> list[np.ndarray]:
    """The views of one decoded (S, S, 3) image, each (resolution, resolution, 3)."""
    if views == "none":
        return [image]
    if views == "hflip":
        return [image, np.ascontiguousarray(image[:, ::-1])]
    crops = []
    for img in (image, image[:, ::-1]):
        s, r = img.shape[0], resolution
        c = (s - r) // 2
        for y, x in ((0, 0), (0, s - r), (s - r, 0), (s - r, s - r), (c, c)):
            crops.append(np.ascontiguousarray(img[y:y + r, x:x + r]))
    return crops
