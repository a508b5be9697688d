"""The story world: a procedural renderer, an exact pixel reader, consistency metrics, training
data, and tiny FLUX models trained in it (``python -m pipelines.world build``)."""
