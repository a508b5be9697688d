"""README's first picture: the frames of a ``python -m pipelines.story_iter`` run, one row per
round, with the story-world reader's metrics for that round beside it.

    python tools/demo_picture.py RUN_DIR docs/img/demo-rounds.png [--frames 12] [--scale 2]

RUN_DIR is a finished run of a story-world story (the default demo is one); the metrics come
from :func:`pipelines.world.metrics.round_metrics`, the same figures the contact sheet shows.
Above the rounds: each frame's characters as their reference images show them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("out")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--scale", type=int, default=2)
    args = ap.parse_args(argv)
    from PIL import Image, ImageDraw

    from pipelines.run_folder import frame_path
    from pipelines.story import load_story
    from pipelines.world.metrics import round_metrics

    run = Path(args.run_dir)
    man_file = run / "manifest.json"
    if not man_file.is_file():
        ap.error(f"{run}: no manifest.json (pass a finished story_iter output folder)")
    man = json.loads(man_file.read_text())
    metrics = round_metrics(run, man)
    if metrics is None:
        ap.error(f"{run}: not a story-world run (its prompts are not the world's)")
    story = load_story(man["story"]["source"])
    n = min(args.frames, man["config"]["frames"])
    size = 64 * args.scale
    label_w, pad = 300, 4
    refs = {c.name: Image.open(c.reference_images[0]).convert("RGB")
            for c in story.characters if c.reference_images}
    rounds = sorted(metrics)
    rows = 1 + len(rounds)
    sheet = Image.new("RGB", (label_w + n * (size + pad), rows * (size + pad) + 22), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), f"{story.title}: frames 1-{n} (columns) in every round (rows); "
              f"identity is never in a prompt", fill="black")
    y = 22
    draw.text((4, y + size // 2 - 6), "who (reference images)", fill="black")
    for i in range(n):
        names = story.frames[i].characters
        cell = Image.new("RGB", (size, size), "white")
        for k, name in enumerate(names):
            if name in refs:
                w = size // len(names)
                cell.paste(refs[name].resize((w, w), Image.NEAREST), (k * w, (size - w) // 2))
        sheet.paste(cell, (label_w + i * (size + pad), y))
    for r in rounds:
        y += size + pad
        m = metrics[r]
        text = (f"round {r}\nidentity-self {m['identity_self']:.2f}\n"
                f"identity-cross {m['identity_cross']:.2f}\nadherence {m['prompt_adherence']:.2f}")
        draw.multiline_text((4, y + 4), text, fill="black")
        for i in range(n):
            with Image.open(frame_path(run, r, i)) as im:
                sheet.paste(im.convert("RGB").resize((size, size), Image.NEAREST),
                            (label_w + i * (size + pad), y))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({len(rounds)} rounds x {n} frames)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
