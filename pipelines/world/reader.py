"""The exact reader: from any RGB image, what the world's renderer drew.

A deterministic pixel-level decoder (no learned network), built on the renderer's fixed layout:

1. scene: the median colour of the top rows (always sky) and the bottom rows (always ground),
   nearest of the scenes' colour pairs; ``"unknown"`` when no pair is close;
2. every pixel gets the nearest of {8 palette colours, black, this scene's sky and ground} or
   ``other`` when nothing is close (noise, blur edges, a model's invented colour);
3. a character is a cluster of palette pixels: the columns holding enough of them, split at
   gaps; its colour is the majority palette colour there, its size the cluster's width, its
   position the nearest slot centre;
4. shape, pattern and accessory are read in the body box implied by size and bottom edge, by
   comparing measured features with the same features of the renderer's own masks (templates
   made by :mod:`pipelines.world.render`, never hand-typed), nearest template wins; a feature
   vector far from every template reads ``"unknown"``.

``read_image(img) -> Reading``; a ``Reading`` has ``scene`` and ``characters`` (left to right),
each a dict ``position, size, shape, colour, pattern, accessory, x, pixels``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, List, Optional

import numpy as np

from . import render as R

__all__ = ["Reading", "read_image", "UNKNOWN", "to_array"]

UNKNOWN = "unknown"
_PALETTE = np.array(list(R.COLOURS.values()), np.float32)
_NAMES = list(R.COLOURS)
_SCENE_NAMES = list(R.SCENES)
_SCENE_SKY = np.array([R.SCENES[s][0] for s in _SCENE_NAMES], np.float32)
_SCENE_GROUND = np.array([R.SCENES[s][1] for s in _SCENE_NAMES], np.float32)
_SCENE_MAX_DIST = 60.0      # RGB distance of a row median to the scene colour
_PIXEL_MAX_DIST = 80.0      # a pixel further than this from every class is "other"
_MIN_COLUMN_PIXELS = 3      # palette pixels a column needs to belong to a character
_MIN_CHAR_PIXELS = 60       # smallest character (small triangle with a stripe) has ~350

# pixel class ids
_BLACK = len(_NAMES)
_SKY = _BLACK + 1
_GROUND = _BLACK + 2
_OTHER = -1


@dataclass
class Reading:
    scene: str
    characters: List[Dict[str, Any]] = field(default_factory=list)

    def at(self, position: str) -> Optional[Dict[str, Any]]:
        for c in self.characters:
            if c["position"] == position:
                return c
        return None

    def as_dict(self) -> Dict[str, Any]:
        return {"scene": self.scene, "characters": [dict(c) for c in self.characters]}


def to_array(img) -> np.ndarray:
    """PIL image, path, or array ([H, W, 3] uint8 or float in [0, 1]) -> uint8 [64, 64, 3]."""
    from PIL import Image

    if isinstance(img, (str, bytes)) or hasattr(img, "__fspath__"):
        with Image.open(img) as im:
            img = im.convert("RGB")
    if isinstance(img, Image.Image):
        img = img.convert("RGB")
        if img.size != (R.SIZE, R.SIZE):
            img = img.resize((R.SIZE, R.SIZE), Image.BILINEAR)
        return np.asarray(img, np.uint8)
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.asarray(arr, np.float64) * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255)
        arr = np.round(arr).astype(np.uint8)
    if arr.shape[:2] != (R.SIZE, R.SIZE):
        return to_array(Image.fromarray(arr, "RGB"))
    return arr


def _read_scene(img: np.ndarray):
    sky = np.median(img[:R.SKY_ROWS].reshape(-1, 3), axis=0).astype(np.float32)
    ground = np.median(img[R.GROUND_READ_ROW:].reshape(-1, 3), axis=0).astype(np.float32)
    d = np.maximum(np.linalg.norm(_SCENE_SKY - sky, axis=1),
                   np.linalg.norm(_SCENE_GROUND - ground, axis=1))
    k = int(np.argmin(d))
    if d[k] > _SCENE_MAX_DIST:
        return UNKNOWN, sky, ground
    return _SCENE_NAMES[k], sky, ground


def _classify(img: np.ndarray, sky: np.ndarray, ground: np.ndarray) -> np.ndarray:
    """int [64, 64]: palette index, _BLACK, _SKY, _GROUND or _OTHER per pixel."""
    x = img.astype(np.float32)
    classes = np.concatenate([_PALETTE, np.array([R.BLACK], np.float32)], 0)
    d = np.linalg.norm(x[:, :, None, :] - classes[None, None], axis=-1)      # [H, W, 9]
    rows = np.arange(R.SIZE)[:, None]
    bg = np.where((rows < R.GROUND_ROW)[..., None], sky, ground)             # [H, 1, 3] -> per row
    d_bg = np.linalg.norm(x - np.broadcast_to(bg, x.shape), axis=-1)
    d = np.concatenate([d, d_bg[..., None], d_bg[..., None]], -1)
    lab = np.argmin(d[..., :_SKY + 1], axis=-1)
    lab = np.where(lab == _SKY, np.where(rows < R.GROUND_ROW, _SKY, _GROUND), lab)
    best = np.min(d[..., :_SKY + 1], axis=-1)
    return np.where(best > _PIXEL_MAX_DIST, _OTHER, lab)


# ---- templates from the renderer -------------------------------------------------------
#
# A character is read by matching: every (size, shape, pattern, accessory) is drawn by the
# renderer itself into a small label window (0 background, 1 body colour, 2 black), and the
# window of the image, shifted by a few pixels around where the body colour sits, is compared
# label by label.  The template with the most agreeing pixels wins.  Nothing about the shapes is
# typed twice, and noise, blur or a slightly misplaced body only lower the agreement a little.

_WIN_ROWS = (R.SKY_ROWS - 2, R.SIZE)        # window rows in the canonical (centre slot) frame
_WIN_COLS = (R.SLOT_X["centre"] - 18, R.SLOT_X["centre"] + 18)
_SEARCH = 4                                 # pixels searched around the estimated offset
_MIN_AGREEMENT = 0.5                        # of the template's own character pixels


@lru_cache(maxsize=None)
def _templates():
    keys, arrays = [], []
    for size in R.SIZES:
        for shape in R.SHAPES:
            for pattern in R.PATTERNS:
                for acc in R.ACCESSORIES:
                    canvas = np.zeros((R.SIZE, R.SIZE, 3), np.uint8)
                    ident = R.Identity(shape, "red", pattern, acc)
                    R.draw_character(canvas, R.Placement(ident, "centre", size))
                    lab = np.zeros((R.SIZE, R.SIZE), np.int8)
                    lab[(canvas == R.COLOURS["red"]).all(-1)] = 1
                    lab[(canvas == R.BLACK).all(-1)] = 2
                    keys.append((size, shape, pattern, acc))
                    arrays.append(lab[_WIN_ROWS[0]:_WIN_ROWS[1], _WIN_COLS[0]:_WIN_COLS[1]])
    return keys, np.stack(arrays)


def _best_template(obs: np.ndarray, dy0: int, dx0: int, dy1: Optional[int] = None):
    """Search offsets around (dy0..dy1, dx0); return (key, dy, dx, agreement on the
    template's character pixels)."""
    dy1 = dy0 if dy1 is None else dy1
    keys, T = _templates()
    h, w = T.shape[1:]
    pad = _SEARCH + 40
    padded = np.pad(obs, pad, constant_values=0)
    fg_count = (T > 0).sum(axis=(1, 2))
    best = (-1, None, 0, 0)
    for dy in range(min(dy0, dy1) - _SEARCH, max(dy0, dy1) + _SEARCH + 1):
        for dx in range(dx0 - _SEARCH, dx0 + _SEARCH + 1):
            r0, c0 = _WIN_ROWS[0] + dy + pad, _WIN_COLS[0] + dx + pad
            if r0 < 0 or c0 < 0 or r0 + h > padded.shape[0] or c0 + w > padded.shape[1]:
                continue
            crop = padded[r0:r0 + h, c0:c0 + w]
            agree = (T == crop[None]).sum(axis=(1, 2))
            k = int(np.argmax(agree))
            if agree[k] > best[0]:
                best = (int(agree[k]), k, dy, dx)
    score, k, dy, dx = best
    if k is None:
        return None, 0, 0, 0.0
    own = (T[k] > 0)
    r0, c0 = _WIN_ROWS[0] + dy + pad, _WIN_COLS[0] + dx + pad
    crop = padded[r0:r0 + h, c0:c0 + w]
    on_char = float((crop[own] == T[k][own]).mean()) if fg_count[k] else 0.0
    return keys[k], dy, dx, on_char


# ---- characters --------------------------------------------------------------------------


def _clusters(fg: np.ndarray) -> List[tuple]:
    """Column runs [c0, c1) holding enough character pixels (palette or black), split at
    columns without (a stripe pattern is black, so palette pixels alone would split it)."""
    cols = fg.sum(axis=0) >= _MIN_COLUMN_PIXELS
    runs, start = [], None
    for c in range(R.SIZE + 1):
        on = c < R.SIZE and cols[c]
        if on and start is None:
            start = c
        elif not on and start is not None:
            runs.append((start, c))
            start = None
    return runs


def _read_character(lab: np.ndarray, c0: int, c1: int) -> Optional[Dict[str, Any]]:
    sub = lab[:, c0:c1]
    counts = np.bincount(sub[(sub >= 0) & (sub < _BLACK)], minlength=len(_NAMES))
    total = int(counts.sum())
    if total < _MIN_CHAR_PIXELS:
        return None
    k = int(np.argmax(counts))
    colour = _NAMES[k] if counts[k] >= 0.6 * total else UNKNOWN
    body = (lab == k) if colour != UNKNOWN else ((lab >= 0) & (lab < _BLACK))
    mine = body[:, c0:c1]
    rows = np.where(mine.any(axis=1))[0]
    cols = np.where(mine.any(axis=0))[0]
    centre = c0 + (cols[0] + cols[-1] + 1) / 2.0
    obs = np.zeros(lab.shape, np.int8)
    obs[:, c0:c1][mine] = 1
    obs[:, c0:c1][lab[:, c0:c1] == _BLACK] = 2
    obs[:, c0:c1][(lab[:, c0:c1] == _OTHER)] = 3       # matches no template label
    # the body colour's lowest row is the body's bottom unless a stripe paints a pointed
    # bottom black (diamond, triangle tip): search down to the lowest body-or-black row
    # without boots' height, so both cases are in range
    dark = np.where((mine | (lab[:, c0:c1] == _BLACK)).any(axis=1))[0]
    dy0 = int(rows[-1]) + 1 - R.FOOT_ROW
    dy1 = max(dy0, int(dark[-1]) + 1 - R.FOOT_ROW - R.BODY_PX["big"][1] // 5)
    dx0 = int(round(centre)) - R.SLOT_X["centre"]
    key, dy, dx, agreement = _best_template(obs, dy0, dx0, dy1)
    out = {"colour": colour, "pixels": total, "agreement": round(agreement, 3)}
    if key is None or agreement < _MIN_AGREEMENT:
        x = centre
        out.update(size=UNKNOWN, shape=UNKNOWN, pattern=UNKNOWN, accessory=UNKNOWN)
    else:
        size, shape, pattern, acc = key
        x = R.SLOT_X["centre"] + dx
        out.update(size=size, shape=shape, pattern=pattern, accessory=acc)
    out["x"] = round(float(x), 2)
    out["position"] = min(R.POSITIONS, key=lambda p: abs(R.SLOT_X[p] - x))
    return out


def read_image(img) -> Reading:
    """Decode one image (see the module docstring); never raises on a valid RGB image."""
    arr = to_array(img)
    scene, sky, ground = _read_scene(arr)
    if scene != UNKNOWN:
        sky, ground = _SCENE_SKY[_SCENE_NAMES.index(scene)], _SCENE_GROUND[_SCENE_NAMES.index(scene)]
    lab = _classify(arr, sky, ground)
    fg = (lab >= 0) & (lab <= _BLACK)
    chars = []
    for c0, c1 in _clusters(fg):
        ch = _read_character(lab, c0, c1)
        if ch is not None:
            chars.append(ch)
    return Reading(scene, chars)
