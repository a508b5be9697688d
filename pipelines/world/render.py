"""The story world's renderer: 64x64 RGB frames of one or two characters on a scene.

Everything is drawn with hard edges from a few flat colours on fixed slots, so that a tiny
diffusion model can learn it and :mod:`pipelines.world.reader` can decode any image back::

    rows  0..43   sky   (scene colour)        rows 44..63 ground (scene colour)
    slot  left / centre / right: body centred at x = 11, 32, 53, standing on row 56
    body  size big = 18 px, small = 12 px (square bounding box)

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
    "BLACK", "SKY_ROWS", "GROUND_ROW", "FOOT_ROW", "SLOT_X", "BODY_PX", "ATTRIBUTES",
    "Identity", "Placement", "all_identities", "render_frame", "shape_mask", "body_box",
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

SLOT_X = {"left": 11, "centre": 32, "right": 53}     # body centre column
BODY_PX = {"small": 12, "big": 18}                   # body width = height
GROUND_ROW = 44                                      # first ground row
FOOT_ROW = 57                                        # first row below every body
SKY_ROWS = 9                                         # rows 0..8 never hold a character


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
    """(row0, row1, col0, col1), end-exclusive, of a body's square bounding box."""
    s = BODY_PX[size]
    c0 = SLOT_X[position] - s // 2
    return bottom - s, bottom, c0, c0 + s


def _uv(s: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1] of an s x s box (v down, u right)."""
    t = (np.arange(s) + 0.5) / s
    return np.meshgrid(t, t, indexing="xy")


def shape_mask(shape: str, s: int) -> np.ndarray:
    """bool [s, s]: the body pixels of ``shape`` in its bounding box."""
    u, v = _uv(s)
    if shape == "square":
        return np.ones((s, s), bool)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":
        return np.abs(u - 0.5) <= v / 2 + 0.5 / s
    if shape == "diamond":
        return np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5 + 0.5 / s
    raise ValueError(f"shape {shape!r} is not one of {SHAPES}")


def pattern_mask(pattern: str, s: int) -> np.ndarray:
    """bool [s, s]: where the pattern paints black inside the body's box."""
    u, v = _uv(s)
    if pattern == "solid":
        return np.zeros((s, s), bool)
    if pattern == "stripe":
        return np.abs(u - 0.5) < 1 / 6
    if pattern == "belt":
        return np.abs(v - 0.55) < 1 / 8
    raise ValueError(f"pattern {pattern!r} is not one of {PATTERNS}")


def accessory_boxes(accessory: str, r0: int, r1: int, c0: int, s: int) -> List[Tuple[int, int, int, int]]:
    """Black rectangles (row0, row1, col0, col1) of an accessory for a body box."""
    if accessory == "none":
        return []
    if accessory == "hat":
        w = round(0.6 * s)
        a = c0 + (s - w) // 2
        return [(r0 - s // 3, r0, a, a + w)]
    if accessory == "boots":
        h = max(2, s // 6)
        w = round(0.25 * s)
        return [(r1, r1 + h, c0 + round(0.15 * s), c0 + round(0.15 * s) + w),
                (r1, r1 + h, c0 + s - round(0.15 * s) - w, c0 + s - round(0.15 * s))]
    raise ValueError(f"accessory {accessory!r} is not one of {ACCESSORIES}")


def background(scene: str) -> np.ndarray:
    if scene not in SCENES:
        raise ValueError(f"scene {scene!r} is not one of {tuple(SCENES)}")
    sky, ground = SCENES[scene]
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:GROUND_ROW] = sky
    img[GROUND_ROW:] = ground
    return img


def draw_character(img: np.ndarray, p: Placement) -> None:
    """Paint one character into ``img`` (uint8 [64, 64, 3]) in place."""
    s = BODY_PX[p.size]
    r0, r1, c0, c1 = body_box(p.position, p.size)
    body = shape_mask(p.identity.shape, s)
    black = body & pattern_mask(p.identity.pattern, s)
    region = img[r0:r1, c0:c1]
    region[body] = COLOURS[p.identity.colour]
    region[black] = BLACK
    for a0, a1, b0, b1 in accessory_boxes(p.identity.accessory, r0, r1, c0, s):
        img[a0:a1, b0:b1] = BLACK


def render_frame(scene: str, placements: Sequence[Placement] = ()) -> np.ndarray:
    """uint8 [64, 64, 3]: the scene with each placement drawn (at most one per slot)."""
    slots = [p.position for p in placements]
    if len(set(slots)) != len(slots):
        raise ValueError(f"two characters in one slot: {slots}")
    img = background(scene)
    for p in placements:
        draw_character(img, p)
    return img


def to_pil(img: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.asarray(img, np.uint8), "RGB")
