"""What each frame of a Story-Iter round reads: the previous round's frames (``--refs``),
the story's character images, and the per-round reference weight and per-frame seed."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from ..run_folder import frame_path
from .plan import parse_refs

__all__ = ["select_refs", "round_scales", "frame_seed", "round_refs", "load_char_images"]


def select_refs(story, target: int, spec: str, n_frames: Optional[int] = None) -> List[int]:
    """Frames of the previous round that ``target`` reads (its own frame included).

    ``all``: every frame.  ``topk:K``: the K frames sharing the most characters with the
    target; ties go to the nearer frame, then the earlier one.  ``window:W``: the W frames
    nearest in the story (earlier first on ties)."""
    n = len(story.frames) if n_frames is None else n_frames
    kind, k = parse_refs(spec)
    if kind == "all":
        return list(range(n))
    if kind == "window":
        order = sorted(range(n), key=lambda i: (abs(i - target), i))
        return sorted(order[:k])
    mine = set(story.frames[target].characters)
    order = sorted(range(n), key=lambda i: (-len(mine & set(story.frames[i].characters)),
                                            abs(i - target), i))
    return sorted(order[:k])


def round_scales(a: float, b: float, rounds: int) -> List[float]:
    """Reference weight per round 0..R: round 0 has none; rounds 1..R linspace(a, b, R)."""
    if rounds <= 0:
        return [0.0]
    if rounds == 1:
        return [0.0, float(a)]
    return [0.0] + [a + (b - a) * i / (rounds - 1) for i in range(rounds)]


def frame_seed(cfg: Dict[str, Any], i: int) -> int:
    return cfg["seed"] + i if cfg["seed_per_frame"] else cfg["seed"]


def round_refs(story, r: int, out: Path, n: int, spec: str, char_images: List,
                char_owner: List[str], texts: List[str], round0_chars: bool = False):
    """References of round r: the N frames of round r-1 (read back from disk, so a resumed
    run sees exactly the same pixels) followed by the story's character images; their
    prompts (``texts``: the frames'); and per frame the entries it reads (None = all).
    Round 0 has none, or with ``round0_chars`` (--round0-refs characters) the character
    images: each frame reads those of the characters it names (a frame naming none reads them
    all): a frame reading every character would show a lone character the others' looks too,
    which GSA blends, while stage gsa trains each target on references of its own character.

    Returns (images, prompts, per_frame, regions): ``regions`` is None when no frame of the
    story has a layout, else per frame one box (or None) per entry of its ``per_frame`` row:
    a character image gets the box where its character stands in that frame (a previous
    round's frame, which shows the whole scene, gets None)."""
    refs, prompts, per_frame = _round_refs(story, r, out, n, spec, char_images, char_owner,
                                           texts, round0_chars)
    if not refs or not any(f.regions for f in story.frames[:n]):
        return refs, prompts, per_frame, None
    if per_frame is None:
        per_frame = [list(range(len(refs)))] * n
    first_char = len(refs) - len(char_owner)       # character images come last
    regions = [[story.frames[t].region(char_owner[j - first_char]) if j >= first_char else None
                for j in row] for t, row in enumerate(per_frame)]
    return refs, prompts, per_frame, regions


def _round_refs(story, r: int, out: Path, n: int, spec: str, char_images: List,
                char_owner: List[str], texts: List[str], round0_chars: bool):
    from PIL import Image

    if r == 0:
        if not (round0_chars and char_images):
            return [], [], None
        per_frame = []
        for t in range(n):
            present = set(story.frames[t].characters)
            own = [j for j, name in enumerate(char_owner) if name in present]
            per_frame.append(own or list(range(len(char_owner))))
        return list(char_images), _char_prompts(story, char_owner), per_frame
    refs, prompts = [], []
    for i in range(n):
        with Image.open(frame_path(out, r - 1, i)) as im:
            refs.append(im.convert("RGB"))
        prompts.append(texts[i])
    refs += list(char_images)
    prompts += _char_prompts(story, char_owner)
    if spec == "all":
        return refs, prompts, None
    per_frame = []
    for t in range(n):
        sel = select_refs(story, t, spec, n)
        present = set(story.frames[t].characters)
        sel += [n + j for j, name in enumerate(char_owner) if name in present]
        per_frame.append(sel)
    return refs, prompts, per_frame


def _char_prompts(story, char_owner: List[str]) -> List[str]:
    return [f"{name}, {story.character(name).description}, {story.style}".strip(", ")
            for name in char_owner]


def load_char_images(story):
    from PIL import Image

    imgs, owner = [], []
    for c in story.characters:
        for p in c.reference_images:
            with Image.open(p) as im:
                imgs.append(im.convert("RGB"))
            owner.append(c.name)
    return imgs, owner
