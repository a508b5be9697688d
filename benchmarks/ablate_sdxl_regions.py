"""Ablation: ``bench_quality.py --only-sdxl`` with the layout withheld from GRCA.

The SDXL backbone's ``draw`` is given no regions, so every image token of a frame reads all of
the frame's references (as before regional GRCA); everything else is bench_quality's own run.
docs/world.md compares it with the committed table: two-character frames lose their binding.

Usage: python benchmarks/ablate_sdxl_regions.py --stories 5 --only-sdxl [bench_quality flags]
Writes bench_quality_sdxl_{cpu,gpu}.* to --results-dir (give one: the default would overwrite
the committed table).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipelines.backbones import sdxl as _sdxl  # noqa: E402

_draw = _sdxl.SDXLBackbone.draw


def _draw_without_regions(self, prompts, generators, ref_index=None, regions=None):
    return _draw(self, prompts, generators, ref_index, None)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--results-dir" not in argv:
        print("error: give --results-dir DIR (the default would overwrite the committed table)",
              file=sys.stderr)
        return 2
    import bench_quality

    _sdxl.SDXLBackbone.draw = _draw_without_regions
    try:
        return bench_quality.main(argv)
    finally:
        _sdxl.SDXLBackbone.draw = _draw


if __name__ == "__main__":
    raise SystemExit(main())
