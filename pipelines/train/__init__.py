"""``python -m pipelines.train --stage gsa|dpo``: LoRA training of Group-Shared Attention.

``cli`` is the program (``main``), ``args`` its parser and argument checks, ``trainer``
a stage's setup and loop, ``steps`` one step's batch and loss, ``checkpoints`` saving and
resuming, ``data`` reads story groups and preference pools, ``losses`` holds the
flow-matching and DPO losses, ``model`` loads the transformer and LoRA adapters,
``synthetic`` makes the small data sets of the tiny preset, ``world_recipe`` holds the
story world's defaults (shared with the world build), ``log`` prints progress lines.
"""
