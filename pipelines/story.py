"""Story files for ``python -m pipelines.story_iter``: format, validation, built-in demo.

A story is a JSON object::

    {
      "title": "The Snowman and the Fox",
      "style": "children's book illustration, soft watercolor",
      "negative_prompt": "lowres, blurry",                    # optional: the CFG branch's text
      "characters": [
        {"name": "Snowman", "description": "a cheerful snowman with a carrot nose",
         "reference_images": ["refs/snowman.png"]},          # optional, relative to the file
        {"name": "Fox", "description": "a small red fox with a white-tipped tail"}
      ],
      "frames": [
        {"prompt": "the snowman stands alone in a snowy field", "characters": ["Snowman"]},
        {"prompt": "a fox peeks out from behind a tree", "characters": ["Fox"]},
        {"prompt": "the snowman and the fox side by side", "characters": ["Snowman", "Fox"],
         "regions": {"Snowman": [0.0, 0.1, 0.5, 1.0], "Fox": [0.5, 0.4, 1.0, 1.0]}}
      ]
    }

A frame's optional ``regions`` is its layout: for some of its characters, the box
``[x0, y0, x1, y1]`` (fractions of the frame's width and height, y down) where that character
stands.  The FLUX backbones then let each image token read a character's reference images only
inside its box (``storyattn.region_masks``), so two characters in one frame each take their
own look instead of a blend of both.

``load_story(path)`` / ``parse_story(obj)`` validate everything and raise :class:`StoryError`
whose message names every bad field, e.g. ``frames[3].characters[0]: unknown character
'Foxx' (known: Snowman, Fox)``.  ``demo_story()`` is the built-in 100-frame story (a snowman
who meets a fox).  ``python -m pipelines.story --demo`` prints it as JSON;
``python -m pipelines.story FILE`` validates a file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["Character", "Frame", "Story", "StoryError", "parse_story", "load_story", "demo_story"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class StoryError(ValueError):
    """A story file that does not validate; ``errors`` lists one message per bad field."""

    def __init__(self, errors: Sequence[str], source: str = "story"):
        self.errors = list(errors)
        self.source = source
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"{source}: {len(self.errors)} error(s):\n{lines}")


@dataclass(frozen=True)
class Character:
    name: str
    description: str
    reference_images: tuple = ()


@dataclass(frozen=True)
class Frame:
    prompt: str
    characters: tuple = ()
    regions: tuple = ()       # ((name, (x0, y0, x1, y1)), ...): the frame's layout

    def region(self, name: str):
        """The box where ``name`` stands in this frame, or None (no layout for it)."""
        return dict(self.regions).get(name)


@dataclass
class Story:
    title: str
    style: str
    characters: List[Character]
    frames: List[Frame]
    source: Optional[str] = None
    negative_prompt: str = ""
    _by_name: Dict[str, Character] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._by_name = {c.name: c for c in self.characters}

    def character(self, name: str) -> Character:
        return self._by_name[name]

    def full_prompt(self, i: int) -> str:
        """The text a frame is drawn from: its prompt, the descriptions of the characters
        present (so each frame names its characters' look), and the story's style."""
        fr = self.frames[i]
        parts = [fr.prompt.strip()]
        for name in fr.characters:
            desc = self._by_name[name].description.strip()
            if desc and desc.lower() not in fr.prompt.lower():
                parts.append(desc)
        if self.style.strip():
            parts.append(self.style.strip())
        return ", ".join(parts)

    def truncated(self, n: Optional[int]) -> "Story":
        """The first ``n`` frames (all when None)."""
        if n is None or n >= len(self.frames):
            return self
        if n < 1:
            raise ValueError(f"--frames must be >= 1, got {n}")
        return Story(self.title, self.style, list(self.characters), list(self.frames[:n]),
                     self.source, self.negative_prompt)

    def to_json(self) -> Dict[str, Any]:
        chars = []
        for c in self.characters:
            d: Dict[str, Any] = {"name": c.name, "description": c.description}
            if c.reference_images:
                d["reference_images"] = list(c.reference_images)
            chars.append(d)
        out = {
            "title": self.title,
            "style": self.style,
            "characters": chars,
            "frames": [_frame_json(f) for f in self.frames],
        }
        if self.negative_prompt:
            # only when set, so stories without one keep their fingerprint (and resume)
            out["negative_prompt"] = self.negative_prompt
        return out

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON plus the bytes of every reference image."""
        h = hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode())
        for c in self.characters:
            for p in c.reference_images:
                h.update(Path(p).read_bytes())
        return h.hexdigest()


