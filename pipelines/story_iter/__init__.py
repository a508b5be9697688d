"""``python -m pipelines.story_iter``: iterative story visualization (Story-Iter).

A package per program: ``cli`` parses and runs, ``plan`` checks the arguments and builds
the printed plan, ``outdir`` checks the output folder for a resume, ``lock`` keeps one run
per output folder, ``progress`` shows bars (or plain lines in logs), ``backbone_sdxl`` /
``backbone_flux`` draw frames, ``report`` writes frames, manifest and contact sheet, ``memory`` checks the run fits before weights load,
``dist`` shares rounds across processes.
"""
from .cli import DEMO, STOP_ENV, build_parser, main, parse_refs, round_scales, select_refs

__all__ = ["main", "build_parser", "select_refs", "parse_refs", "round_scales", "DEMO", "STOP_ENV"]
