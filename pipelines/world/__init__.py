"""The story world: a procedural renderer, an exact pixel reader, consistency metrics, training
data, its training recipe and the weights trained in it.  It imports no program; its models are
built by ``python -m pipelines.world_build build``."""
