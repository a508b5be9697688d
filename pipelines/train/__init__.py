"""``python -m pipelines.train --stage gsa|dpo``: LoRA training of Group-Shared Attention.

``cli`` is the program (``main``), ``args`` its parser and argument checks, ``trainer``
a stage's setup and loop, ``steps`` one step's batch and loss, ``checkpoints`` saving and
resuming, ``data`` reads story groups and preference pools, ``model`` loads the
transformer and LoRA adapters, ``synthetic`` makes the small data sets of the tiny preset,
``log`` prints progress lines.  Shared with the story world's build, below both:
:mod:`pipelines.flow_matching` (the flow-matching and DPO losses),
:mod:`pipelines.flux_inputs` (latents, embeddings, the transformer call),
:mod:`pipelines.lora_files` (LoRA files) and :mod:`pipelines.world.recipe` (the world's
defaults).
"""
