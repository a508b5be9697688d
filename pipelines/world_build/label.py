"""The reader as the expert: label a candidate set through a running studio, over HTTP only.

    python -m pipelines.world_build label --url http://127.0.0.1:8765 SET [--truth truth.json]

It makes the calls the labelling page makes (docs/studio.md): ``GET /api/sets`` to find SET
(its id, or its folder relative to the studio's ROOT), ``GET /api/sets/<id>`` for the
scenarios, every reference and candidate fetched from ``/file/<path>`` and read with
:func:`pipelines.world.reader.read_image`, each decision posted to
``POST /api/sets/<id>/marks`` (journalled by the studio), then ``POST /api/sets/<id>/export``.

The rule, per candidate, for scenarios of one or two characters (each with one reference;
the preferred attribute is each reference's accessory)::

    winner   exactly the scenario's characters, each at its prompt's slot with its
             reference's accessory AND colour
    loser    a wrong number of characters, or one at a character's slot with another
             character's (or no) accessory: a missing, extra or swapped accessory
    (none)   anything else (a right accessory at the wrong slot, a wrong colour)

The reference's identity is what the reader reads off the reference image, as a person
would look at it; ``--truth`` (the ``truth.json`` of ``python -m pipelines.world
scenarios``) checks that reading against the identity the reference was rendered from.
A scenario whose candidates are all losers gets no winner: the export leaves it out
(counted as ``losers_only``).  Marks are posted only where the journal does not already hold
that label, with event ids derived from (scenario, candidate, label), so a rerun posts nothing
twice.
"""
from __future__ import annotations

import hashlib
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, Optional

from ..world import data as D
from ..world.reader import read_image

__all__ = ["label_set", "export_set", "decide", "LabelError"]

TAB = "reader"


class LabelError(RuntimeError):
    """A problem a user fixes (no studio at the URL, an unknown set, a wrong truth file)."""


def decide(reading, expected) -> Optional[str]:
    """The rule of the module docstring: "winner", "loser" or None.  ``expected``: per
    character of the scenario, ``(position, accessory, colour)``."""
    chars = reading.characters
    if len(chars) != len(expected):
        return "loser"
    right = 0
    for position, accessory, colour in expected:
        ch = reading.at(position)
        if ch is None:
            if len(expected) == 1 and chars[0]["accessory"] != accessory:
                return "loser"          # a lone character elsewhere with another accessory
            continue
        if ch["accessory"] != accessory:
            return "loser"
        right += ch["colour"] == colour
    return "winner" if right == len(expected) else None


