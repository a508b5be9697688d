"""What each frame of a Story-Iter round reads: the previous round's frames (``--refs``),
the story's character images, and the per-round reference weight and per-frame seed."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from ..run_folder import frame_path
from .plan import parse_refs

__all__ = ["select_refs", "solo_choice", "round_scales", "frame_seed", "round_refs",
           "load_char_images"]


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

    ``--refs solo:K`` reads, instead of whole scenes, K previous-round frames per character
    that show it alone (:func:`solo_choice`).

    Returns (images, prompts, per_frame, regions): ``regions`` is None when no frame of the
    story has a layout, else per frame one box (or None) per entry of its ``per_frame`` row:
    an entry that shows one character (its image, or a solo frame) gets the box where that
    character stands in the frame (a previous round's whole scene gets None)."""
    refs, prompts, per_frame, owners = _round_refs(story, r, out, n, spec, char_images,
                                                   char_owner, texts, round0_chars)
    if not refs or not any(f.regions for f in story.frames[:n]):
        return refs, prompts, per_frame, None
    if per_frame is None:
        per_frame = [list(range(len(refs)))] * n
    regions = [[story.frames[t].region(owners[j]) if owners[j] else None for j in row]
               for t, row in enumerate(per_frame)]
    return refs, prompts, per_frame, regions


def _round_refs(story, r: int, out: Path, n: int, spec: str, char_images: List,
                char_owner: List[str], texts: List[str], round0_chars: bool):
    from PIL import Image

    if r == 0:
        if not (round0_chars and char_images):
            return [], [], None, []
        per_frame = []
        for t in range(n):
            present = set(story.frames[t].characters)
            own = [j for j, name in enumerate(char_owner) if name in present]
            per_frame.append(own or list(range(len(char_owner))))
        return list(char_images), _char_prompts(story, char_owner), per_frame, list(char_owner)
    kind, k = parse_refs(spec)
    if kind == "solo":
        return _solo_refs(story, r, out, n, k, char_images, char_owner, texts)
    refs, prompts = [], []
    for i in range(n):
        with Image.open(frame_path(out, r - 1, i)) as im:
            refs.append(im.convert("RGB"))
        prompts.append(texts[i])
    refs += list(char_images)
    prompts += _char_prompts(story, char_owner)
    # a previous round's frame shows the whole scene: it has no owner and so no box
    owners = [None] * n + list(char_owner)
    if spec == "all":
        return refs, prompts, None, owners
    per_frame = []
    for t in range(n):
        sel = select_refs(story, t, spec, n)
        present = set(story.frames[t].characters)
        sel += [n + j for j, name in enumerate(char_owner) if name in present]
        per_frame.append(sel)
    return refs, prompts, per_frame, owners


def solo_choice(story, frames: List, n: int, k: int) -> Dict[str, List[int]]:
    """``--refs solo:K``: per character, the K frames (of ``frames``, the previous round's
    images) that show it alone and whose crop of its box is nearest the pixel-wise median of
    all those crops; ties go to the earlier frame.  The median is the round's consensus look
    of the character: a frame that drew it off-model is far from it and is not read, so the
    next round copies the majority rather than one frame's accident (which is how identity
    can keep converging over the rounds instead of locking onto round 0's first draw).
    A character never alone in a frame with a box gets no entry."""
    import numpy as np

    crops: Dict[str, List] = {}
    for t in range(n):
        f = story.frames[t]
        if len(f.characters) != 1 or f.region(f.characters[0]) is None:
            continue
        name = f.characters[0]
        w, h = frames[t].size
        x0, y0, x1, y1 = f.region(name)
        box = (int(x0 * w), int(y0 * h), max(int(x0 * w) + 1, round(x1 * w)),
               max(int(y0 * h) + 1, round(y1 * h)))
        crop = frames[t].crop(box).resize((16, 32))
        crops.setdefault(name, []).append((t, np.asarray(crop, np.float32)))
    chosen = {}
    for name, items in crops.items():
        median = np.median(np.stack([c for _, c in items]), axis=0)
        dist = [(float(((c - median) ** 2).mean()), t) for t, c in items]
        chosen[name] = sorted(t for _, t in sorted(dist)[:k])
    return chosen


def _solo_refs(story, r: int, out: Path, n: int, k: int, char_images: List,
               char_owner: List[str], texts: List[str]):
    """Round r >= 1 under ``--refs solo:K``: the previous round's frames that
    :func:`solo_choice` picks (only those are loaded, so the cache holds K per character),
    then the character images; a frame reads the entries of the characters it names."""
    from PIL import Image

    prev = []
    for i in range(n):
        with Image.open(frame_path(out, r - 1, i)) as im:
            prev.append(im.convert("RGB"))
    chosen = solo_choice(story, prev, n, k)
    used = sorted({t for ts in chosen.values() for t in ts})
    slot = {t: j for j, t in enumerate(used)}
    refs = [prev[t] for t in used] + list(char_images)
    prompts = [texts[t] for t in used] + _char_prompts(story, char_owner)
    per_frame = []
    for t in range(n):
        sel = []
        for name in story.frames[t].characters:
            sel += [slot[u] for u in chosen.get(name, [])]
            sel += [len(used) + j for j, owner in enumerate(char_owner) if owner == name]
        # a frame naming no character (or none with a reference) reads every entry
        per_frame.append(sel or list(range(len(refs))))
    owners = [story.frames[t].characters[0] for t in used] + list(char_owner)
    return refs, prompts, per_frame, owners


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
