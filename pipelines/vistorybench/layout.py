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

A shot's text is built as ViStoryBench's loader merges it (:func:`merge_shot`):
``camera;plot;script;<name> is <prompt>;...;scene;`` where ``<name>`` is the shot's own
``Characters Appearing[lang]`` entry (paired by position with the ``en`` keys) and
``<prompt>`` that character's ``prompt_<lang>``.  Every character needs at least one
reference image under ``image/<key>/``: the evaluator reads them.

Outputs (what the evaluator's ``load_outputs`` reads)::

    OUT/<method>/<mode>/<lang>/<YYYYMMDD-HHMMSS>/<story id>/<NN>.png

shots in natural-sort order of their file names, paired in order with the story's shots;
``NN`` is the shot's ``index`` with two digits.
"""
from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from pipelines.story import Character, Frame, Story, StoryError

__all__ = ["SHOT_FIELDS", "LANGS", "story_ids", "read_story", "shot_indices", "export_frames",
           "read_outputs", "TIMESTAMP_FORMAT", "VistoryError", "check_timestamp"]


class VistoryError(StoryError):
    """A story folder the official loader or evaluator would mishandle, said on one line:
    the story, then each problem (shot and field) separated by ``; ``.  One line because
    the command-line tools print it after ``error:`` and a second line reads as a
    traceback to anyone scanning a log."""

    def __init__(self, errors: Sequence[str], source: str):
        super().__init__(errors, source)
        self.args = (f"{source}: " + "; ".join(self.errors),)

    def __str__(self) -> str:
        return self.args[0]

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
        raise VistoryError([f"not a folder: {root}"], "vistorybench")
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
    return list(v)   # as written: the merge uses the shot's names verbatim


def _reference_images(story_dir: Path, key: str, where: str, errors: List[str]) -> List[str]:
    """The pictures under ``image/<key>/``.  A character without any is an error: the
    evaluator's character-identity metric reads that folder, and its prompt merge and
    style metric take the folder's first picture, so such a story cannot be scored."""
    img_dir = story_dir / "image" / key
    if not img_dir.is_dir():
        errors.append(f"{where}: no reference images: folder {img_dir} is missing (ViStoryBench's "
                      "character and style metrics read it; add the pictures there)")
        return []
    imgs = sorted(str(p) for p in img_dir.rglob("*")
                  if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not imgs:
        errors.append(f"{where}: no reference images: folder {img_dir} holds no .png/.jpg/.jpeg "
                      "(ViStoryBench's character and style metrics read it)")
    return imgs


def read_story(story_dir, lang: str = "en", skip_bad_shots: bool = False,
               warn: Optional[Callable[[str], None]] = None) -> Tuple[Story, List[int]]:
    """One ViStoryBench story folder as a :class:`Story` plus its shots' indices.

    Characters are named by their keys (the English names), described by ``prompt_<lang>``
    and carry ``image/<key>/`` as reference images; each frame's prompt is the shot text
    merged as the official loader merges it (see :func:`merge_shot`) and its characters
    are the shot's ``Characters Appearing`` keys.

    Raises :class:`VistoryError` (one line) naming the story, shot and field of every
    problem.  ``skip_bad_shots``: drop a shot that lacks one of the five fields, as the
    official loader does, calling ``warn`` (default: print to stderr) for each."""
    story_dir = Path(story_dir)
    sid = story_dir.name
    src = f"vistorybench story {sid} ({story_dir})"
    if lang not in LANGS:
        raise VistoryError([f"language {lang!r}: ViStoryBench has en and ch"], src)
    f = story_dir / "story.json"
    try:
        # utf-8-sig: some of the published files start with a byte-order mark
        obj = json.loads(f.read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise VistoryError([f"story.json: cannot read: {e.strerror or e}"], src) from None
    except json.JSONDecodeError as e:
        raise VistoryError([f"story.json line {e.lineno} column {e.colno}: invalid JSON: "
                            f"{e.msg}"], src) from None
    errors: List[str] = []
    if not isinstance(obj, dict):
        raise VistoryError([f"story.json: expected an object, got {type(obj).__name__}"], src)

    chars_raw = obj.get("Characters")
    if not isinstance(chars_raw, dict):
        errors.append(f'"Characters": expected an object keyed by character, got '
                      f"{type(chars_raw).__name__}")
        chars_raw = {}
    characters: List[Character] = []
    prompts: Dict[str, str] = {}   # key -> prompt_<lang> as written (the merge uses it raw)
    for key, c in chars_raw.items():
        where = f'"Characters" "{key}"'
        if not isinstance(c, dict):
            errors.append(f"{where}: expected an object, got {type(c).__name__}")
            continue
        desc = c.get(f"prompt_{lang}")
        if not isinstance(desc, str):
            errors.append(f'{where} "prompt_{lang}": expected a text, got {desc!r}')
            desc = ""
        prompts[key] = prompts[key.strip()] = desc
        imgs = _reference_images(story_dir, key, where, errors)
        characters.append(Character(key.strip(), desc.strip(), tuple(imgs)))

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
        if isinstance(idx, int) and not isinstance(idx, bool):
            where = f'"Shots"[{n}] (index {idx})'
        absent = [fld for fld in SHOT_FIELDS if fld not in shot and f"{fld}_{lang}" not in shot]
        if absent and skip_bad_shots:
            fields = ", ".join('"%s"' % a for a in absent)
            (warn or _stderr)(f"warning: {src}: {where} dropped: no {fields} "
                              "(--skip-bad-shots, as ViStoryBench's loader drops it)")
            continue
        if not isinstance(idx, int) or isinstance(idx, bool):
            errors.append(f'{where} "index": expected an integer, got {idx!r}')
        else:
            if indices and idx <= indices[-1]:
                errors.append(f'{where} "index": {idx} after {indices[-1]} (shots must come in '
                              "increasing index order: the evaluator pairs them in file order)")
            indices.append(idx)
        parts = {}
        for field, role in SHOT_FIELDS.items():
            v = _text(shot, field, lang, where, errors)
            if role == "characters":
                parts[role] = _names(v, where, field, errors) if v is not None else None
            elif v is not None and not isinstance(v, str):
                errors.append(f'{where} "{field}" ({lang}): expected a text, got {v!r}')
                parts[role] = None
            else:
                parts[role] = v
        names = parts.get("characters")
        keys = names
        if lang != "en" and names is not None:
            # the image folders and "Characters" are keyed by the en list; the lang list
            # names the same characters in the same order (the loader pairs them by position)
            keys = _names(_text(shot, "Characters Appearing", "en", where, errors), where,
                          "Characters Appearing (en)", errors)
            if keys is not None and len(keys) != len(names):
                errors.append(f'{where} "Characters Appearing": {len(names)} {lang} names but '
                              f"{len(keys)} en names (they are paired by position)")
                keys = None
        pairs: List[Tuple[str, str]] = []
        for k, name in zip(keys or [], names or []):
            if k not in prompts:
                errors.append(f'{where} "Characters Appearing": unknown character {k!r} '
                              f'(defined: {", ".join(sorted(chars_raw)) or "none"})')
            else:
                pairs.append((k, name))
        if any(parts.get(r) is None for r in ("camera", "plot", "script", "scene")) \
                or keys is None:
            continue
        present = tuple(dict.fromkeys(k.strip() for k, _ in pairs))
        text = merge_shot(parts["camera"], parts["plot"], parts["script"],
                          [(name, prompts[k]) for k, name in pairs], parts["scene"])
        frames.append(Frame(text, present))
    if errors:
        raise VistoryError(errors, src)
    if not frames:
        raise VistoryError(['"Shots": no shot left after --skip-bad-shots'], src)
    stype = obj.get("Story_type")
    title = f"ViStoryBench {sid}"
    if isinstance(stype, dict) and isinstance(stype.get(lang), str):
        title += f" ({stype[lang]})"
    return Story(title, "", characters, frames, source=f"vistorybench:{story_dir}"), indices


def merge_shot(camera: str, plot: str, script: str, characters: Sequence[Tuple[str, str]],
               scene: str) -> str:
    """A shot's prompt as ViStoryBench's loader builds it:
    ``camera;plot;script;<name> is <prompt>;...;scene;``.  ``characters`` are
    (name, prompt) pairs in the shot's order: the name is the shot's own
    ``Characters Appearing[lang]`` entry (not the character's ``name_<lang>``), the prompt
    the character's ``prompt_<lang>``; repeats are kept, as the loader keeps them."""
    people = ";".join(f"{name} is {prompt}" for name, prompt in characters)
    return f"{camera};{plot};{script};{people};{scene};"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def shot_indices(story_dir, lang: str = "en", skip_bad_shots: bool = False) -> List[int]:
    return read_story(story_dir, lang, skip_bad_shots, warn=lambda _m: None)[1]


def check_timestamp(ts: str) -> str:
    """A run's timestamp folder name as the evaluator parses it (``YYYYMMDD-HHMMSS`` or
    ``YYYYMMDD_HHMMSS``, a real date and time); returns it unchanged."""
    ok = bool(_TIMESTAMP.match(ts or ""))
    if ok:
        try:
            datetime.strptime(ts.replace("_", "-"), TIMESTAMP_FORMAT)
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(f"timestamp {ts!r}: expected a date and time as YYYYMMDD-HHMMSS "
                         f"(e.g. {time.strftime(TIMESTAMP_FORMAT)}), the run folder name "
                         "ViStoryBench's evaluator parses")
    return ts


def _same_pictures(dest: Path, frames: Sequence, names: Sequence[str]) -> bool:
    """Whether ``dest`` already holds exactly these pictures (a rerun of a finished run
    exports again under the same timestamp: that is not a clash)."""
    if sorted(p.name for p in dest.iterdir()) != sorted(names):
        return False
    return all(isinstance(f, (str, os.PathLike)) and filecmp.cmp(f, dest / n, shallow=False)
               for f, n in zip(frames, names))


_TMP_PREFIX = ".storyattn-export-"


def export_frames(frames: Sequence, indices: Sequence[int], out, method: str, story_id: str,
                  lang: str, mode: str = "base", timestamp: Optional[str] = None) -> Path:
    """Copy (path) or save (PIL image) each shot's picture to
    ``out/method/mode/lang/timestamp/story_id/NN.png``; returns that folder.

    ``timestamp`` names the run: give every story of one method's run the same one (the
    evaluator treats a timestamp folder as one run; its diversity metric pools it).
    Default: now.  The pictures are written into a hidden folder directly under ``out``
    and the finished folder is renamed into place, so a timestamp folder never holds
    anything but complete story folders: the evaluator's reader calls ``int()`` on every
    folder name there and would stop at a ``.partial`` or temporary one."""
    for label, v in (("method", method), ("mode", mode), ("story id", story_id)):
        if not v or "/" in v or "\\" in v or v in (".", "..") or v.startswith("."):
            raise ValueError(f"{label} {v!r}: expected a plain folder name")
    if not story_id.isdigit():
        raise ValueError(f"story id {story_id!r}: the evaluator reads numeric story ids")
    if lang not in LANGS:
        raise ValueError(f"language {lang!r}: expected en or ch")
    if len(frames) != len(indices):
        raise ValueError(f"{len(frames)} frames for {len(indices)} shots")
    timestamp = check_timestamp(timestamp) if timestamp else time.strftime(TIMESTAMP_FORMAT)
    out = Path(out)
    dest = out / method / mode / lang / timestamp / story_id
    names = [f"{idx:02d}.png" for idx in indices]
    if dest.exists():
        if dest.is_dir() and _same_pictures(dest, frames, names):
            return dest
        raise FileExistsError(f"{dest} exists already with other pictures; pick another "
                              "--timestamp (or remove that folder)")
    out.mkdir(parents=True, exist_ok=True)
    _drop_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out))
    made_parent = not dest.parent.exists()
    try:
        for frame, name in zip(frames, names):
            if isinstance(frame, (str, os.PathLike)):
                shutil.copyfile(frame, tmp / name)
            else:
                frame.save(tmp / name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o755)   # mkdtemp makes it private; an exported story is for reading
        os.rename(tmp, dest)   # same file system (both under out): atomic
    except BaseException:      # KeyboardInterrupt too: nothing half-done stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if made_parent:
            try:
                dest.parent.rmdir()   # only if empty: another story may have landed
            except OSError:
                pass
        raise
    return dest


def _drop_stale_temps(out: Path, age_s: float = 3600.0) -> None:
    """Remove temporary folders that a killed export (SIGKILL, power cut) left under
    ``out`` more than an hour ago; an export takes seconds, so none is still in use."""
    now = time.time()
    for p in out.glob(_TMP_PREFIX + "*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _natural(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def read_outputs(out, method: str, mode: Optional[str] = None, lang: Optional[str] = None,
                 timestamp: Optional[str] = None) -> Dict[str, List[str]]:
    """An independent reading of the evaluator's rules: story id -> its shot images, files
    in natural order; from the run ``timestamp`` if given, else each story's latest run.

    Strict where the evaluator is: every folder of a ``lang`` folder is a run and every
    folder of a run must be a numeric story id (the evaluator calls ``int()`` on it), so a
    stray folder raises ValueError here as it would crash there."""
    found: Dict[str, Tuple[str, List[str]]] = {}
    base = Path(out) / method
    for mode_dir in sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
        if mode is not None and mode_dir.name != mode:
            continue
        for lang_dir in sorted(p for p in mode_dir.iterdir() if p.is_dir()):
            if lang is not None and lang_dir.name != lang:
                continue
            for ts in sorted(p for p in lang_dir.iterdir() if p.is_dir()):
                if timestamp is not None and ts.name != timestamp:
                    continue
                stray = [p.name for p in ts.iterdir() if p.is_dir() and not p.name.isdigit()]
                if stray:
                    raise ValueError(f"{ts}: folder(s) {', '.join(sorted(stray))} are not story "
                                     "ids; ViStoryBench's reader stops on them")
                key = ts.name.replace("_", "-")
                for sd in (p for p in ts.iterdir() if p.is_dir()):
                    shots = sorted((p for p in sd.iterdir()
                                    if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES),
                                   key=lambda p: _natural(p.name))
                    if sd.name not in found or key > found[sd.name][0]:
                        found[sd.name] = (key, [str(p) for p in shots])
    return {k: v[1] for k, v in sorted(found.items(), key=lambda kv: int(kv[0]))}
