"""``python -m pipelines.vistorybench``: list, convert and export ViStoryBench stories.

::

    python -m pipelines.vistorybench list ROOT [--lang ch]
    python -m pipelines.vistorybench convert ROOT --out stories/ [--lang ch]
        [--split lite|full | --stories 01,05,... | --stories-file ids.txt] [--skip-bad-shots]
    python -m pipelines.vistorybench export RUN_DIR [RUN_DIR ...] --to DIR --method NAME
        [--mode base] [--timestamp YYYYMMDD-HHMMSS]

``convert`` writes one story JSON per story (``<id>.json``, the format of
``python -m pipelines.story_iter --story``, reference images by absolute path) and
checks every story first: a malformed one stops the conversion with every problem named.
``export`` copies finished runs' last rounds into the evaluator's layout, all under one
timestamp folder (one run, as the evaluator counts runs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from pipelines.cli_common import UsageError
from pipelines.story import StoryError


def _select(root: Path, args) -> List[str]:
    from pipelines.vistorybench.layout import story_ids
    from pipelines.vistorybench.splits import split_ids

    have = story_ids(root)
    want: Optional[List[str]] = None
    if args.stories:
        want = [s.strip() for s in args.stories.split(",") if s.strip()]
    elif args.stories_file:
        try:
            text = Path(args.stories_file).read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--stories-file {args.stories_file}: {e.strerror}") from None
        want = [t for line in text.splitlines() for t in line.split("#")[0].replace(",", " ")
                .split()]
    if want is None:
        return split_ids(args.split, have)
    missing = [s for s in want if s not in have]
    if missing:
        raise UsageError(f"story id(s) {', '.join(missing)} not in {root} (it has "
                         f"{', '.join(have[:8])}{' ...' if len(have) > 8 else ''})")
    return want


def _export(args) -> int:
    from pipelines.vistorybench.export import run_frames
    from pipelines.vistorybench.layout import TIMESTAMP_FORMAT, check_timestamp, export_frames

    # one timestamp for every run given: the evaluator pools a timestamp folder as one run
    ts = check_timestamp(args.timestamp) if args.timestamp else time.strftime(TIMESTAMP_FORMAT)
    runs, seen = [], {}
    for rd in args.run_dir:   # every run checked before the first picture is copied
        frames, indices, story_dir, lang = run_frames(rd, args.lang)
        key = (lang, story_dir.name)
        if key in seen:
            raise UsageError(f"{rd} and {seen[key]} are both story {story_dir.name} ({lang}); "
                             "one run folder holds one picture set per story")
        seen[key] = rd
        runs.append((frames, indices, story_dir.name, lang))
    to = args.to[len("vistorybench:"):] if args.to.startswith("vistorybench:") else args.to
    for frames, indices, sid, lang in runs:
        dest = export_frames(frames, indices, to, args.method, sid, lang, args.mode, ts)
        print(f"exported: {dest}/")
    return 0


def main(argv=None) -> int:
    from pipelines.vistorybench.splits import SPLITS

    ap = argparse.ArgumentParser(prog="python -m pipelines.vistorybench",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="story ids, shots and characters of a dataset root")
    p.add_argument("root")
    p.add_argument("--lang", choices=["en", "ch"], default="en")
    p.add_argument("--skip-bad-shots", action="store_true",
                   help="drop shots missing a field, with a warning, as ViStoryBench's loader does")
    p = sub.add_parser("convert", help="dataset stories -> story JSON files")
    p.add_argument("root", help="the dataset folder holding 01/, 02/, ...")
    p.add_argument("--out", required=True, help="folder for <id>.json")
    p.add_argument("--lang", choices=["en", "ch"], default="en")
    p.add_argument("--skip-bad-shots", action="store_true",
                   help="drop shots missing a field, with a warning, as ViStoryBench's loader "
                        "does (default: refuse the story)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--split", choices=SPLITS, default="full",
                   help="full: every story of ROOT (default); lite: ViStoryBench's 20 Lite "
                        "stories (pipelines/vistorybench/lite.json)")
    g.add_argument("--stories", help="comma-separated story ids")
    g.add_argument("--stories-file", help="file of story ids (# starts a comment)")
    p = sub.add_parser("export", help="finished story_iter runs -> the evaluator's layout")
    p.add_argument("run_dir", nargs="+", help="story_iter output folders (one per story)")
    p.add_argument("--to", required=True, help="outputs root the evaluator reads")
    p.add_argument("--method", required=True)
    p.add_argument("--mode", default="base")
    p.add_argument("--lang", choices=["en", "ch"])
    p.add_argument("--timestamp", metavar="YYYYMMDD-HHMMSS",
                   help="the run folder every story lands in (default: now, once for all)")
    args = ap.parse_args(argv)

    from pipelines.vistorybench.layout import read_story

    try:
        if args.cmd == "export":
            return _export(args)
        root = Path(args.root)
        if args.cmd == "list":
            from pipelines.vistorybench.layout import story_ids

            for sid in story_ids(root):
                story, _ = read_story(root / sid, args.lang, args.skip_bad_shots)
                refs = sum(len(c.reference_images) for c in story.characters)
                print(f"{sid}: {len(story.frames)} shots, {len(story.characters)} characters, "
                      f"{refs} reference images")
            return 0
        ids = _select(root, args)
        stories = [(sid, read_story(root / sid, args.lang, args.skip_bad_shots)[0])
                   for sid in ids]  # all checked before anything is written
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for sid, story in stories:
            (out / f"{sid}.json").write_text(
                json.dumps(story.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")
        print(f"converted {len(stories)} stories ({args.lang}) into {out}/")
        return 0
    except (StoryError, FileExistsError, ValueError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
