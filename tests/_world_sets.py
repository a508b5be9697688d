"""Candidate sets whose candidates are rendered by the world itself (no model), so each one's
right label is known by construction: the labeller tests draw frames and check its marks."""
from pathlib import Path

from pipelines.candidate_sets import MANIFEST, new_manifest
from pipelines.candidates.scenarios import load_scenarios
from pipelines.world import render as R
from pipelines.world.scenarios import load_truth, make_scenarios

# what new_manifest records; nothing draws with it
CONFIG = {"model": "rendered", "loras": [], "candidates": 4, "seed": 0, "steps": 0,
          "height": 64, "width": 64, "guidance": 1.0}


def start_set(root: Path, **scenario_kw):
    """World scenarios under ``root/scen`` (``make_scenarios(**scenario_kw)``) and a complete
    manifest of 4 candidates each for the set ``root/set``: (scenarios, truth, manifest, set
    folder).  Write the manifest with :func:`finish_set` once the candidates are drawn."""
    scen = make_scenarios(root / "scen", **scenario_kw)
    scenarios = load_scenarios(scen)
    m = new_manifest(CONFIG, scenarios)
    m["status"] = "complete"
    return scenarios, load_truth(scen.parent), m, root / "set"


def draw_candidates(out: Path, entry: dict, scenario, scene: str, frames) -> dict:
    """Render ``frames`` (a list of (placements, expected label)) as the entry's candidates
    0, 1, ... on ``scene``, copy the scenario's references into the set; {k: label}."""
    want = {}
    for k, (places, label) in enumerate(frames):
        p = out / entry["candidates"][k]["file"]
        p.parent.mkdir(parents=True, exist_ok=True)
        R.to_pil(R.render_frame(scene, places)).save(p)
        want[k] = label
    for r, src in zip(entry["references"], scenario.references):
        (out / r).write_bytes(Path(src).read_bytes())
    return want


def finish_set(out: Path, manifest: dict) -> None:
    import json

    (out / MANIFEST).write_text(json.dumps(manifest))
