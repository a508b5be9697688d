"""Consistency metrics of the story world (its ViStoryBench), computed with the exact reader.

For a story (a world story file: prompts in :mod:`pipelines.world.data`'s grammar, one
reference image per character) and one image per frame:

``identity_cross``      per appearance of a character (frame x character named in its prompt),
                        the share of its 4 identity attributes (shape, colour, pattern,
                        accessory) that equal those read from the character's reference image;
                        a character missing from its prompted slot scores 0.  Mean over
                        appearances.  ``identity_cross_all``: share with all 4 equal.
                        ``by_cast["solo" | "duo"]``: both (and the accessory's rate), over
                        the appearances in one- and in two-character frames.  ``attribute_rate[a]``: the same per
                        attribute.  Chance (random identities): ``CHANCE_IDENTITY_CROSS``
                        = 0.26.
``identity_self``       per character, over the frames it was found in, the share of the most
                        common value of each attribute (how much it agrees with itself, whatever
                        the reference says); mean over attributes, then characters.
``prompt_adherence``    per frame: scene right, character count right, each prompted character
                        present at its slot, its size right (like ViStoryBench's OCCM: what the
                        prompt controls).  Mean of all those checks.
``copy_paste``          among appearances whose prompt asks for another slot or scene than the
                        reference shows: the share where the frame shows the reference's scene
                        instead, or the character at the reference's slot and not at its own.

``score_frames(story, images)`` scores one set of frames; ``score_run(run_dir, story_file)``
every finished round of a ``python -m pipelines.story_iter`` output folder.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import render as R
from .data import PromptError, load_truth, parse_prompt
from .reader import UNKNOWN, read_image

__all__ = ["score_frames", "score_run", "reference_identities", "CHANCE_IDENTITY_CROSS",
           "format_scores"]

CHANCE_IDENTITY_CROSS = (1 / len(R.SHAPES) + 1 / len(R.COLOURS) + 1 / len(R.PATTERNS)
                         + 1 / len(R.ACCESSORIES)) / 4


def reference_identities(story, truth: Optional[dict] = None) -> Dict[str, Dict[str, Any]]:
    """name -> {"identity": {attr: value}, "scene", "position", "size"} of its reference.

    Read from the character's first reference image; for a character without one, taken from
    the world truth (``world.json`` next to the story) when there is one, else absent."""
    out = {}
    for c in story.characters:
        if c.reference_images:
            reading = read_image(c.reference_images[0])
            ch = reading.characters[0] if reading.characters else None
            out[c.name] = {
                "identity": {a: (ch[a] if ch else UNKNOWN) for a in R.ATTRIBUTES},
                "scene": reading.scene,
                "position": ch["position"] if ch else UNKNOWN,
                "size": ch["size"] if ch else UNKNOWN,
            }
        elif truth is not None and c.name in truth.get("characters", {}):
            t = truth["characters"][c.name]
            out[c.name] = {"identity": dict(t["identity"]), **t["reference"]}
    return out


def _mean(xs) -> Optional[float]:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else None


def score_frames(story, images: Sequence, refs: Optional[Dict[str, Dict[str, Any]]] = None,
                 frame_indices: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Score images (paths, PIL images or arrays) of the story's frames ``frame_indices``
    (default 0..len(images)-1).  Returns the metrics and a per-frame list."""
    if refs is None:
        refs = reference_identities(story, load_truth(story.source) if story.source else None)
    idx = list(frame_indices) if frame_indices is not None else list(range(len(images)))
    per_frame, appearances = [], []
    checks: Dict[str, List[float]] = {"scene": [], "count": [], "position": [], "size": []}
    seen_attrs: Dict[str, Dict[str, List[str]]] = {}
    copy_eligible = copy_hits = 0
    solo: List[Dict[str, bool]] = []          # appearances in one-character frames
    duo: List[Dict[str, bool]] = []           # ... and in two-character frames
    for i, img in zip(idx, images):
        try:
            scene, cast = parse_prompt(story.frames[i].prompt)
        except PromptError as exc:
            raise ValueError(f"frame {i}: not a world prompt ({exc})") from None
        reading = read_image(img)
        checks["scene"].append(float(reading.scene == scene))
        checks["count"].append(float(len(reading.characters) == len(cast)))
        rec = {"frame": i, "reading": reading.as_dict(), "characters": {}}
        for name, size, pos in cast:
            ch = reading.at(pos)
            checks["position"].append(float(ch is not None))
            checks["size"].append(float(ch is not None and ch["size"] == size))
            ref = refs.get(name)
            entry: Dict[str, Any] = {"found": ch is not None}
            if ch is not None:
                got = {a: ch[a] for a in R.ATTRIBUTES}
                entry["read"] = got
                for a, v in got.items():
                    seen_attrs.setdefault(name, {}).setdefault(a, []).append(v)
            if ref is not None:
                want = ref["identity"]
                match = {a: bool(ch is not None and ch[a] == want[a] and want[a] != UNKNOWN)
                         for a in R.ATTRIBUTES}
                entry["match"] = match
                appearances.append(match)
                (duo if len(cast) > 1 else solo).append(match)
                if pos != ref["position"] or scene != ref["scene"]:
                    copy_eligible += 1
                    copied_scene = scene != ref["scene"] and reading.scene == ref["scene"]
                    at_ref = reading.at(ref["position"])
                    copied_pos = (pos != ref["position"] and ch is None and at_ref is not None
                                  and at_ref["colour"] == want["colour"])
                    entry["copy_paste"] = bool(copied_scene or copied_pos)
                    copy_hits += entry["copy_paste"]
            rec["characters"][name] = entry
        per_frame.append(rec)

    selfs = []
    for name, attrs in seen_attrs.items():
        if len(next(iter(attrs.values()))) < 2:
            continue
        selfs.append(_mean(Counter(v).most_common(1)[0][1] / len(v) for v in attrs.values()))
    all_checks = [x for v in checks.values() for x in v]
    return {
        "frames": len(per_frame),
        "identity_cross": _mean(_mean(m.values()) for m in appearances),
        "identity_cross_all": _mean(float(all(m.values())) for m in appearances),
        "by_cast": {k: {"identity_cross": _mean(_mean(m.values()) for m in v),
                        "identity_cross_all": _mean(float(all(m.values())) for m in v),
                        "accessory": _mean(float(m["accessory"]) for m in v),
                        "appearances": len(v)} for k, v in (("solo", solo), ("duo", duo))},
        "attribute_rate": {a: _mean(float(m[a]) for m in appearances) for a in R.ATTRIBUTES},
        "identity_self": _mean(selfs),
        "prompt_adherence": _mean(all_checks),
        "adherence": {k: _mean(v) for k, v in checks.items()},
        "copy_paste": (copy_hits / copy_eligible) if copy_eligible else None,
        "appearances": len(appearances),
        "per_frame": per_frame,
    }


