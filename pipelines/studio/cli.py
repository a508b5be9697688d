"""``python -m pipelines.studio ROOT [--host H] [--port P] [--cache-dir D]`` serves the studio;
``python -m pipelines.studio export SET_DIR [--out FILE]`` writes pairs.jsonl without it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["main"]


def _export(argv: List[str]) -> int:
    from pipelines.studio.pairs import ExportError, export_pairs

    ap = argparse.ArgumentParser(prog="python -m pipelines.studio export",
                                 description="Write pairs.jsonl (scenario pools) from a candidate "
                                             "set's labels, for python -m pipelines.train --stage dpo.")
    ap.add_argument("set_dir", help="a folder written by python -m pipelines.candidates")
    ap.add_argument("--out", help="default: SET_DIR/pairs.jsonl")
    args = ap.parse_args(argv)
    try:
        res = export_pairs(args.set_dir, args.out)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {res['path']}: {res['pairs']} pairs from {res['scenarios']} scenario(s)"
          + (f"; {len(res['skipped'])} without both a winner and a loser skipped"
             if res["skipped"] else ""))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return _export(argv[1:])
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.studio",
        description="A local page over the Story-Iter runs and candidate sets under ROOT: "
                    "contact sheets, frame viewer, labelling, export of pairs.jsonl.",
        epilog="also: python -m pipelines.studio export SET_DIR [--out FILE]")
    ap.add_argument("root", help="folder with runs (manifest.json) and candidate sets "
                                 "(candidates.json) anywhere below it")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default: this machine only)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--cache-dir", help="thumbnail cache (default ROOT/.studio/thumbs)")
    args = ap.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"error: ROOT {args.root} is not a folder; pass the folder holding your runs",
              file=sys.stderr)
        return 2
    try:
        import uvicorn

        from pipelines.studio.app import create_app
    except ImportError as e:
        print(f"error: the studio needs fastapi and uvicorn ({e}); pip install "
              "'storyattn[studio]'", file=sys.stderr)
        return 2
    app = create_app(args.root, args.cache_dir)
    print(f"studio: serving {Path(args.root).resolve()} at http://{args.host}:{args.port}/",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