class _Client:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def _open(self, path: str, body=None):
        req = urllib.request.Request(
            self.url + path, method="GET" if body is None else "POST",
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise LabelError(f"{req.method} {path}: HTTP {e.code} {detail}") from None
        except urllib.error.URLError as e:
            raise LabelError(f"no studio answering at {self.url} ({e.reason}); start one with "
                             "`python -m pipelines.studio ROOT --port PORT`") from None

    def get(self, path: str):
        return json.loads(self._open(path))

    def post(self, path: str, body=None):
        return json.loads(self._open(path, body or {}))

    def image(self, rel: str):
        from PIL import Image

        data = self._open("/file/" + urllib.parse.quote(rel))
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")


def _find_set(client: _Client, want: str) -> str:
    offset = 0
    while True:
        page = client.get(f"/api/sets?offset={offset}&limit=500")
        for s in page["items"]:
            if want in (s["id"], s["path"], s["path"].rstrip("/")):
                return s["id"]
        offset += 500
        if offset >= page["total"]:
            raise LabelError(f"no candidate set {want!r} in that studio; pass its id or its "
                             "folder relative to the studio's ROOT (GET /api/sets lists them)")


def _event_id(sid: str, k: int, label: str) -> str:
    return f"{TAB}-" + hashlib.sha1(f"{sid}|{k}|{label}".encode()).hexdigest()[:20]


def label_set(url: str, set_ref: str, truth: Optional[Dict[str, dict]] = None,
              export: bool = True) -> dict:
    """Label set ``set_ref`` of the studio at ``url``; return the counts, every decision
    (``labels``: {scenario: {candidate: label or None}}) and the export's answer."""
    client = _Client(url)
    set_id = _find_set(client, set_ref)
    detail = client.get(f"/api/sets/{set_id}")
    marks = detail["marks"]
    labels: Dict[str, Dict[int, Optional[str]]] = {}
    n = dict(candidates=0, winners=0, losers=0, unmarked=0, missing=0, posted=0,
             losers_only=0, winners_only=0, pools=0, right_accessory=0, right_colour=0,
             appearances=0, skipped_scenarios=0)
    for s in detail["scenarios"]:
        sid = s["id"]
        try:
            _, cast = D.parse_prompt(s["prompt"])
        except D.PromptError:
            cast = []
        if not 1 <= len(cast) <= 2 or len(s["references"]) != len(cast):
            n["skipped_scenarios"] += 1      # the rule reads one reference per character
            continue
        names = s.get("characters") or [c[0] for c in cast]
        looks = {}
        for name, ref_file in zip(names, s["references"]):
            ref = read_image(client.image(ref_file))
            if len(ref.characters) != 1:
                raise LabelError(f"scenario {sid}: its reference {ref_file} does not show one "
                                 f"character (the reader sees {len(ref.characters)})")
            looks[name] = (ref.characters[0]["accessory"], ref.characters[0]["colour"])
            if truth is not None:
                ident = truth[sid]["identities"][name]
                if (ident.accessory, ident.colour) != looks[name]:
                    raise LabelError(f"scenario {sid}: the reference of {name} reads "
                                     f"{'/'.join(looks[name])} but the truth file says "
                                     f"{ident.accessory}/{ident.colour}: is it the truth of "
                                     "these scenarios?")
        if set(looks) != {c[0] for c in cast}:
            raise LabelError(f"scenario {sid}: its characters {sorted(looks)} are not the ones "
                             f"its prompt names {sorted(c[0] for c in cast)}")
        expected = [(pos, *looks[name]) for name, _, pos in cast]
        mine: Dict[int, Optional[str]] = {}
        for c in s["candidates"]:
            if not c["exists"]:
                n["missing"] += 1
                continue
            reading = read_image(client.image(c["file"]))
            label = decide(reading, expected)
            mine[c["k"]] = label
            n["candidates"] += 1
            # per character: its reference's accessory / colour at its slot
            for pos, acc, col in expected:
                ch = reading.at(pos) or {}
                n["right_accessory"] += ch.get("accessory") == acc
                n["right_colour"] += ch.get("colour") == col
            n["appearances"] += len(expected)
            if label is None:
                n["unmarked"] += 1
                continue
            n["winners" if label == "winner" else "losers"] += 1
            if marks.get(sid, {}).get(str(c["k"])) != label:
                res = client.post(f"/api/sets/{set_id}/marks",
                                  {"id": _event_id(sid, c["k"], label), "tab": TAB,
                                   "scenario": sid, "candidate": c["k"], "label": label})
                n["posted"] += bool(res["written"])
        got = set(mine.values())
        if {"winner", "loser"} <= got:
            n["pools"] += 1
        elif "loser" in got:
            n["losers_only"] += 1
        elif "winner" in got:
            n["winners_only"] += 1
        labels[sid] = mine
    out = {"set": set_id, **n, "labels": labels}
    if export and n["pools"]:
        out["export"] = export_set(url, set_id)
    elif export:
        # the studio answers 409 to an export with nothing to pair; a set whose candidates
        # are all right (or all wrong) is a result to report, not an error
        out["export"] = {"scenarios": 0, "pairs": 0, "written": False,
                         "why": "no scenario has both a winner and a loser"}
    return out


def export_set(url: str, set_id: str) -> dict:
    """``POST /api/sets/<id>/export``: the studio writes ``pairs.jsonl`` into the set."""
    return _Client(url).post(f"/api/sets/{set_id}/export")
