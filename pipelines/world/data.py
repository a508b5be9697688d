"""The story world's prompts, stories and training data, all seeded.

Prompt grammar (what a frame's prompt controls; identity is never in it)::

    "Pip big on the left and Moss small on the right, snow"
     <name> <small|big> on the <left|centre|right> [and ...], <day|night|snow|forest|sunset>

``frame_prompt`` writes it and ``parse_prompt`` reads it back.  Generators:

* ``make_story(out, seed)``: a story file in the format of :mod:`pipelines.story` (characters
  with a name, an empty description and one reference image each; 100 frames, each with one or
  two of them), plus ``world.json``: the truth (identities, every frame's placements) that the
  renderer draws from, for tests and for ground-truth frames.
* ``make_gsa_groups(out, ...)``: stage gsa data (``metadata.jsonl``, story groups of one or
  two characters: the same identities at varying places, sizes and scenes).
* ``make_base_frames(n, seed)``: (image, prompt) pairs with random identities, for the
  text-to-image base model (the SDXL base also sees captions that say a character's look).
* ``write_dpo_pairs(out, scenarios)``: stage dpo scenario pools (``pairs.jsonl``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import render as R

__all__ = ["NAMES", "frame_prompt", "parse_prompt", "PromptError", "random_identities",
           "random_frame", "make_story", "load_truth", "make_gsa_groups", "make_base_frames",
           "write_dpo_pairs", "render_truth_frame", "split_identities", "make_cast_groups",
           "describe", "DESCRIPTION_WORDS"]

# names that say nothing of a look
NAMES = ("Pip", "Moss", "Bo", "Kit", "Tam", "Fen", "Rue", "Jax", "Lu", "Nim", "Ivo", "Wren",
         "Dot", "Pim", "Zed", "Ash")
TRUTH_FILE = "world.json"

_CLAUSE = re.compile(r"^\s*([A-Za-z]+) (small|big) on the (left|centre|right)\s*$")


class PromptError(ValueError):
    pass


def frame_prompt(scene: str, cast: Sequence[Tuple[str, str, str]]) -> str:
    """``cast``: (name, size, position) per character, left to right."""
    clauses = [f"{n} {s} on the {p}" for n, s, p in cast]
    return " and ".join(clauses) + f", {scene}"


def parse_prompt(prompt: str) -> Tuple[str, List[Tuple[str, str, str]]]:
    """Inverse of :func:`frame_prompt`: (scene, [(name, size, position), ...])."""
    head, sep, scene = prompt.rpartition(",")
    scene = scene.strip()
    if not sep or scene not in R.SCENES:
        raise PromptError(f"{prompt!r}: does not end in ', <scene>' ({', '.join(R.SCENES)})")
    cast = []
    for clause in head.split(" and "):
        m = _CLAUSE.match(clause)
        if not m:
            raise PromptError(f"{prompt!r}: clause {clause!r} is not '<name> <small|big> on the "
                              f"<left|centre|right>'")
        cast.append((m.group(1), m.group(2), m.group(3)))
    if len(cast) > 2 or (len(cast) == 2 and [p for _, _, p in cast] != list(R.DUO_POSITIONS)):
        raise PromptError(f"{prompt!r}: two characters stand on the left and on the right, in "
                          f"that order (at most two per frame)")
    return scene, cast


def split_identities(seed: int = 0, holdout: int = 48) -> Tuple[List[R.Identity], List[R.Identity]]:
    """(train, held-out) identities: evaluation stories use identities no training group had."""
    ids = R.all_identities()
    order = np.random.default_rng([seed, 7]).permutation(len(ids))
    held = [ids[i] for i in order[:holdout]]
    train = [ids[i] for i in order[holdout:]]
    return train, held


def random_identities(rng: np.random.Generator, k: int,
                      pool: Optional[Sequence[R.Identity]] = None) -> List[R.Identity]:
    pool = list(pool) if pool is not None else R.all_identities()
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]


def random_frame(rng: np.random.Generator, n_chars: int) -> Tuple[str, List[Tuple[str, str]]]:
    """A scene and n_chars (size, position) pairs, left to right: a lone character in any
    slot, two on the left and the right (``R.DUO_POSITIONS``)."""
    if n_chars not in (1, 2):
        raise ValueError(f"a world frame holds 1 or 2 characters, got {n_chars}")
    scene = list(R.SCENES)[rng.integers(len(R.SCENES))]
    slots = R.POSITIONS if n_chars == 1 else R.DUO_POSITIONS
    pos = sorted(rng.choice(len(slots), size=n_chars, replace=False))
    return scene, [(R.SIZES[rng.integers(2)], slots[p]) for p in pos]


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    R.to_pil(img).save(path)


# ---- stories ------------------------------------------------------------------------------


def make_story(out, seed: int = 0, frames: int = 100, n_chars: int = 2, duo_share: float = 0.3,
               pool: Optional[Sequence[R.Identity]] = None, title: Optional[str] = None,
               layout: bool = True) -> Path:
    """Write ``out/story.json``, ``out/refs/<name>.png`` and ``out/world.json``; return the
    story file.  Each character's reference is a lone big frame of it in the centre.  With
    ``layout`` every frame carries its ``regions`` (where each character stands, as its prompt
    says: :func:`pipelines.world.render.character_box`); the rest of the file, and so every
    frame's prompt, truth and seed, is the same either way."""
    out = Path(out)
    rng = np.random.default_rng([seed, 11])
    idents = random_identities(rng, n_chars, pool)
    names = [NAMES[i] for i in rng.choice(len(NAMES), size=n_chars, replace=False)]
    chars, truth_chars = [], {}
    for name, ident in zip(names, idents):
        scene = list(R.SCENES)[rng.integers(len(R.SCENES))]
        ref = f"refs/{name.lower()}.png"
        _save(R.render_frame(scene, [R.Placement(ident, "centre", "big")]), out / ref)
        chars.append({"name": name, "description": "", "reference_images": [ref]})
        truth_chars[name] = {"identity": ident.as_dict(), "reference": {"scene": scene,
                                                                       "position": "centre",
                                                                       "size": "big"}}
    story_frames, truth_frames = [], []
    for _ in range(frames):
        k = 2 if (n_chars > 1 and rng.random() < duo_share) else 1
        who = sorted(rng.choice(n_chars, size=k, replace=False))
        scene, places = random_frame(rng, k)
        order = list(rng.permutation(who))        # who stands where is random
        cast = [(names[c], s, p) for c, (s, p) in zip(order, places)]
        frame = {"prompt": frame_prompt(scene, cast), "characters": [n for n, _, _ in cast]}
        if layout:
            frame["regions"] = {n: list(R.character_box(p, s)) for n, s, p in cast}
        story_frames.append(frame)
        truth_frames.append({"scene": scene, "cast": [list(c) for c in cast]})
    story = {"title": title or f"World story {seed}", "style": "", "characters": chars,
             "frames": story_frames}
    out.mkdir(parents=True, exist_ok=True)
    (out / "story.json").write_text(json.dumps(story, indent=1) + "\n")
    (out / TRUTH_FILE).write_text(json.dumps({"seed": seed, "characters": truth_chars,
                                              "frames": truth_frames}, indent=1) + "\n")
    return out / "story.json"


