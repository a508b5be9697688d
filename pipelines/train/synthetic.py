"""Synthetic training data for ``python -m pipelines.train`` without ``--data``.

Story groups are "characters" (a shape of a fixed colour) drawn on varying
scenes; captions use words the tiny model's tokenizers know.  DPO data pairs a
consistent winner (the group's character) with an inconsistent loser (the same
scene, the character in the wrong colour), in both accepted formats (single
pairs and winner/loser pools).  Everything is seeded: the same call writes the
same files.  Generation is skipped when a folder already holds a complete set
(``.complete`` marker), so several processes can call it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

CHARACTERS = [
    # name, caption words, colour, shape
    ("fox", "a red fox", (214, 88, 40), "circle"),
    ("snowman", "a white snowman", (240, 240, 245), "stack"),
    ("bird", "a blue bird", (50, 90, 220), "triangle"),
]
SCENES = [
    ("in the forest", (40, 110, 50)),
    ("in the snow at night", (30, 35, 70)),
    ("near the river", (70, 140, 190)),
    ("in the village", (150, 120, 90)),
    ("on the hill at sunset", (230, 150, 80)),
]
_MARKER = ".complete"


def _draw(size: int, character, scene, rng: np.random.Generator, colour=None):
    from PIL import Image, ImageDraw

    _, _, col, shape = character
    col = colour or col
    bg = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in scene[1])
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    # ground line and a couple of scene blobs so images of a group differ
    gy = int(size * rng.uniform(0.65, 0.8))
    d.rectangle([0, gy, size, size], fill=tuple(max(0, c - 40) for c in bg))
    for _ in range(2):
        x, y = rng.integers(0, size, 2)
        r = int(size * rng.uniform(0.04, 0.1))
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(min(255, c + 50) for c in bg))
    r = int(size * rng.uniform(0.14, 0.2))
    cx = int(rng.uniform(0.3, 0.7) * size)
    cy = gy - r
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        d.polygon([(cx - r, cy - r // 2), (cx - r // 2, cy - r - r // 2), (cx, cy - r)], fill=col)
    elif shape == "stack":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        r2 = int(r * 0.65)
        d.ellipse([cx - r2, cy - r - 2 * r2 + 2, cx + r2, cy - r + 2], fill=col)
        d.polygon([(cx, cy - r - r2), (cx + r2, cy - r - r2 + 2), (cx, cy - r - r2 + 4)],
                  fill=(240, 120, 20))
    else:
        d.polygon([(cx - r, cy + r), (cx + r, cy + r), (cx, cy - r)], fill=col)
    return im


def _atomic_dir(root: Path, build) -> Path:
    root = Path(root)
    if (root / _MARKER).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        build(tmp)
        (tmp / _MARKER).write_text("ok\n")
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def make_story_groups(root, size: int = 64, per_group: int = 4, seed: int = 0) -> Path:
    """Write ``root/<character>/NN.png`` + ``root/metadata.jsonl``; return ``root``."""

    def build(tmp: Path):
        rng = np.random.default_rng([seed, 17])
        lines = []
        for ch in CHARACTERS:
            (tmp / ch[0]).mkdir()
            for i in range(per_group):
                scene = SCENES[(i + len(lines)) % len(SCENES)]
                name = f"{ch[0]}/{i:02d}.png"
                _draw(size, ch, scene, rng).save(tmp / name)
                lines.append({"file_name": name, "text": f"{ch[1]} {scene[0]}", "group": ch[0]})
        with open(tmp / "metadata.jsonl", "w") as f:
            for rec in lines:
                f.write(json.dumps(rec) + "\n")

    return _atomic_dir(Path(root), build)


def make_dpo_pairs(root, size: int = 64, seed: int = 0) -> Path:
    """Write ``root/pairs.jsonl`` and its images; return the path of ``pairs.jsonl``.

    Character 0 uses the single-pair format, the others the pool format.
    """

    def build(tmp: Path):
        rng = np.random.default_rng([seed, 23])
        lines = []
        for ci, ch in enumerate(CHARACTERS):
            d = tmp / ch[0]
            d.mkdir()
            wrong = CHARACTERS[(ci + 1) % len(CHARACTERS)][2]
            refs = []
            for i in range(2):
                n = f"{ch[0]}/ref{i}.png"
                _draw(size, ch, SCENES[i], rng).save(tmp / n)
                refs.append(n)
            scene = SCENES[2 + ci % 3]
            prompt = f"{ch[1]} {scene[0]}"
            wins, loses = [], []
            for i in range(2):
                w, l = f"{ch[0]}/win{i}.png", f"{ch[0]}/lose{i}.png"
                _draw(size, ch, scene, rng).save(tmp / w)
                _draw(size, ch, scene, rng, colour=wrong).save(tmp / l)
                wins.append(w)
                loses.append(l)
            if ci == 0:
                for w, l in zip(wins, loses):
                    lines.append({"prompt": prompt, "references": refs, "winner": w, "loser": l})
            else:
                lines.append({"scenario": ch[0], "prompt": prompt, "references": refs,
                              "winners": wins, "losers": loses})
        with open(tmp / "pairs.jsonl", "w") as f:
            for rec in lines:
                f.write(json.dumps(rec) + "\n")

    return _atomic_dir(Path(root), build) / "pairs.jsonl"
