"""World scenarios for the preference loop: ``python -m pipelines.world scenarios OUT``.

Writes a scenarios file in the format ``python -m pipelines.candidates`` reads
(docs/candidates.md) and, next to it, the truth a labeller may check against::

    OUT/scenarios.json   {"scenarios": [{"id": "s000", "prompt": "Kit small on the left, snow",
                                         "references": ["refs/s000_kit.png"],
                                         "characters": ["Kit"],
                                         "reference_prompts": ["Kit big on the centre, night"]}]}
    OUT/refs/*.png       one reference per character: a lone big frame of it in the centre, on
                         a random scene
    OUT/truth.json       {"format": "storyattn.world_scenarios/1", "seed": S, "scenarios":
                         {"s000": {"identities": {"Kit": {shape, colour, pattern, accessory}},
                                   "scene": "snow", "cast": [["Kit", "small", "left"]]}}}

One character per scenario by default.  ``duo_share`` makes that share of them show two
characters (two training identities, one reference each, the prompt naming both at the left
and the right), and ``layout`` gives every scenario ``regions``: each reference is read
inside its character's box (:func:`pipelines.world.render.character_box`), as the evaluation
stories' frames are.  The labeller reads each character at its slot (``world_build.label``).
Identities come from the training split (``data.split_identities``): the evaluation stories
of ``bench_quality.py`` use the held-out ones, so a preference pool never shows them.  A
reference is recorded with its own world caption (``reference_prompts``), as stage gsa
trained every group member with its own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import numpy as np

from . import data as D
from . import render as R

__all__ = ["make_scenarios", "load_truth", "TRUTH_NAME", "SCENARIOS_NAME", "TRUTH_FORMAT"]

SCENARIOS_NAME = "scenarios.json"
TRUTH_NAME = "truth.json"
TRUTH_FORMAT = "storyattn.world_scenarios/1"


def make_scenarios(out, n: int = 24, seed: int = 0, split_seed: int = 0,
                   duo_share: float = 0.0, layout: bool = False) -> Path:
    """Write ``n`` scenarios under ``out``; return the scenarios file.  ``split_seed`` picks
    the train/held-out split (the build's seed); ``duo_share`` and ``layout``: the module
    docstring (the defaults write what they always did: lone characters, no regions)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= duo_share <= 1.0:
        raise ValueError(f"duo_share must be in [0, 1], got {duo_share}")
    out = Path(out)
    (out / "refs").mkdir(parents=True, exist_ok=True)
    train, _ = D.split_identities(split_seed)
    rng = np.random.default_rng([seed, 23])
    scen, truth = [], {}
    for k in range(n):
        sid = f"s{k:03d}"
        # a lone scenario draws exactly what it always did (same seed, same files)
        if duo_share > 0 and rng.random() < duo_share:
            idents = [train[i] for i in rng.choice(len(train), size=2, replace=False)]
            names = [D.NAMES[i] for i in rng.choice(len(D.NAMES), size=2, replace=False)]
        else:
            idents, names = [train[rng.integers(len(train))]], [D.NAMES[rng.integers(len(D.NAMES))]]
        refs, ref_prompts = [], []
        for ident, name in zip(idents, names):
            ref_scene = list(R.SCENES)[rng.integers(len(R.SCENES))]
            ref = f"refs/{sid}_{name.lower()}.png"
            R.to_pil(R.render_frame(ref_scene, [R.Placement(ident, "centre", "big")])).save(out / ref)
            refs.append(ref)
            ref_prompts.append(D.frame_prompt(ref_scene, [(name, "big", "centre")]))
        scene, places = D.random_frame(rng, len(names))
        # places run left to right; who stands where follows the names' (random) order
        cast = [(name, *place) for name, place in zip(names, places)]
        entry = {"id": sid, "prompt": D.frame_prompt(scene, cast), "references": refs,
                 "characters": names, "reference_prompts": ref_prompts}
        if layout:
            entry["regions"] = [list(R.character_box(pos, size)) for _, size, pos in cast]
        scen.append(entry)
        truth[sid] = {"identities": {nm: i.as_dict() for nm, i in zip(names, idents)},
                      "scene": scene, "cast": [list(c) for c in cast]}
    (out / TRUTH_NAME).write_text(json.dumps({"format": TRUTH_FORMAT, "seed": seed,
                                              "split_seed": split_seed, "scenarios": truth},
                                             indent=1) + "\n")
    path = out / SCENARIOS_NAME
    path.write_text(json.dumps({"scenarios": scen}, indent=1) + "\n")
    return path


def load_truth(path) -> Dict[str, dict]:
    """{scenario id: {"identities": {name: Identity}, "scene", "cast"}} from ``truth.json``
    (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / TRUTH_NAME
    obj = json.loads(path.read_text())
    if obj.get("format") != TRUTH_FORMAT:
        raise ValueError(f"{path} is not a world scenarios truth file ({TRUTH_FORMAT})")
    return {sid: {**t, "identities": {n: R.Identity(**d) for n, d in t["identities"].items()}}
            for sid, t in obj["scenarios"].items()}
