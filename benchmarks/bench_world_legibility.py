"""Is identity legible in the story world?  Measured before any model downstream is trained.

Rows:
  tokens per character     min / mean over every identity x slot x size of the image tokens
                           (8 x 8 px patches: VAE 4x, 2x2 packing) a character fills >= 1/8
                           of, and >= 1/4 of (target: min >= 12 at 1/8)
  exact reader on renders  every identity in every slot and size, each scene: the reading
                           equals what was drawn (target 1.0)
  VAE round trip           the reader after encode + decode of 512 random frames, per key,
                           against the reading of the render (target >= 0.98 per attribute)

Usage:
  python benchmarks/bench_world_legibility.py [--weights DIR] [--frames 512] [--device cpu]
Writes benchmarks/results/bench_world_legibility_{cpu,gpu}.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import environment, markdown_table, text_table, write_results  # noqa: E402

TOKENS_TARGET, ROUNDTRIP_TARGET = 12, 0.98


def exact_reader_rate() -> float:
    from pipelines.world import render as R
    from pipelines.world.reader import read_image

    hit = n = 0
    for ident in R.all_identities():
        for pos in R.POSITIONS:
            for size in R.SIZES:
                scene = list(R.SCENES)[n % len(R.SCENES)]
                r = read_image(R.render_frame(scene, [R.Placement(ident, pos, size)]))
                c = r.characters
                hit += (r.scene == scene and len(c) == 1 and c[0]["position"] == pos
                        and c[0]["size"] == size
                        and all(c[0][a] == getattr(ident, a) for a in R.ATTRIBUTES))
                n += 1
    return hit / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="a world weights folder (default: the "
                    "committed one); its flux/vae is the VAE measured")
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    if args.frames < 1:
        ap.error(f"--frames must be >= 1, got {args.frames}")
    from diffusers import AutoencoderKL

    from pipelines.world import weights as W
    from pipelines.world.legibility import ROUNDTRIP_KEYS, token_coverage, vae_roundtrip

    try:
        vae_dir = os.path.join(W.flux_path(args.weights), "vae")
    except FileNotFoundError as e:
        ap.error(str(e))
    rows = []
    for share in (1 / 8, 1 / 4):
        cov = token_coverage(share)
        rows.append({"row": f"tokens per character (>= {share:g} of a token)",
                     "value": f"min {cov['min']} / mean {cov['mean']:.1f} of "
                              f"{cov['tokens_per_frame']} (worst: {cov['worst']})",
                     "target": f"min >= {TOKENS_TARGET}" if share == 1 / 8 else "",
                     "met": ("yes" if cov["min"] >= TOKENS_TARGET else "NO") if share == 1 / 8
                     else "", "raw": cov})
    ex = exact_reader_rate()
    rows.append({"row": "exact reader on renders", "value": f"{ex:.3f}", "target": "1.0",
                 "met": "yes" if ex == 1.0 else "NO", "raw": ex})
    vae = AutoencoderKL.from_pretrained(vae_dir)
    rt = vae_roundtrip(vae, n=args.frames, device=args.device)
    for k in ROUNDTRIP_KEYS:
        attr = k in ("shape", "colour", "pattern", "accessory")
        rows.append({"row": f"VAE round trip: {k}", "value": f"{rt[k]:.3f}",
                     "target": f">= {ROUNDTRIP_TARGET}" if attr else "",
                     "met": ("yes" if rt[k] >= ROUNDTRIP_TARGET else "NO") if attr else "",
                     "raw": rt[k]})
    headers = ["row", "value", "target", "met"]
    table = [[r[h] for h in headers] for r in rows]
    print(text_table(headers, table))
    notes = (f"VAE: {vae_dir}; {args.frames} random frames (seed 1000, not the training "
             "frames), posterior mode, reader on the decoded frame against the reader on the "
             "render. A frame whose character count changed counts as lost for every "
             "per-character key.")
    for p in write_results("bench_world_legibility", environment(args.device), rows,
                           markdown_table(headers, table), notes, out_dir=args.results_dir):
        print("wrote", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
