"""Why Story-Iter's rounds do not raise identity in the story world: is a previous-round frame
a bad reference because it is *flawed*, or because it is *one more* reference?

Every frame of a held-out world story is drawn by the world FLUX model with its stage-1 GSA
LoRA, reading its characters' reference images plus one extra image, which is either

  round-0 frame        the frame as Story-Iter's round 0 drew it (what round 1 reads with
                       ``--refs topk:1``)
  exact render         the same frame as the world's renderer draws it (every attribute right)
  ... of another frame the nearest other frame with the same cast, drawn either way

against the characters' images alone (round 0).  The same prompts and seeds in every row; the
exact reader scores them.  If extra exact renders help and extra round-0 frames hurt, the
rounds fall because stage 1 copies flawed references, not because of their number.

Usage:
  python benchmarks/bench_story_iter_refs.py [--seed 300] [--frames 100] [--steps 10]
Writes benchmarks/results/bench_story_iter_refs_{cpu,gpu}.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import environment, markdown_table, text_table, write_results  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=300, help="story seed; frame i uses seed + i")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=None, help="keep the story and round 0 here")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)

    from PIL import Image

    from storyattn import GroupSharedAttention
    from pipelines.run_folder import frame_path
    from pipelines.story import load_story
    from pipelines.story_iter.cli import main as story_iter_main
    from pipelines.world import data as D
    from pipelines.world import metrics as M
    from pipelines.world import render as R
    from pipelines.world import weights as W
    from pipelines.world_build.sample import draw, load_world

    if not W.available():
        raise SystemExit("no world weights: python -m pipelines.world_build build")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_si_refs_"))
    _, held = D.split_identities(0)
    story_file = D.make_story(work / "story", seed=args.seed, frames=args.frames, pool=held)
    st = load_story(story_file)
    world = json.loads((Path(story_file).parent / "world.json").read_text())
    idents = {n: R.Identity(**c["identity"]) for n, c in world["characters"].items()}
    # round 0 exactly as the benchmark's Story-Iter row draws it (characters' images)
    run = work / "round0"
    if story_iter_main(["--story", str(story_file), "--backbone", "flux", "--model", W.flux_path(),
                        "--lora", W.gsa_lora_path(), "--round0-refs", "characters",
                        "--rounds", "0", "--steps", str(args.steps), "--batch-size", "25",
                        "--frames", str(args.frames), "--height", "64", "--width", "64",
                        "--seed", str(args.seed), "--seed-per-frame", "--out", str(run),
                        "--no-step-progress", "--device", args.device]):
        raise SystemExit("story_iter round 0 failed")

    prompts = [f.prompt for f in st.frames]
    seeds = [args.seed + i for i in range(len(prompts))]
    char_img = {c.name: Image.open(c.reference_images[0]).convert("RGB") for c in st.characters}

    def exact(i):
        fr = world["frames"][i]
        return Image.fromarray(R.render_frame(
            fr["scene"], [R.Placement(idents[n], pos, size) for n, size, pos in fr["cast"]]))

    def drawn(i):
        return Image.open(frame_path(run, 0, i)).convert("RGB")

    def nearest_same_cast(i):
        cast = set(st.frames[i].characters)
        js = [j for j in range(len(prompts)) if j != i and set(st.frames[j].characters) == cast]
        return min(js, key=lambda j: (abs(j - i), j)) if js else i

    other = [nearest_same_cast(i) for i in range(len(prompts))]

    def refs_of(i, extra=None):
        names = st.frames[i].characters
        imgs, txt = [char_img[n] for n in names], list(names)
        if extra is not None:
            j, img = extra
            imgs.append(img)
            txt.append(prompts[j])
        return imgs, txt

    conds = [
        ("characters' images only (round 0)", lambda i: refs_of(i)),
        ("+ the round-0 frame", lambda i: refs_of(i, (i, drawn(i)))),
        ("+ the exact render of the frame", lambda i: refs_of(i, (i, exact(i)))),
        ("+ the round-0 frame of another frame", lambda i: refs_of(i, (other[i], drawn(other[i])))),
        ("+ the exact render of another frame", lambda i: refs_of(i, (other[i], exact(other[i])))),
    ]
    pipe = load_world(W.flux_path(), [W.gsa_lora_path()], device=args.device)
    gsa = GroupSharedAttention(pipe.transformer)
    rows = []
    for name, fn in conds:
        t0 = time.perf_counter()
        rr = [fn(i) for i in range(len(prompts))]
        imgs = draw(pipe, prompts, seeds, steps=args.steps, refs=[r[0] for r in rr],
                    ref_prompts=[r[1] for r in rr], gsa=gsa)
        s = M.score_frames(st, imgs)
        rows.append({"row": name, "identity_cross": round(s["identity_cross"], 3),
                     "solo": round(s["by_cast"]["solo"]["identity_cross"], 3),
                     "duo": round(s["by_cast"]["duo"]["identity_cross"], 3),
                     "identity_self": round(s["identity_self"], 3),
                     "adherence": round(s["prompt_adherence"], 3),
                     "time_s": round(time.perf_counter() - t0, 1)})
        print(f"{name:40s} identity-cross {rows[-1]['identity_cross']:.3f} (solo "
              f"{rows[-1]['solo']:.3f}, duo {rows[-1]['duo']:.3f})", flush=True)
    headers = ["row", "identity_cross", "solo", "duo", "identity_self", "adherence", "time_s"]
    table = [[r[h] for h in headers] for r in rows]
    print(text_table(headers, table))
    notes = (f"World story seed {args.seed} ({args.frames} frames, held-out identities), "
             f"{args.steps} steps, stage-1 LoRA of pipelines/world/weights; 'another frame' is "
             "the nearest frame with the same cast. Chance identity-cross 0.26.")
    for p in write_results("bench_story_iter_refs", environment(args.device), rows,
                           markdown_table(headers, table), notes, out_dir=args.results_dir):
        print("wrote", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
