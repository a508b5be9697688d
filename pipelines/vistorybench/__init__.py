"""ViStoryBench stories in and out.

* :func:`read_story` reads one story folder of the ViStoryBench dataset (English or
  Chinese) as a :class:`pipelines.story.Story`; the characters' reference images become
  the story's character references.
* :func:`export_frames` writes a run's final frames where ViStoryBench's evaluator reads
  them (``<out>/<method>/<mode>/<lang>/<timestamp>/<story id>/<NN>.png``);
  :func:`read_outputs` reads that layout back by the evaluator's rules.
* ``python -m pipelines.vistorybench`` lists, converts (Lite/Full by story ids) and exports.
* ``python -m pipelines.story_iter --story vistorybench:ROOT/ID [--lang ch]
  --export vistorybench:DIR --method NAME`` does it within a run.

See ``layout.py`` for both layouts and ``docs/vistorybench.md``.
"""
from pipelines.vistorybench.layout import (LANGS, SHOT_FIELDS, export_frames, read_outputs,
                                           read_story, shot_indices, story_ids)

__all__ = ["LANGS", "SHOT_FIELDS", "export_frames", "read_outputs", "read_story",
           "shot_indices", "story_ids"]
