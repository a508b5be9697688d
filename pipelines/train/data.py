"""Datasets of ``python -m pipelines.train`` and the deterministic step sampler.

Stage ``gsa``: a folder of story groups in the image-folder layout::

    DATA/metadata.jsonl       {"file_name": "fox/001.png", "text": "...", "group": "fox"}
    DATA/fox/001.png ...

``metadata.jsonl`` files may also sit in sub-folders (``file_name`` is relative to
the folder of the metadata file that names it).  A line may name its own references,
``"references": ["fox/ref.png", "owl/ref.png"]`` (file names of other lines of the same
metadata file): that target then reads those (``--num-refs`` of them, drawn each step)
instead of random members of its group, e.g. each character's reference sheet for a frame
showing two characters, so the model learns which reference belongs to whom.  Such a
line may add ``"regions"``: one box ``[x0, y0, x1, y1]`` (fractions of the frame) or null per
reference, where that character stands: the target's image tokens then read each
reference only inside its box (``storyattn.region_masks``), as at inference with a
layout, and a target that names fewer references than ``--num-refs`` reads exactly those
(the other slots are left empty, not filled by repeats).  ``group`` defaults to the folder
that holds the image.  Groups with fewer than 2 images are skipped with a warning;
images that exist but do not decode are skipped and reported by path; a metadata
line that names a missing file is an error.

Stage ``dpo``: ``pairs.jsonl`` (``--data`` is the file or a folder holding it), one
JSON object per line, paths relative to the file::

    {"prompt": "...", "references": ["r1.png", "r2.png"], "winner": "w.png", "loser": "l.png"}

or a pool per scenario, expanded into every (winner, loser) combination::

    {"scenario": "s1", "prompt": "...", "references": [...], "winners": [...], "losers": [...]}

A line may add ``"regions"`` as in stage gsa (one box or null per reference, where the
candidates read it): winner and loser then read each reference inside its box, every
reference of the line is read (up to ``--num-refs``), and unused slots stay empty.

Every file named must exist and decode, else training does not start.

Sampling (both stages) is a pure function of ``(seed, step, process index)``: no
DataLoader state to save, and a resumed run draws exactly what an uninterrupted run
draws.  Within an epoch every item is a target once (a seeded permutation per
epoch), spread over processes and batch slots.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..cli_common import UsageError
from ..story import is_box

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class DataError(UsageError):
    """Bad training data: raised before any training step, with a readable message."""


def _warn(msg: str) -> None:
    print(f"[train] warning: {msg}", flush=True)


# ----------------------------------------------------------------------------------------
# images


def check_image(path: Path) -> Optional[str]:
    """None if ``path`` decodes as an image, else the reason it does not."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        return f"{type(exc).__name__}: {exc}"


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """RGB image -> float32 ``[3, res, res]`` in [-1, 1]: shorter side resized to
    ``resolution`` (bicubic), then centre-cropped."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------
# stage gsa: story groups


@dataclass
class StoryGroupDataset:
    """Images with captions, grouped by story; only groups with >= 2 images."""

    paths: List[Path]
    captions: List[str]
    group_of: List[int]                 # item -> group index
    groups: List[List[int]]             # group index -> items
    group_names: List[str]
    skipped: Dict[str, str] = field(default_factory=dict)   # path -> reason
    # item -> the items it reads as references (its line's "references"), None = its group
    refs_of: List[Optional[List[int]]] = field(default_factory=list)
    # item -> one box (or None) per named reference (its line's "regions"), None = no layout
    regions_of: List[Optional[List[Optional[Tuple[float, float, float, float]]]]] = \
        field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def _read_jsonl(path: Path) -> List[Tuple[int, dict]]:
    rows = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append((lineno, obj))
    return rows


def load_story_groups(data_dir, min_group_size: int = 2) -> StoryGroupDataset:
    """Read every ``metadata.jsonl`` under ``data_dir`` and check the images."""
    root = Path(data_dir)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"--data {root} must be a folder of story groups with a metadata.jsonl "
                        f"(stage gsa)")
    metas = sorted(root.rglob("metadata.jsonl"))
    if not metas:
        raise DataError(f"no metadata.jsonl under {root}: stage gsa needs lines like "
                        f'{{"file_name": "group/img.png", "text": "caption", "group": "group"}}')
    entries: List[Tuple[Path, str, str]] = []
    named_refs: Dict[Path, Tuple[List[Path], str]] = {}     # target -> (refs, where)
    named_regions: Dict[Path, list] = {}                   # target -> boxes
    missing: List[str] = []
    for meta in metas:
        for lineno, obj in _read_jsonl(meta):
            if "file_name" not in obj:
                raise DataError(f"{meta}:{lineno}: missing 'file_name'")
            path = (meta.parent / obj["file_name"]).resolve()
            text = obj.get("text", obj.get("caption", ""))
            if not isinstance(text, str):
                raise DataError(f"{meta}:{lineno}: 'text' must be a string")
            group = obj.get("group")
            if group is None:
                group = str(Path(obj["file_name"]).parent)
                if group in ("", "."):
                    raise DataError(f"{meta}:{lineno}: no 'group' and the image is not in a "
                                    f"sub-folder, so its story group is unknown")
            group = f"{meta.parent.relative_to(root)}::{group}" if meta.parent != root else str(group)
            if not path.is_file():
                missing.append(f"{path} (named in {meta}:{lineno})")
                continue
            refs = obj.get("references")
            if refs is not None:
                if not (isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)):
                    raise DataError(f"{meta}:{lineno}: 'references' must be a non-empty list of "
                                    f"file names of other lines")
                named_refs[path] = ([(meta.parent / r).resolve() for r in refs], f"{meta}:{lineno}")
            if "regions" in obj:
                if refs is None:
                    raise DataError(f"{meta}:{lineno}: 'regions' needs 'references' (one box per "
                                    f"reference)")
                named_regions[path] = _read_regions(obj["regions"], len(refs), f"{meta}:{lineno}")
            entries.append((path, text, group))
    if missing:
        shown = "\n  ".join(missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise DataError(f"{len(missing)} image(s) named in metadata do not exist:\n  {shown}{more}")

    skipped: Dict[str, str] = {}
    good: List[Tuple[Path, str, str]] = []
    for path, text, group in entries:
        reason = check_image(path)
        if reason is None:
            good.append((path, text, group))
        else:
            skipped[str(path)] = reason
            _warn(f"unreadable image skipped: {path} ({reason})")

    by_group: Dict[str, List[Tuple[Path, str]]] = {}
    for path, text, group in good:
        by_group.setdefault(group, []).append((path, text))
    paths, captions, group_of, groups, names = [], [], [], [], []
    for name in sorted(by_group):
        members = by_group[name]
        if len(members) < min_group_size:
            _warn(f"group {name!r} has {len(members)} usable image(s) (< {min_group_size}); skipped")
            continue
        gi = len(groups)
        names.append(name)
        idxs = []
        for path, text in members:
            idxs.append(len(paths))
            paths.append(path)
            captions.append(text)
            group_of.append(gi)
        groups.append(idxs)
    if not paths:
        raise DataError(f"no usable story group under {root}: every group has fewer than "
                        f"{min_group_size} readable images ({len(entries)} entries, "
                        f"{len(skipped)} unreadable)")
    index = {p: i for i, p in enumerate(paths)}
    refs_of: List[Optional[List[int]]] = [None] * len(paths)
    for target, (refs, where) in named_refs.items():
        if target not in index:
            continue                               # skipped above (unreadable, small group)
        bad = [str(r) for r in refs if r not in index or r == target]
        if bad:
            raise DataError(f"{where}: reference {bad[0]} is not another usable line of the "
                            f"data (name a file_name that has its own metadata line)")
        refs_of[index[target]] = [index[r] for r in refs]
    regions_of = [named_regions.get(p) for p in paths]
    return StoryGroupDataset(paths, captions, group_of, groups, names, skipped, refs_of,
                             regions_of)


def _read_regions(regions, n_refs: int, where: str):
    """A line's ``"regions"``: ``n_refs`` entries, each null or [x0, y0, x1, y1] in [0, 1]."""
    if not isinstance(regions, list) or len(regions) != n_refs:
        raise DataError(f"{where}: 'regions' must be a list of {n_refs} entries (one box or null "
                        f"per reference)")
    out = []
    for box in regions:
        if box is None:
            out.append(None)
            continue
        if not is_box(box):
            raise DataError(f"{where}: region {box!r} is not [x0, y0, x1, y1] with 0 <= x0 < x1 "
                            f"<= 1 and 0 <= y0 < y1 <= 1 (fractions of the frame)")
        out.append(tuple(float(v) for v in box))
    return out


