"""``python -m pipelines.story_iter``: iterative story visualization (Story-Iter).

A package per program, a module per stage: ``cli`` only parses and calls ``run``;
``story`` reads the story (a JSON file, the demo, or ViStoryBench through its adapter);
``plan`` checks the arguments and builds the printed plan (``model_folder`` reads what a
model folder says about itself, ``presets`` the sampling options); ``outdir`` checks the
output folder for a resume and ``lock`` keeps one run per folder; ``load`` checks memory
(``memory``) and loads the backbone (``pipelines.backbones``); ``refs`` picks each frame's
references; ``run`` draws the rounds and writes frames, manifest and contact sheet through
``pipelines.run_folder``; ``progress`` shows bars; ``dist`` shares rounds across processes.
"""
from .cli import DEMO, build_parser, main, parse_refs, round_scales, select_refs
from .run import STOP_ENV

__all__ = ["main", "build_parser", "select_refs", "parse_refs", "round_scales", "DEMO", "STOP_ENV"]
