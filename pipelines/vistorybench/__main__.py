"""``python -m pipelines.vistorybench``: list, convert and export ViStoryBench stories.

::

    python -m pipelines.vistorybench list ROOT
    python -m pipelines.vistorybench convert ROOT --out stories/ [--lang ch]
        [--stories 01,05,...|--stories-file lite.txt]      # Lite = its story ids
    python -m pipelines.vistorybench export RUN_DIR --to DIR --method NAME [--mode base]

``convert`` writes one story JSON per story (``<id>.json``, the format of
``python -m pipelines.story_iter --story``, reference images by absolute path) and
checks every story first: a malformed one stops the conversion with every problem named.
``export`` copies a finished run's last round into the evaluator's layout.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from pipelines.cli_common import UsageError
from pipelines.story import StoryError


def _select(root: Path, args) -> List[str]:
    from pipelines.vistorybench.layout import story_ids

    have = story_ids(root)
    want: Optional[List[str]] = None
    if args.stories:
        want = [s.strip() for s in args.stories.split(",") if s.strip()]
    elif args.stories_file:
        try:
            text = Path(args.stories_file).read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--stories-file {args.stories_file}: {e.strerror}") from None
        want = [t for t in text.replace(",", " ").split() if not t.startswith("#")]
    if want is None:
        return have
    missing = [s for s in want if s not in have]
    if missing:
        raise UsageError(f"story id(s) {', '.join(missing)} not in {root} (it has "
                         f"{', '.join(have[:8])}{' ...' if len(have) > 8 else ''})")
    return want


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.vistorybench",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="story ids, shots and characters of a dataset root")
    p.add_argument("root")
    p.add_argument("--lang", choices=["en", "ch"], default="en")
    p = sub.add_parser("convert", help="dataset stories -> story JSON files")
    p.add_argument("root", help="the dataset folder holding 01/, 02/, ...")
    p.add_argument("--out", required=True, help="folder for <id>.json")
    p.add_argument("--lang", choices=["en", "ch"], default="en")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stories", help="comma-separated story ids (default: all = Full)")
    g.add_argument("--stories-file", help="file of story ids (e.g. the Lite split's)")
    p = sub.add_parser("export", help="a finished story_iter run -> the evaluator's layout")
    p.add_argument("run_dir")
    p.add_argument("--to", required=True, help="outputs root the evaluator reads")
    p.add_argument("--method", required=True)
    p.add_argument("--mode", default="base")
    p.add_argument("--lang", choices=["en", "ch"])
    args = ap.parse_args(argv)

    from pipelines.vistorybench.layout import read_story

    try:
        if args.cmd == "export":
            from pipelines.vistorybench.export import export_run

            dest = export_run(args.run_dir, args.to, args.method, args.mode, args.lang)
            print(f"exported: {dest}/")
            return 0
        root = Path(args.root)
        if args.cmd == "list":
            from pipelines.vistorybench.layout import story_ids

            for sid in story_ids(root):
                story, _ = read_story(root / sid, args.lang)
                refs = sum(len(c.reference_images) for c in story.characters)
                print(f"{sid}: {len(story.frames)} shots, {len(story.characters)} characters, "
                      f"{refs} reference images")
            return 0
        ids = _select(root, args)
        stories = [(sid, read_story(root / sid, args.lang)[0]) for sid in ids]  # all checked
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for sid, story in stories:
            (out / f"{sid}.json").write_text(
                json.dumps(story.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")
        print(f"converted {len(stories)} stories ({args.lang}) into {out}/")
        return 0
    except StoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileExistsError, ValueError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