def _frame_json(f: Frame) -> Dict[str, Any]:
    d: Dict[str, Any] = {"prompt": f.prompt, "characters": list(f.characters)}
    if f.regions:
        # only when set, so stories without a layout keep their fingerprint (and resume)
        d["regions"] = {n: list(b) for n, b in f.regions}
    return d


def _is_str(x) -> bool:
    return isinstance(x, str)


def is_box(box) -> bool:
    """``[x0, y0, x1, y1]`` of numbers with ``0 <= x0 < x1 <= 1`` and ``0 <= y0 < y1 <= 1``
    (a region of a story frame or of a training line)."""
    ok = (isinstance(box, list) and len(box) == 4
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box))
    return ok and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1


def _parse_regions(raw, present: List[str], where: str, errors: List[str]) -> tuple:
    """A frame's ``regions``: {name: [x0, y0, x1, y1]} for characters the frame names."""
    if not isinstance(raw, dict):
        errors.append(f"{where}.regions: expected an object {{character name: [x0, y0, x1, y1]}}, "
                      f"got {type(raw).__name__}")
        return ()
    out = []
    for name, box in raw.items():
        rw = f"{where}.regions.{name}"
        if name not in present:
            errors.append(f"{rw}: {name!r} is not one of the frame's characters "
                          f"({', '.join(present) or 'none'})")
            continue
        if not is_box(box):
            errors.append(f"{rw}: expected [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and "
                          f"0 <= y0 < y1 <= 1 (fractions of the frame), got {box!r}")
            continue
        out.append((name, tuple(float(v) for v in box)))
    return tuple(out)


