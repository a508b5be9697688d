"""Progress lines of ``python -m pipelines.train``: printed by the main process only."""
from __future__ import annotations


def say(accelerator, msg: str) -> None:
    if accelerator is None or accelerator.is_main_process:
        print(f"[train] {msg}", flush=True)
