"""The story world's renderer: 64x64 RGB frames of one or two characters on a scene.

Everything is drawn with hard edges from a few flat colours on fixed slots, so that a tiny
diffusion model can learn it and :mod:`pipelines.world.reader` can decode any image back::

    rows  0..43   sky   (scene colour)        rows 44..63 ground (scene colour)
    slot  left / centre / right: body centred at x = 16, 32, 48, standing on row 53
          (a lone character stands in any slot; two always stand left and right)
    body  big = 30 wide x 40 tall, small = 26 x 32 (the shape fills that box)

Why so big: the world's models see a frame as 8 x 8 tokens of 8 x 8 pixels (VAE 4x, 2x2
patches).  Characters 12-18 px tall fell on 1-4 tokens, too few to carry shape, colour,
pattern and accessory at once; at these sizes every character has at least 12 tokens of which
it fills at least 1/8 (``character_tokens``; tests/test_world.py checks every identity, slot
and size).  Two big characters side by side still leave a 2-pixel gap.

A character's identity is four attributes the prompt never states:

=========  ================================================================
shape      square, circle, triangle (apex up), diamond
colour     8 saturated palette colours, far from every scene colour
pattern    solid, stripe (a black vertical band), belt (a black horizontal band)
accessory  none, hat (black block above the body), boots (two black feet)
=========  ================================================================

4 x 8 x 3 x 3 = 288 identities.  A frame's prompt states only who (a name that says nothing of
the look), where (slot), how big (size) and the scene.  ``render_frame`` is a pure function of
its arguments: the same call gives the same bytes.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "SIZE", "SHAPES", "COLOURS", "PATTERNS", "ACCESSORIES", "SCENES", "POSITIONS", "SIZES",
    "BLACK", "SKY_ROWS", "GROUND_ROW", "FOOT_ROW", "GROUND_READ_ROW", "SLOT_X", "BODY_PX",
    "ATTRIBUTES", "TOKEN_PX", "Identity", "Placement", "all_identities", "render_frame",
    "shape_mask", "body_box", "character_box", "character_mask", "character_tokens", "DUO_POSITIONS",
]

SIZE = 64
SHAPES = ("square", "circle", "triangle", "diamond")
# saturated colours, pairwise >= 120 apart in RGB, and >= 100 from every scene colour
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 0),
    "yellow": (240, 230, 0),
    "green": (0, 170, 40),
    "cyan": (0, 200, 210),
    "blue": (30, 60, 230),
    "purple": (140, 40, 210),
    "pink": (250, 90, 200),
}
PATTERNS = ("solid", "stripe", "belt")
ACCESSORIES = ("none", "hat", "boots")
BLACK = (20, 20, 20)
# scene -> (sky, ground): low saturation, so characters stand out by colour
SCENES: Dict[str, Tuple[Tuple[int, int, int], Tuple[int, int, int]]] = {
    "day": ((160, 200, 240), (130, 160, 110)),
    "night": ((70, 70, 120), (95, 95, 85)),
    "snow": ((200, 205, 215), (250, 250, 250)),
    "forest": ((110, 140, 100), (120, 90, 65)),
    "sunset": ((235, 185, 150), (150, 110, 130)),
}
POSITIONS = ("left", "centre", "right")
SIZES = ("small", "big")
ATTRIBUTES = ("shape", "colour", "pattern", "accessory")

SLOT_X = {"left": 16, "centre": 32, "right": 48}     # body centre column
DUO_POSITIONS = ("left", "right")                    # where two characters stand
BODY_PX = {"small": (32, 26), "big": (40, 30)}       # body (height, width)
GROUND_ROW = 44                                      # first ground row
FOOT_ROW = 54                                        # first row below every body
SKY_ROWS = 4                                         # rows 0..3 never hold a character (hats start at 4)
GROUND_READ_ROW = 61                                 # rows 61..63 never hold one (boots end at 60)
TOKEN_PX = 8                                         # pixels per model token side (VAE 4x, 2x2 patch)


@dataclass(frozen=True)
class Identity:
    shape: str
    colour: str
    pattern: str
    accessory: str

    def __post_init__(self):
        for name, allowed in (("shape", SHAPES), ("colour", tuple(COLOURS)),
                              ("pattern", PATTERNS), ("accessory", ACCESSORIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {allowed}")

    def as_dict(self) -> Dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Placement:
    identity: Identity
    position: str = "centre"
    size: str = "big"

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ValueError(f"position {self.position!r} is not one of {POSITIONS}")
        if self.size not in SIZES:
            raise ValueError(f"size {self.size!r} is not one of {SIZES}")


def all_identities() -> List[Identity]:
    """Every identity of the world, in a fixed order."""
    return [Identity(*t) for t in itertools.product(SHAPES, COLOURS, PATTERNS, ACCESSORIES)]


def body_box(position: str, size: str, bottom: int = FOOT_ROW) -> Tuple[int, int, int, int]:
    """(row0, row1, col0, col1), end-exclusive, of a body's bounding box."""
    h, w = BODY_PX[size]
    c0 = SLOT_X[position] - w // 2
    return bottom - h, bottom, c0, c0 + w