def parse_story(obj: Any, base_dir: Optional[Path] = None, source: str = "story",
                check_files: bool = True) -> Story:
    """Validate a decoded story JSON object; raise :class:`StoryError` naming bad fields.

    Reference image paths are resolved against ``base_dir`` (the story file's folder).
    """
    errors: List[str] = []
    if not isinstance(obj, dict):
        raise StoryError([f"top level: expected a JSON object, got {type(obj).__name__}"], source)
    known = {"title", "style", "negative_prompt", "characters", "frames"}
    for key in obj:
        if key not in known:
            errors.append(f"{key}: unknown field (allowed: {', '.join(sorted(known))})")

    title = obj.get("title", "")
    if not _is_str(title):
        errors.append(f"title: expected a string, got {type(title).__name__}")
        title = ""
    style = obj.get("style", "")
    if not _is_str(style):
        errors.append(f"style: expected a string, got {type(style).__name__}")
        style = ""
    negative = obj.get("negative_prompt", "")
    if not _is_str(negative):
        errors.append(f"negative_prompt: expected a string, got {type(negative).__name__}")
        negative = ""

    characters: List[Character] = []
    raw_chars = obj.get("characters", [])
    if not isinstance(raw_chars, list):
        errors.append(f"characters: expected a list, got {type(raw_chars).__name__}")
        raw_chars = []
    seen: Dict[str, int] = {}
    for i, c in enumerate(raw_chars):
        where = f"characters[{i}]"
        if not isinstance(c, dict):
            errors.append(f"{where}: expected an object with name and description, got "
                          f"{type(c).__name__}")
            continue
        for key in c:
            if key not in ("name", "description", "reference_images"):
                errors.append(f"{where}.{key}: unknown field (allowed: name, description, "
                              "reference_images)")
        name = c.get("name")
        if not _is_str(name) or not name.strip():
            errors.append(f"{where}.name: expected a non-empty string, got {name!r}")
            continue
        if name in seen:
            errors.append(f"{where}.name: duplicate character {name!r} (also characters"
                          f"[{seen[name]}])")
            continue
        seen[name] = i
        desc = c.get("description", "")
        if not _is_str(desc):
            errors.append(f"{where}.description: expected a string, got {type(desc).__name__}")
            desc = ""
        refs = c.get("reference_images", [])
        if not isinstance(refs, list):
            errors.append(f"{where}.reference_images: expected a list of image paths, got "
                          f"{type(refs).__name__}")
            refs = []
        paths = []
        for j, r in enumerate(refs):
            rw = f"{where}.reference_images[{j}]"
            if not _is_str(r) or not r:
                errors.append(f"{rw}: expected an image path, got {r!r}")
                continue
            p = Path(r)
            if not p.is_absolute() and base_dir is not None:
                p = base_dir / p
            if p.suffix.lower() not in _IMAGE_SUFFIXES:
                errors.append(f"{rw}: {r!r} is not an image file "
                              f"({', '.join(sorted(_IMAGE_SUFFIXES))})")
                continue
            if check_files:
                try:
                    found = p.is_file()
                except (OSError, ValueError) as e:  # name too long, NUL byte, ...
                    errors.append(f"{rw}: cannot look up {r[:60]!r}: "
                                  f"{getattr(e, 'strerror', None) or e}")
                    continue
                if not found:
                    errors.append(f"{rw}: file not found: {p}")
                    continue
            paths.append(str(p))
        characters.append(Character(name, desc, tuple(paths)))

    frames: List[Frame] = []
    raw_frames = obj.get("frames")
    if raw_frames is None:
        errors.append("frames: missing (a story needs at least one frame)")
        raw_frames = []
    elif not isinstance(raw_frames, list):
        errors.append(f"frames: expected a list, got {type(raw_frames).__name__}")
        raw_frames = []
    elif not raw_frames:
        errors.append("frames: empty (a story needs at least one frame)")
    names = ", ".join(seen) or "none defined"
    for i, fr in enumerate(raw_frames):
        where = f"frames[{i}]"
        if _is_str(fr):
            fr = {"prompt": fr}
        if not isinstance(fr, dict):
            errors.append(f"{where}: expected an object with a prompt, got {type(fr).__name__}")
            continue
        for key in fr:
            if key not in ("prompt", "characters", "regions"):
                errors.append(f"{where}.{key}: unknown field (allowed: prompt, characters, "
                              f"regions)")
        prompt = fr.get("prompt")
        if not _is_str(prompt) or not prompt.strip():
            errors.append(f"{where}.prompt: expected a non-empty string, got {prompt!r}")
            prompt = ""
        present = fr.get("characters", [])
        if not isinstance(present, list):
            errors.append(f"{where}.characters: expected a list of character names, got "
                          f"{type(present).__name__}")
            present = []
        ok = []
        for j, name in enumerate(present):
            cw = f"{where}.characters[{j}]"
            if not _is_str(name):
                errors.append(f"{cw}: expected a character name, got {name!r}")
            elif name not in seen:
                errors.append(f"{cw}: unknown character {name!r} (known: {names})")
            elif name in ok:
                errors.append(f"{cw}: character {name!r} listed twice")
            else:
                ok.append(name)
        regions = _parse_regions(fr["regions"], ok, where, errors) if "regions" in fr else ()
        frames.append(Frame(prompt, tuple(ok), regions))
    if errors:
        raise StoryError(errors, source)
    return Story(title, style, characters, frames, source, negative)