def score_run(run_dir, story_file=None, keep_frames: bool = False) -> Dict[str, Any]:
    """Metrics per finished round of a ``python -m pipelines.story_iter`` output folder.

    ``story_file``: the run's story (default: the story file the manifest names); its
    fingerprint must match the manifest's, so frames are never scored against another story."""
    from pipelines.story import load_story
    from pipelines.run_folder import frame_path

    run_dir = Path(run_dir)
    man_path = run_dir / "manifest.json"
    if not man_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no manifest.json (not a story_iter output folder)")
    manifest = json.loads(man_path.read_text())
    cfg = manifest.get("config", {})
    story_file = story_file or manifest.get("story", {}).get("source")
    if story_file is None or not Path(story_file).is_file():
        raise ValueError(f"{run_dir}: the manifest names no story file on disk "
                         f"({story_file!r}); pass story_file")
    story = load_story(story_file).truncated(cfg.get("frames"))
    want = cfg.get("story_fingerprint")
    if want is not None and story.fingerprint() != want:
        raise ValueError(f"{story_file} is not the story {run_dir} was drawn from "
                         f"(fingerprint differs)")
    refs = reference_identities(story, load_truth(story_file))
    n = len(story.frames)
    rounds = {}
    for r in range(int(cfg.get("rounds", 0)) + 1):
        paths = [frame_path(run_dir, r, i) for i in range(n)]
        if not all(p.is_file() for p in paths):
            break
        s = score_frames(story, paths, refs)
        if not keep_frames:
            s.pop("per_frame")
        rounds[r] = s
    return {"run": str(run_dir), "story": str(story_file), "rounds": rounds}


HEADLINE = ("identity_cross", "identity_cross_all", "identity_self", "prompt_adherence",
            "copy_paste")


def round_metrics(run_dir, manifest: Optional[Dict[str, Any]] = None
                  ) -> Optional[Dict[int, Dict[str, Any]]]:
    """The headline metrics per finished round of a story_iter run drawn from a story-world
    story, or None when the run is not one (its prompts are not in the world's grammar, or
    its story file is not on disk).  The contact sheet and the studio show these."""

    if manifest is None:
        manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    prompts = manifest.get("prompts") or [""]
    try:
        parse_prompt(prompts[0])
        rounds = score_run(run_dir)["rounds"]
    except (PromptError, ValueError, OSError, KeyError):
        return None
    return {r: {k: s[k] for k in HEADLINE} for r, s in rounds.items()} or None


def format_scores(s: Dict[str, Any]) -> str:
    """One line: the headline numbers of a ``score_frames`` result."""
    def f(x):
        return "n/a" if x is None else f"{x:.3f}"
    return (f"identity-cross {f(s['identity_cross'])} (all-4 {f(s['identity_cross_all'])}), "
            f"identity-self {f(s['identity_self'])}, adherence {f(s['prompt_adherence'])}, "
            f"copy-paste {f(s['copy_paste'])}")
