"""``python -m pipelines.train --stage gsa|dpo``: LoRA training of Group-Shared Attention.

``cli`` parses and runs the stages, ``data`` reads story groups and preference pools,
``losses`` holds the flow-matching and DPO losses, ``model`` loads the transformer and
LoRA adapters, ``synthetic`` makes the small built-in data sets.
"""