def load_truth(story_file) -> Optional[dict]:
    p = Path(story_file).parent / TRUTH_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def render_truth_frame(truth: dict, i: int, identities: Optional[Dict[str, R.Identity]] = None
                       ) -> np.ndarray:
    """Frame i as the renderer draws it from the truth (``identities`` overrides who is who)."""
    fr = truth["frames"][i]
    ids = identities or {n: R.Identity(**c["identity"]) for n, c in truth["characters"].items()}
    return R.render_frame(fr["scene"], [R.Placement(ids[n], p, s) for n, s, p in fr["cast"]])


# ---- training data ------------------------------------------------------------------------


def make_gsa_groups(out, n_groups: int = 160, per_group: int = 6, seed: int = 0,
                    pool: Optional[Sequence[R.Identity]] = None, pair_share: float = 0.0,
                    duo_share: float = 0.4) -> Path:
    """Stage gsa data: ``n_groups`` story groups of ``per_group`` frames each.

    A share ``1 - pair_share`` of the groups follow one character (lone frames of it); the
    others follow two (each frame shows one of them alone, or with probability ``duo_share``
    both).  Pair groups were meant to teach binding (take each character's look from the
    reference whose prompt names it, not a blend of all references), since a model trained
    on lone characters blends two references in a two-character frame.  Measured on CPU
    (held-out story seed 500, 64 frames): ``pair_share=0.5`` with 2 references per target,
    2250 steps, identity-cross 0.28 -- worse than lone groups (0.43 after 1500 steps): the
    trainer draws references at random from the group, so they often show only the other
    character, and the model learns to distrust them.  Pair groups whose every frame shows
    both (``pair_share=1/3, duo_share=1.0``, 1 reference, 1500 steps), so that every
    reference holds the target's character, gave 0.31: still worse, alone and in duos.  The
    build keeps lone groups (0.0)."""
    out = Path(out)
    rng = np.random.default_rng([seed, 13])
    pool = list(pool) if pool is not None else R.all_identities()
    lines = []
    for g in range(n_groups):
        # lone groups draw from rng exactly as before pair groups existed, so a build's data
        # (and the committed stage-1 LoRA trained on it) stays reproducible from its seed
        k = 2 if pair_share > 0 and rng.random() < pair_share else 1
        if k == 1:
            idents = [pool[g % len(pool)] if n_groups <= len(pool)
                      else pool[rng.integers(len(pool))]]
            names = [NAMES[rng.integers(len(NAMES))]]
        else:
            idents = random_identities(rng, k, pool)
            names = [NAMES[i] for i in rng.choice(len(NAMES), size=k, replace=False)]
        for j in range(per_group):
            if k == 2 and rng.random() < duo_share:
                who = list(rng.permutation(2))
            else:
                # pair groups alternate who is alone, so both are seen in every group
                who = [j % k] if k == 2 else [0]
            scene, places = random_frame(rng, len(who))
            rel = f"g{g:04d}/{j:02d}.png"
            _save(R.render_frame(scene, [R.Placement(idents[c], pos, size)
                                         for c, (size, pos) in zip(who, places)]), out / rel)
            lines.append({"file_name": rel, "group": f"g{g:04d}",
                          "text": frame_prompt(scene, [(names[c], size, pos)
                                                       for c, (size, pos) in zip(who, places)])})
    (out / "metadata.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return out


def make_cast_groups(out, n_groups: int = 240, per_group: int = 6, seed: int = 0,
                     pool: Optional[Sequence[R.Identity]] = None, duo_share: float = 0.4,
                     layout: bool = False, posed: bool = False) -> Path:
    """Stage gsa data in which every frame names its references (the trainer's
    ``"references"`` field): a group follows two characters, each with a reference frame
    (lone, big, in the centre, on a random scene: what a story's reference image is); each of
    the ``per_group`` frames shows one of them alone or, with probability ``duo_share``, both
    (left and right in random order), and reads *both* references.  A lone frame must then
    take its look from the reference whose caption names its character and ignore the other,
    and a two-character frame must give each slot its own character's look: the binding that
    lone-character groups never teach (a stage 1 trained on those blends both references in a
    two-character frame).  Train with ``--num-refs 2``.

    Measured (world of big characters, the cpu-profile base of 6000 x 32, held-out story 300,
    100 frames, 10 steps): lone groups, 1500 steps: identity-cross 0.77 alone, 0.19 in duos;
    these cast groups, 600 steps: 0.23 / 0.20 (nothing learned); lone and cast groups mixed,
    2 references each, 900 steps: 0.24 / 0.24.  Binding by name is not learned in a few
    hundred steps, and the references stop being read at all.

    ``layout=True`` gives each frame a layout instead (the trainer's ``"regions"``): a frame
    reads the references of the characters it shows, each with the box where that character
    stands (:func:`pipelines.world.render.character_box`), so binding is by place, as at
    inference with a layout (a story frame's ``regions``); a lone frame reads its one
    reference.  Train with ``--num-refs 2``.

    ``posed=True`` (with ``layout``) adds what Story-Iter's later rounds give a frame: per
    character a "posed" reference, the character alone at a random slot and size on a random
    scene (what a previous round's solo frame looks like), and each character of a frame
    reads its clean reference, its posed one, or both (a third each), inside its box.  A
    model trained on clean centred references only copies a posed reference's size and
    slot.  Train with ``--num-refs 4``."""
    out = Path(out)
    rng = np.random.default_rng([seed, 19])
    pool = list(pool) if pool is not None else R.all_identities()
    lines = []
    for g in range(n_groups):
        idents = random_identities(rng, 2, pool)
        names = [NAMES[i] for i in rng.choice(len(NAMES), size=2, replace=False)]
        refs = []
        for c in range(2):
            scene = list(R.SCENES)[rng.integers(len(R.SCENES))]
            rel = f"g{g:04d}/ref_{c}.png"
            _save(R.render_frame(scene, [R.Placement(idents[c], "centre", "big")]), out / rel)
            lines.append({"file_name": rel, "group": f"g{g:04d}",
                          "text": frame_prompt(scene, [(names[c], "big", "centre")])})
            refs.append(rel)
            if layout:
                # a reference is a training target too: it reads a second reference image
                # of its own character (never the other one, which would teach it to
                # distrust references), and that one reads it back
                scene2 = list(R.SCENES)[rng.integers(len(R.SCENES))]
                rel2 = f"g{g:04d}/ref_{c}b.png"
                _save(R.render_frame(scene2, [R.Placement(idents[c], "centre", "big")]),
                      out / rel2)
                lines[-1].update(references=[rel2], regions=[None])
                lines.append({"file_name": rel2, "group": f"g{g:04d}", "references": [rel],
                              "regions": [None],
                              "text": frame_prompt(scene2, [(names[c], "big", "centre")])})
        posed_refs = []
        if layout and posed:
            for c in range(2):
                scene3, [(size3, pos3)] = random_frame(rng, 1)
                rel3 = f"g{g:04d}/pose_{c}.png"
                _save(R.render_frame(scene3, [R.Placement(idents[c], pos3, size3)]), out / rel3)
                # a posed reference is a lone target too, reading its clean reference
                lines.append({"file_name": rel3, "group": f"g{g:04d}", "references": [refs[c]],
                              "regions": [list(R.character_box(pos3, size3))],
                              "text": frame_prompt(scene3, [(names[c], size3, pos3)])})
                posed_refs.append(rel3)
        for j in range(per_group):
            who = list(rng.permutation(2)) if rng.random() < duo_share else [j % 2]
            scene, places = random_frame(rng, len(who))
            rel = f"g{g:04d}/{j:02d}.png"
            _save(R.render_frame(scene, [R.Placement(idents[c], pos, size)
                                         for c, (size, pos) in zip(who, places)]), out / rel)
            line = {"file_name": rel, "group": f"g{g:04d}", "references": refs,
                    "text": frame_prompt(scene, [(names[c], size, pos)
                                                 for c, (size, pos) in zip(who, places)])}
            if layout:
                line["references"], line["regions"] = [], []
                for c, (size, pos) in zip(who, places):
                    mine = [refs[c]]
                    if posed_refs:
                        mine = [[refs[c]], [posed_refs[c]],
                                [refs[c], posed_refs[c]]][rng.integers(3)]
                    line["references"] += mine
                    line["regions"] += [list(R.character_box(pos, size))] * len(mine)
            lines.append(line)
    (out / "metadata.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return out


def describe(identity: R.Identity) -> str:
    """A character's look in words, e.g. "red striped circle with hat" (only the SDXL base's
    described captions use it; story prompts never carry a look)."""
    pattern = {"solid": "", "stripe": "striped ", "belt": "belted "}[identity.pattern]
    extra = "" if identity.accessory == "none" else f" with {identity.accessory}"
    return f"{identity.colour} {pattern}{identity.shape}{extra}"


# the words of describe(): a tokenizer that should read looks as whole words needs them
DESCRIPTION_WORDS = (list(R.SHAPES) + list(R.COLOURS) + ["striped", "belted", "with"]
                     + [a for a in R.ACCESSORIES if a != "none"])


def make_base_frames(n: int, seed: int = 0, duo_share: float = 0.3,
                     pool: Optional[Sequence[R.Identity]] = None, described_share: float = 0.0):
    """n (uint8 image, prompt) pairs with random identities and random names; in a share
    ``described_share`` of them each character is named by its look (:func:`describe`)
    instead, so the model also learns to draw a look it is told (what a real text-to-image
    base knows, and what an IP-Adapter on a frozen base builds on)."""
    rng = np.random.default_rng([seed, 17])
    # a stream of its own, so described_share=0 leaves every earlier frame as it was
    rng_said = np.random.default_rng([seed, 19])
    pool = list(pool) if pool is not None else R.all_identities()
    out = []
    for _ in range(n):
        k = 2 if rng.random() < duo_share else 1
        scene, places = random_frame(rng, k)
        names = [NAMES[i] for i in rng.choice(len(NAMES), size=k, replace=False)]
        ids = random_identities(rng, k, pool)
        if described_share > 0 and rng_said.random() < described_share:
            names = [describe(i) for i in ids]
        img = R.render_frame(scene, [R.Placement(i, p, s) for i, (s, p) in zip(ids, places)])
        out.append((img, frame_prompt(scene, [(nm, s, p) for nm, (s, p) in zip(names, places)])))
    return out


def write_dpo_pairs(out, scenarios: Sequence[dict]) -> Path:
    """``scenarios``: dicts with prompt, references, winners, losers (paths relative to
    ``out``); writes ``out/pairs.jsonl`` in the scenario-pool format the trainer expands."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"scenario": s.get("scenario", str(i)), "prompt": s["prompt"],
                         "references": list(s["references"]), "winners": list(s["winners"]),
                         "losers": list(s["losers"])}) for i, s in enumerate(scenarios)]
    (out / "pairs.jsonl").write_text("".join(l + "\n" for l in lines))
    return out / "pairs.jsonl"


def strip_references(story_file, name: str = "story_norefs.json") -> Path:
    """A copy of a world story without reference images (next to it, so ``world.json`` still
    gives the metrics the truth)."""
    story_file = Path(story_file)
    obj = json.loads(story_file.read_text())
    for c in obj["characters"]:
        c.pop("reference_images", None)
    out = story_file.parent / name
    out.write_text(json.dumps(obj, indent=1) + "\n")
    return out
