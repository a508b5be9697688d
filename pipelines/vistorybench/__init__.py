"""ViStoryBench stories in and out.

* :func:`read_story` reads one story folder of the ViStoryBench dataset (English or
  Chinese) as a :class:`pipelines.story.Story`, each shot merged into one prompt as the
  official loader merges it (:func:`merge_shot`); the characters' reference images become
  the story's character references.
* :func:`export_frames` writes a run's final frames where ViStoryBench's evaluator reads
  them (``<out>/<method>/<mode>/<lang>/<timestamp>/<story id>/<NN>.png``);
  :func:`read_outputs` reads that layout back by the evaluator's rules.
* :func:`lite_ids`: the Lite split's 20 story ids (``lite.json``).
* ``python -m pipelines.vistorybench`` lists, converts (``--split lite|full``) and exports.
* ``python -m pipelines.story_iter --story vistorybench:ROOT/ID [--lang ch]
  --export vistorybench:DIR --method NAME [--timestamp T]`` does it within a run.

See ``layout.py`` for both layouts and ``docs/vistorybench.md``.
"""
from pipelines.vistorybench.layout import (LANGS, SHOT_FIELDS, VistoryError, check_timestamp,
                                           export_frames, merge_shot, read_outputs, read_story,
                                           shot_indices, story_ids)
from pipelines.vistorybench.splits import SPLITS, lite_ids, split_ids

__all__ = ["LANGS", "SHOT_FIELDS", "SPLITS", "VistoryError", "check_timestamp", "export_frames",
           "lite_ids", "merge_shot", "read_outputs", "read_story", "shot_indices", "split_ids",
           "story_ids"]
