"""The scenarios file of ``python -m pipelines.candidates`` (format: docs/candidates.md).

::

    {"scenarios": [
      {"id": "fox-meets-snowman",                 # optional, default s000, s001, ...
       "prompt": "a red fox meets a snowman in the snowy forest",
       "references": ["refs/fox.png", "refs/snowman.png"],   # relative to the JSON file
       "characters": ["fox", "snowman"],          # optional names, one per reference
       "reference_prompts": ["a red fox", "a snowman"],   # optional, one per reference
       "regions": [[0.0, 0.2, 0.5, 1.0], null]}   # optional: where each reference is read
    ]}

``regions`` binds a reference to a place: one ``[x0, y0, x1, y1]`` (fractions of the frame)
or null per reference; the candidates' image tokens inside a box read that reference, as a
story frame's regions do in Story-Iter (a model trained with a layout, the story world's stage
1, draws a two-character frame right only with them).

A bare list of scenario objects is accepted too.  Every problem is reported with the
scenario's place in the file, before any model is loaded.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ..cli_common import UsageError
from ..story import is_box

__all__ = ["Scenario", "ScenarioError", "load_scenarios"]

# scenario ids become folder names and URL parts: keep them to a safe alphabet
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class ScenarioError(UsageError):
    """A scenarios file that cannot be used; the message names the problem and the fix."""


@dataclass
class Scenario:
    id: str
    prompt: str
    references: List[Path]
    characters: List[str] = field(default_factory=list)
    # the text each reference is recorded with (default: the scenario's prompt); a model
    # trained on groups of captioned frames (the story world's) reads a reference best with
    # its own caption
    reference_prompts: List[str] = field(default_factory=list)
    # one box (or None) per reference: where the candidates read it; empty = everywhere
    regions: List[Optional[List[float]]] = field(default_factory=list)

    def ref_prompts(self) -> List[str]:
        return list(self.reference_prompts) or [self.prompt] * len(self.references)

    def as_dict(self) -> dict:
        d = {"id": self.id, "prompt": self.prompt, "characters": list(self.characters),
             "source_references": [str(p) for p in self.references]}
        if self.reference_prompts:
            d["reference_prompts"] = list(self.reference_prompts)
        if self.regions:
            d["regions"] = [None if b is None else list(b) for b in self.regions]
        return d


def _image_problem(path: Path) -> Optional[str]:
    from PIL import Image

    if not path.is_file():
        return "file does not exist"
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # PIL raises many types for a bad file
        return f"not a readable image ({type(exc).__name__})"
    return None


def load_scenarios(path) -> List[Scenario]:
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"scenarios file {path} does not exist (see docs/candidates.md "
                            "for the format)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path} is not valid JSON ({exc}); fix the file") from None
    items = data.get("scenarios") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ScenarioError(f"{path}: expected {{\"scenarios\": [...]}} or a list with at least "
                            "one scenario object")
    out: List[Scenario] = []
    seen = set()
    for n, obj in enumerate(items):
        where = f"{path}: scenario {n}"
        if not isinstance(obj, dict):
            raise ScenarioError(f"{where} must be an object with 'prompt' and 'references'")
        sid = obj.get("id", f"s{n:03d}")
        if not isinstance(sid, str) or not _ID.match(sid):
            raise ScenarioError(f"{where}: id {sid!r} must be 1-80 letters, digits, '.', '_' or "
                                "'-' (it names a folder)")
        if sid in seen:
            raise ScenarioError(f"{where}: id {sid!r} is used twice; give each scenario its own id")
        seen.add(sid)
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ScenarioError(f"{where} ({sid}): 'prompt' must be a non-empty string")
        refs = obj.get("references")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r for r in refs):
            raise ScenarioError(f"{where} ({sid}): 'references' must be a non-empty list of image "
                                "paths (relative to the scenarios file); the candidates attend "
                                "to them")
        ref_paths = [(path.parent / r).resolve() for r in refs]
        for r, p in zip(refs, ref_paths):
            why = _image_problem(p)
            if why:
                raise ScenarioError(f"{where} ({sid}): reference {r!r} -> {p}: {why}")
        chars = obj.get("characters", [])
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise ScenarioError(f"{where} ({sid}): 'characters' must be a list of names")
        if chars and len(chars) != len(refs):
            raise ScenarioError(f"{where} ({sid}): {len(chars)} character names for {len(refs)} "
                                "references; give one name per reference or none")
        rprompts = obj.get("reference_prompts", [])
        if (not isinstance(rprompts, list) or not all(isinstance(t, str) for t in rprompts)
                or (rprompts and len(rprompts) != len(refs))):
            raise ScenarioError(f"{where} ({sid}): 'reference_prompts' must be a list of "
                                f"{len(refs)} strings, one per reference (or left out)")
        regions = obj.get("regions", [])
        if (not isinstance(regions, list) or (regions and len(regions) != len(refs))
                or not all(b is None or is_box(b) for b in regions)):
            raise ScenarioError(f"{where} ({sid}): 'regions' must be a list of {len(refs)} "
                                "entries, one per reference, each [x0, y0, x1, y1] with "
                                "0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, or null (or left out)")
        unknown = set(obj) - {"id", "prompt", "references", "characters", "reference_prompts",
                              "regions"}
        if unknown:
            raise ScenarioError(f"{where} ({sid}): unknown key(s) {sorted(unknown)}; allowed: id, "
                                "prompt, references, characters, reference_prompts, regions")
        out.append(Scenario(sid, prompt.strip(), ref_paths, list(chars), list(rprompts),
                            [None if b is None else [float(v) for v in b] for b in regions]))
    return out
