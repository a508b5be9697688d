"""The ViStoryBench dataset layout (read) and the evaluator's output layout (write, read).

Dataset (what ViStoryBench's own loader reads)::

    ROOT/                      e.g. data/dataset/ViStory
      01/                      one folder per story, the id is all digits
        story.json
        image/<character key>/*.png|jpg|jpeg   reference images (any depth, sorted)

``story.json``::

    {"Story_type": {"en": ..., "ch": ...},
     "Shots": [{"index": 1,
                "Setting Description":     {"en": ..., "ch": ...},
                "Plot Correspondence":     {"en": ..., "ch": ...},
                "Characters Appearing":    {"en": [names], "ch": [names]},
                "Static Shot Description": {"en": ..., "ch": ...},
                "Shot Perspective Design": {"en": ..., "ch": ...}}, ...],
     "Characters": {"<key>": {"name_en": ..., "name_ch": ..., "prompt_en": ...,
                              "prompt_ch": ..., "tag": ...}, ...}}

The keys of ``Characters`` are the English names: ``Characters Appearing.en`` names them
and ``image/<key>/`` holds their pictures; the ``ch`` list gives the same characters in
the same order.  (A flat ``"Setting Description_en"`` form is read too.)

A shot's text is built as ViStoryBench's loader merges it: camera; plot; script; one
``"<name> is <description>"`` per character present; setting, each followed by ``;``.

Outputs (what the evaluator's ``load_outputs`` reads)::

    OUT/<method>/<mode>/<lang>/<YYYYMMDD-HHMMSS>/<story id>/<NN>.png

shots in natural-sort order of their file names, paired in order with the story's shots;
``NN`` is the shot's ``index`` with two digits.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from pipelines.story import Character, Frame, Story, StoryError

__all__ = ["SHOT_FIELDS", "LANGS", "story_ids", "read_story", "shot_indices", "export_frames",
           "read_outputs", "TIMESTAMP_FORMAT"]

LANGS = ("en", "ch")
# field -> its role in the merged text, in the order the loader merges them
SHOT_FIELDS = {
    "Shot Perspective Design": "camera",
    "Plot Correspondence": "plot",
    "Static Shot Description": "script",
    "Characters Appearing": "characters",
    "Setting Description": "scene",
}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TIMESTAMP_FORMAT = "%Y%m%d-%H%M%S"
_TIMESTAMP = re.compile(r"^\d{8}[-_]\d{6}$")


def story_ids(root) -> List[str]:
    """The story folders of a dataset root, in numeric order (ids are all digits)."""
    root = Path(root)
    if not root.is_dir():
        raise StoryError([f"not a folder: {root}"], "vistorybench")
    return sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=int)


def _text(shot: dict, field: str, lang: str, where: str, errors: List[str]):
    """``shot[field][lang]`` (or ``shot[field_lang]``); None after recording an error."""
    if isinstance(shot.get(field), dict):
        v = shot[field].get(lang)
        if v is None:
            errors.append(f'{where} "{field}": no "{lang}" entry (has: '
                          f'{", ".join(sorted(shot[field])) or "none"})')
        return v
    flat = f"{field}_{lang}"
    if flat in shot:
        return shot[flat]
    if field in shot:
        errors.append(f'{where} "{field}": expected an object with "en" and "ch", got '
                      f"{type(shot[field]).__name__}")
    else:
        errors.append(f'{where} "{field}": missing')
    return None


def _names(v, where: str, field: str, errors: List[str]) -> Optional[List[str]]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        errors.append(f'{where} "{field}": expected a list of names, got {v!r}')
        return None
    return [x.strip() for x in v]


def read_story(story_dir, lang: str = "en") -> Tuple[Story, List[int]]:
    """One ViStoryBench story folder as a :class:`Story` plus its shots' indices.

    Characters are named by their keys (the English names), described by ``prompt_<lang>``
    and carry ``image/<key>/`` as reference images; each frame's prompt is the merged shot
    text and its characters are the shot's ``Characters Appearing``.  Raises
    :class:`StoryError` naming the story, shot and field of every problem."""
    story_dir = Path(story_dir)
    sid = story_dir.name
    src = f"vistorybench story {sid} ({story_dir})"
    if lang not in LANGS:
        raise StoryError([f"language {lang!r}: ViStoryBench has en and ch"], src)
    f = story_dir / "story.json"
    try:
        # utf-8-sig: some of the published files start with a byte-order mark
        obj = json.loads(f.read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise StoryError([f"story.json: cannot read: {e}"], src) from None
    except json.JSONDecodeError as e:
        raise StoryError([f"story.json line {e.lineno} column {e.colno}: invalid JSON: "
                          f"{e.msg}"], src) from None
    errors: List[str] = []
    if not isinstance(obj, dict):
        raise StoryError([f"story.json: expected an object, got {type(obj).__name__}"], src)

    chars_raw = obj.get("Characters")
    if not isinstance(chars_raw, dict):
        errors.append(f'"Characters": expected an object keyed by character, got '
                      f"{type(chars_raw).__name__}")
        chars_raw = {}
    characters: List[Character] = []
    display: Dict[str, str] = {}
    for key, c in chars_raw.items():
        where = f'"Characters" "{key}"'
        if not isinstance(c, dict):
            errors.append(f"{where}: expected an object, got {type(c).__name__}")
            continue
        desc = c.get(f"prompt_{lang}")
        if not isinstance(desc, str):
            errors.append(f'{where} "prompt_{lang}": expected a text, got {desc!r}')
            desc = ""
        name = c.get(f"name_{lang}")
        display[key.strip()] = name.strip() if isinstance(name, str) and name.strip() else key
        img_dir = story_dir / "image" / key
        imgs = sorted(str(p) for p in img_dir.rglob("*")
                      if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES) \
            if img_dir.is_dir() else []
        characters.append(Character(key.strip(), desc.strip(), tuple(imgs)))
    known = {c.name for c in characters}

    shots = obj.get("Shots")
    if not isinstance(shots, list) or not shots:
        errors.append(f'"Shots": expected a non-empty list, got {shots!r:.60}')
        shots = []
    frames: List[Frame] = []
    indices: List[int] = []
    for n, shot in enumerate(shots):
        where = f'"Shots"[{n}]'
        if not isinstance(shot, dict):
            errors.append(f"{where}: expected an object, got {type(shot).__name__}")
            continue
        idx = shot.get("index")
        if not isinstance(idx, int) or isinstance(idx, bool):
            errors.append(f'{where} "index": expected an integer, got {idx!r}')
            idx = None
        else:
            where = f'"Shots"[{n}] (index {idx})'
            if indices and idx <= indices[-1]:
                errors.append(f'{where} "index": {idx} after {indices[-1]} (shots must come in '
                              "increasing index order: the evaluator pairs them in file order)")
            indices.append(idx)
        parts = {}
        for field, role in SHOT_FIELDS.items():
            v = _text(shot, field, lang, where, errors)
            if role == "characters":
                parts[role] = _names(v, where, f"{field}", errors) if v is not None else None
            elif v is not None and not isinstance(v, str):
                errors.append(f'{where} "{field}" ({lang}): expected a text, got {v!r}')
            else:
                parts[role] = v
        keys = parts.get("characters")
        if lang != "en" and keys is not None:
            # the keys are the English names; the localized list names the same characters
            en = _names(_text(shot, "Characters Appearing", "en", where, errors), where,
                        "Characters Appearing (en)", errors)
            if en is not None and len(en) != len(keys):
                errors.append(f'{where} "Characters Appearing": {len(keys)} {lang} names but '
                              f"{len(en)} en names")
            keys = en
        present: List[str] = []
        for k in keys or []:
            if k not in known:
                errors.append(f'{where} "Characters Appearing": unknown character {k!r} '
                              f'(defined: {", ".join(sorted(known)) or "none"})')
            elif k not in present:
                present.append(k)
        if any(parts.get(r) is None for r in ("camera", "plot", "script", "scene")):
            continue
        cdesc = ";".join(f"{display[k]} is {next(c.description for c in characters if c.name == k)}"
                         for k in present)
        text = "".join(f"{p};" for p in (parts["camera"], parts["plot"], parts["script"], cdesc,
                                           parts["scene"]))
        frames.append(Frame(text, tuple(present)))
    if errors:
        raise StoryError(errors, src)
    stype = obj.get("Story_type")
    title = f"ViStoryBench {sid}"
    if isinstance(stype, dict) and isinstance(stype.get(lang), str):
        title += f" ({stype[lang]})"
    return Story(title, "", characters, frames, source=f"vistorybench:{story_dir}"), indices


def shot_indices(story_dir, lang: str = "en") -> List[int]:
    return read_story(story_dir, lang)[1]


def export_frames(frames: Sequence, indices: Sequence[int], out, method: str, story_id: str,
                  lang: str, mode: str = "base", timestamp: Optional[str] = None) -> Path:
    """Copy (path) or save (PIL image) each shot's picture to
    ``out/method/mode/lang/timestamp/story_id/NN.png``; returns that folder.

    The folder is filled under a temporary name and renamed at the end, so an evaluator
    never sees half a story."""
    for label, v in (("method", method), ("mode", mode), ("story id", story_id)):
        if not v or "/" in v or "\\" in v or v in (".", ".."):
            raise ValueError(f"{label} {v!r}: expected a plain folder name")
    if not story_id.isdigit():
        raise ValueError(f"story id {story_id!r}: the evaluator reads numeric story ids")
    if lang not in LANGS:
        raise ValueError(f"language {lang!r}: expected en or ch")
    if len(frames) != len(indices):
        raise ValueError(f"{len(frames)} frames for {len(indices)} shots")
    timestamp = timestamp or time.strftime(TIMESTAMP_FORMAT)
    if not _TIMESTAMP.match(timestamp):
        raise ValueError(f"timestamp {timestamp!r}: expected YYYYMMDD-HHMMSS")
    dest = Path(out) / method / mode / lang / timestamp / story_id
    if dest.exists():
        raise FileExistsError(f"{dest} exists already; export again in a second or pick "
                              "another folder")
    tmp = dest.parent / f".{story_id}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for frame, idx in zip(frames, indices):
        target = tmp / f"{idx:02d}.png"
        if isinstance(frame, (str, os.PathLike)):
            shutil.copyfile(frame, target)
        else:
            frame.save(target)
    os.replace(tmp, dest)
    return dest


def _natural(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def read_outputs(out, method: str, mode: Optional[str] = None,
                 lang: Optional[str] = None) -> Dict[str, List[str]]:
    """An independent reading of the evaluator's rules: story id -> its shot images (the
    latest timestamp folder per story, files in natural order)."""
    found: Dict[str, Tuple[str, List[str]]] = {}
    base = Path(out) / method
    for mode_dir in sorted(base.iterdir()) if base.is_dir() else []:
        if mode is not None and mode_dir.name != mode:
            continue
        for lang_dir in sorted(p for p in mode_dir.iterdir() if p.is_dir()):
            if lang is not None and lang_dir.name != lang:
                continue
            for ts in sorted(p for p in lang_dir.iterdir() if p.is_dir()):
                if not _TIMESTAMP.match(ts.name):
                    continue
                for sd in (p for p in ts.iterdir() if p.is_dir() and p.name.isdigit()):
                    shots = sorted((p for p in sd.iterdir()
                                    if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES),
                                   key=lambda p: _natural(p.name))
                    if sd.name not in found or ts.name.replace("_", "-") > found[sd.name][0]:
                        found[sd.name] = (ts.name.replace("_", "-"), [str(p) for p in shots])
    return {k: v[1] for k, v in sorted(found.items(), key=lambda kv: int(kv[0]))}