def character_box(position: str, size: str) -> Tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in fractions of the frame: the columns of the body box and the rows
    any accessory may reach (hat above, boots below), the region a character's reference
    is read in (:func:`storyattn.region_masks`)."""
    _, _, c0, c1 = body_box(position, size)
    return c0 / SIZE, SKY_ROWS / SIZE, c1 / SIZE, GROUND_READ_ROW / SIZE


def _uv(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1] of an h x w box (v down, u right)."""
    return np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h, indexing="xy")


def shape_mask(shape: str, h: int, w: Optional[int] = None) -> np.ndarray:
    """bool [h, w]: the body pixels of ``shape`` in its bounding box (``w`` defaults to h)."""
    w = h if w is None else w
    u, v = _uv(h, w)
    if shape == "square":
        return np.ones((h, w), bool)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":
        return np.abs(u - 0.5) <= v / 2 + 0.5 / w
    if shape == "diamond":
        return np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5 + 0.5 / min(h, w)
    raise ValueError(f"shape {shape!r} is not one of {SHAPES}")


def pattern_mask(pattern: str, h: int, w: Optional[int] = None) -> np.ndarray:
    """bool [h, w]: where the pattern paints black inside the body's box."""
    w = h if w is None else w
    u, v = _uv(h, w)
    if pattern == "solid":
        return np.zeros((h, w), bool)
    if pattern == "stripe":
        return np.abs(u - 0.5) < 1 / 6
    if pattern == "belt":
        return np.abs(v - 0.55) < 1 / 8
    raise ValueError(f"pattern {pattern!r} is not one of {PATTERNS}")


def accessory_boxes(accessory: str, r0: int, r1: int, c0: int, w: int
                    ) -> List[Tuple[int, int, int, int]]:
    """Black rectangles (row0, row1, col0, col1) of an accessory for a body box of width w."""
    if accessory == "none":
        return []
    if accessory == "hat":
        hw = round(0.6 * w)
        a = c0 + (w - hw) // 2
        return [(r0 - w // 3, r0, a, a + hw)]
    if accessory == "boots":
        h = max(2, w // 5)
        bw = round(0.25 * w)
        return [(r1, r1 + h, c0 + round(0.15 * w), c0 + round(0.15 * w) + bw),
                (r1, r1 + h, c0 + w - round(0.15 * w) - bw, c0 + w - round(0.15 * w))]
    raise ValueError(f"accessory {accessory!r} is not one of {ACCESSORIES}")


def background(scene: str) -> np.ndarray:
    if scene not in SCENES:
        raise ValueError(f"scene {scene!r} is not one of {tuple(SCENES)}")
    sky, ground = SCENES[scene]
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:GROUND_ROW] = sky
    img[GROUND_ROW:] = ground
    return img


def character_mask(p: Placement) -> np.ndarray:
    """bool [64, 64]: every pixel the character paints (body, pattern, accessory)."""
    h, w = BODY_PX[p.size]
    r0, r1, c0, c1 = body_box(p.position, p.size)
    m = np.zeros((SIZE, SIZE), bool)
    m[r0:r1, c0:c1] = shape_mask(p.identity.shape, h, w)
    for a0, a1, b0, b1 in accessory_boxes(p.identity.accessory, r0, r1, c0, w):
        m[a0:a1, b0:b1] = True
    return m


def character_tokens(p: Placement, min_share: float = 1 / 8) -> int:
    """How many of the model's image tokens (TOKEN_PX x TOKEN_PX patches) the character fills
    at least ``min_share`` of."""
    n = SIZE // TOKEN_PX
    per = character_mask(p).reshape(n, TOKEN_PX, n, TOKEN_PX).sum(axis=(1, 3))
    return int((per >= min_share * TOKEN_PX * TOKEN_PX).sum())


def draw_character(img: np.ndarray, p: Placement) -> None:
    """Paint one character into ``img`` (uint8 [64, 64, 3]) in place."""
    h, w = BODY_PX[p.size]
    r0, r1, c0, c1 = body_box(p.position, p.size)
    body = shape_mask(p.identity.shape, h, w)
    black = body & pattern_mask(p.identity.pattern, h, w)
    region = img[r0:r1, c0:c1]
    region[body] = COLOURS[p.identity.colour]
    region[black] = BLACK
    for a0, a1, b0, b1 in accessory_boxes(p.identity.accessory, r0, r1, c0, w):
        img[a0:a1, b0:b1] = BLACK


def render_frame(scene: str, placements: Sequence[Placement] = ()) -> np.ndarray:
    """uint8 [64, 64, 3]: the scene with each placement drawn (one per slot; two characters
    stand left and right, since a centre body would overlap either)."""
    slots = [p.position for p in placements]
    if len(set(slots)) != len(slots):
        raise ValueError(f"two characters in one slot: {slots}")
    if len(slots) > 1 and not set(slots) <= set(DUO_POSITIONS):
        raise ValueError(f"two characters stand {DUO_POSITIONS}, got {slots}")
    img = background(scene)
    for p in placements:
        draw_character(img, p)
    return img


def to_pil(img: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.asarray(img, np.uint8), "RGB")