def load_story(path) -> Story:
    """Read and validate a story JSON file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise StoryError([f"cannot read the file: {e}"], str(path)) from None
    except UnicodeDecodeError as e:
        raise StoryError([f"byte {e.start}: not UTF-8 text (save the story as UTF-8 JSON)"],
                         str(path)) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise StoryError([f"line {e.lineno} column {e.colno}: invalid JSON: {e.msg}"],
                         str(path)) from None
    except RecursionError:
        raise StoryError(["invalid story: JSON nested too deeply"], str(path)) from None
    return parse_story(obj, base_dir=path.parent, source=str(path))


# ------------------------------------------------------------------------------------------
# built-in demo: a snowman who meets a fox (100 frames)

_DEMO_ACTS = [
    # (frames in this act, characters, scenes); scenes cycle with the settings below
    (12, ["Snowman"], [
        "the snowman stands alone in a quiet snowy field",
        "the snowman looks up at the falling snow",
        "the snowman watches the sunrise over the hills",
        "the snowman waves at a bird on a tree",
        "the snowman sits still as the wind blows",
        "the snowman looks at the frozen pond",
    ]),
    (10, ["Fox"], [
        "a fox runs through the winter forest",
        "a fox sniffs the snow near a tree",
        "a fox jumps over a log in the woods",
        "a fox looks out from behind a tree",
        "a fox walks across the frozen river",
    ]),
    (14, ["Snowman", "Fox"], [
        "the fox finds the snowman in the field",
        "the fox and the snowman look at each other",
        "the fox sits near the snowman, curious",
        "the snowman smiles at the shy fox",
        "the fox sniffs the carrot nose of the snowman",
        "the snowman and the fox say hello",
        "the fox hides behind the snowman",
    ]),
    (20, ["Snowman", "Fox"], [
        "the snowman and the fox play in the snow",
        "the fox runs around the snowman, laughing",
        "the snowman and the fox build a little snow house",
        "the fox jumps into a pile of snow next to the snowman",
        "the snowman and the fox watch the stars at night",
        "the fox sleeps next to the snowman under the moon",
        "the snowman and the fox walk to the frozen lake",
        "the fox and the snowman dance in the falling snow",
        "the snowman gives the fox his scarf",
        "the fox brings the snowman a pine branch",
    ]),
    (12, ["Snowman", "Fox"], [
        "a storm comes over the hills, the fox and the snowman look at the dark clouds",
        "the fox stands in front of the snowman in the wind",
        "the snowman shields the fox from the storm",
        "the fox and the snowman wait for the storm to pass",
        "after the storm the fox digs the snowman out of the snow",
        "the snowman and the fox see the morning sun again",
    ]),
    (16, ["Snowman", "Fox"], [
        "spring is coming, the sun is warm, the snowman and the fox sit in the field",
        "the snowman is melting a little, the fox looks sad",
        "the fox brings snow to the snowman to keep him cold",
        "the fox and the snowman watch the first flowers",
        "the snowman hugs the fox in the warm evening",
        "the fox and the snowman look at the river with melting ice",
        "the snowman is smaller now, the fox sits close to him",
        "the fox sleeps by the little snowman at sunset",
    ]),
    (10, ["Fox"], [
        "the fox finds the snowman's scarf and carrot in the green meadow",
        "the fox holds the scarf and looks at the sky",
        "the fox sits alone in the spring meadow with the scarf",
        "the fox walks through the forest with the scarf",
        "the fox lies in the grass next to the carrot, remembering",
    ]),
    (6, ["Snowman", "Fox"], [
        "winter again, the first snow falls, the fox waits in the field",
        "a new snowman with the same scarf stands in the field, the fox runs to him",
        "the fox and the snowman are together again in the snow",
    ]),
]


def demo_story() -> Story:
    """The built-in 100-frame story: a snowman who meets a fox."""
    frames: List[Frame] = []
    for count, chars, scenes in _DEMO_ACTS:
        for i in range(count):
            frames.append(Frame(scenes[i % len(scenes)], tuple(chars)))
    assert len(frames) == 100
    return Story(
        title="The Snowman and the Fox",
        style="children's book illustration, soft watercolor, winter colors",
        characters=[
            Character("Snowman", "a cheerful snowman with a carrot nose, coal eyes and a red scarf"),
            Character("Fox", "a small red fox with a white-tipped tail and black ears"),
        ],
        frames=frames,
        source="<built-in demo>",
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.story",
                                 description="Validate a story file or print the built-in demo.")
    ap.add_argument("file", nargs="?", help="story JSON to validate")
    ap.add_argument("--demo", action="store_true", help="print the built-in demo story as JSON")
    args = ap.parse_args(argv)
    if args.demo or not args.file:
        json.dump(demo_story().to_json(), sys.stdout, indent=1)
        print()
        return 0
    try:
        story = load_story(args.file)
    except StoryError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{args.file}: ok: {story.title!r}, {len(story.characters)} characters, "
          f"{len(story.frames)} frames")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