# ----------------------------------------------------------------------------------------
# stage dpo: preference pairs


@dataclass
class PreferencePairs:
    prompts: List[str]
    references: List[List[Path]]
    winners: List[Path]
    losers: List[Path]
    scenario: List[str]
    # per pair: one box (or None) per reference, or None for a line without "regions"
    regions: List[Optional[List[Optional[Tuple[float, float, float, float]]]]] = field(
        default_factory=list)

    def __len__(self) -> int:
        return len(self.winners)

    def all_images(self) -> List[Path]:
        seen, out = set(), []
        for p in [*self.winners, *self.losers, *(r for refs in self.references for r in refs)]:
            if p not in seen:
                seen.add(p)
                out.append(p)
        return out


def load_preference_pairs(data) -> PreferencePairs:
    """Read ``pairs.jsonl`` (or a folder holding it); every named file must decode."""
    path = Path(data)
    if not path.exists():
        raise DataError(f"DPO data {path} does not exist")
    if path.is_dir():
        path = path / "pairs.jsonl"
        if not path.is_file():
            raise DataError(f"no pairs.jsonl in {Path(data)}: stage dpo needs lines like "
                            f'{{"prompt": ..., "references": [...], "winner": ..., "loser": ...}}')
    base = path.parent
    prompts, refs, winners, losers, scen, boxes = [], [], [], [], [], []
    problems: List[str] = []

    def resolve(rel, where) -> Path:
        if not isinstance(rel, str) or not rel:
            raise DataError(f"{where}: image paths must be non-empty strings, got {rel!r}")
        p = (base / rel).resolve()
        if not p.is_file():
            problems.append(f"{p} (named in {where}): file does not exist")
        return p

    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            raise DataError(f"{where}: 'prompt' (a string) is required")
        ref_list = obj.get("references", [])
        if not isinstance(ref_list, list) or not ref_list:
            raise DataError(f"{where}: 'references' must be a non-empty list of image paths "
                            f"(the targets read their image tokens)")
        ref_paths = [resolve(r, where) for r in ref_list]
        line_boxes = (_read_regions(obj["regions"], len(ref_list), where)
                      if obj.get("regions") is not None else None)
        if "winner" in obj or "loser" in obj:
            if "winner" not in obj or "loser" not in obj:
                raise DataError(f"{where}: a pair needs both 'winner' and 'loser'")
            pairs = [(obj["winner"], obj["loser"])]
        elif "winners" in obj and "losers" in obj:
            ws, ls = obj["winners"], obj["losers"]
            if not isinstance(ws, list) or not isinstance(ls, list) or not ws or not ls:
                raise DataError(f"{where}: 'winners' and 'losers' must be non-empty lists")
            pairs = [(w, l) for w in ws for l in ls]
        else:
            raise DataError(f"{where}: needs 'winner'+'loser' or 'winners'+'losers'")
        for w, l in pairs:
            prompts.append(prompt)
            refs.append(ref_paths)
            winners.append(resolve(w, where))
            losers.append(resolve(l, where))
            scen.append(str(obj.get("scenario", lineno)))
            boxes.append(line_boxes)
    if not winners:
        raise DataError(f"{path} holds no pairs")
    checked = set()
    for p in [*winners, *losers, *(r for rs in refs for r in rs)]:
        if p in checked or not p.is_file():
            continue
        checked.add(p)
        reason = check_image(p)
        if reason is not None:
            problems.append(f"{p}: unreadable image ({reason})")
    if problems:
        uniq = list(dict.fromkeys(problems))
        shown = "\n  ".join(uniq[:20])
        more = f"\n  ... and {len(uniq) - 20} more" if len(uniq) > 20 else ""
        raise DataError(f"{len(uniq)} problem(s) with the images named in {path}:\n  {shown}{more}")
    return PreferencePairs(prompts, refs, winners, losers, scen, boxes)


# ----------------------------------------------------------------------------------------
# deterministic sampling


def step_rng(seed: int, step: int, rank: int, stream: int) -> np.random.Generator:
    """numpy generator for one (seed, step, process, purpose)."""
    return np.random.default_rng([int(seed), int(step), int(rank), int(stream)])


def step_torch_generator(seed: int, step: int, rank: int, stream: int) -> torch.Generator:
    """CPU torch generator for one (seed, step, process, purpose)."""
    s = int(step_rng(seed, step, rank, stream).integers(0, 2**63 - 1))
    return torch.Generator(device="cpu").manual_seed(s)


class StepSampler:
    """Which items are targets at a given step, on a given process.

    Global slot ``g = (step * world + rank) * batch + i`` is item
    ``perm_e[g mod n]`` with ``e = g // n`` and ``perm_e`` a permutation seeded by
    ``(seed, e)``: one pass over the data per epoch, shared by all processes.
    """

    def __init__(self, n_items: int, batch_size: int, world_size: int, seed: int):
        if n_items <= 0:
            raise DataError("the dataset is empty")
        self.n, self.batch, self.world, self.seed = n_items, batch_size, world_size, seed
        self._perm_cache: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, epoch, 0x5A5A])
            self._perm_cache[epoch] = rng.permutation(self.n)
        return self._perm_cache[epoch]

    def indices(self, step: int, rank: int) -> List[int]:
        out = []
        for i in range(self.batch):
            g = (step * self.world + rank) * self.batch + i
            out.append(int(self._perm(g // self.n)[g % self.n]))
        return out

    def epoch(self, step: int) -> float:
        return (step + 1) * self.world * self.batch / self.n


def choose(rng: np.random.Generator, pool: Sequence[int], k: int) -> List[int]:
    """``k`` distinct entries of ``pool`` if it has that many, else all of them
    (shuffled) repeated cyclically to ``k``."""
    pool = list(pool)
    if not pool:
        raise DataError("cannot choose references from an empty pool")
    if len(pool) >= k:
        return [pool[j] for j in rng.choice(len(pool), size=k, replace=False)]
    order = [pool[j] for j in rng.permutation(len(pool))]
    return [order[j % len(order)] for j in range(k)]


def describe_groups(ds: StoryGroupDataset, num_refs: int) -> str:
    small = sum(1 for g in ds.groups if len(g) - 1 < num_refs)
    msg = f"{len(ds)} images in {len(ds.groups)} story groups"
    if small:
        msg += (f"; {small} group(s) have fewer than {num_refs} other images, so their "
                f"references repeat")
    return msg
