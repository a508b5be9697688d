"""Silence the library notices that say nothing to a user of these programs, one by one.

Each filter drops one known message on the one logger that emits it; everything else
(other warnings, errors) still reaches the user.  What the notices are and why they are
safe to drop:

* transformers: "`CLIPImageProcessor` requires torchvision (not installed); falling back
  to ..." -- the PIL fallback is what these programs use on purpose.
* diffusers: "There are modules in X that should be kept in float32: []." -- printed on
  every ``pipe.to(device)`` even when the list is empty (nothing to keep).
* transformers: "Token indices sequence length is longer than the specified maximum" --
  diffusers tokenizes once without truncation only to warn; the prompt is truncated to
  the encoder's limit, and the programs say so once themselves.
* diffusers: "No LoRA keys associated to X found" -- the programs check that each LoRA
  applies and refuse it when it does not (so the notice is never the only signal).
  "Loading X was unsuccessful with the following error" -- the load error itself is turned
  into a one-line error naming --lora, with the reason.
* peft: "Already found a `peft_config` attribute ... multiple adapters" -- stacking two
  adapters (GSA stage 1 + the DPO adapter) is the point: :func:`multiple_adapters_expected`.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterable

__all__ = ["install", "multiple_adapters_expected", "no_loading_bars", "prompt_truncation"]

_DROPS = {
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back",),
    "diffusers.models.modeling_utils": ("that should be kept in float32: [].",),
    "transformers.tokenization_utils_base": ("Token indices sequence length is longer",),
    "diffusers.loaders.peft": ("No LoRA keys associated to",
                               "was unsuccessful with the following error"),
    "diffusers.loaders.lora_base": ("No LoRA keys associated to",),
    "diffusers.loaders.lora_pipeline": ("No LoRA keys associated to",),
}


class _DropMessages(logging.Filter):
    def __init__(self, needles: Iterable[str]):
        super().__init__()
        self.needles = tuple(needles)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.needles)


_installed = False


def install() -> None:
    """Attach the filters (idempotent). Call before the libraries are imported: some
    notices fire at import time."""
    global _installed
    if _installed:
        return
    for name, needles in _DROPS.items():
        logging.getLogger(name).addFilter(_DropMessages(needles))
    _installed = True


def prompt_truncation() -> None:
    """Drop the warning diffusers gives at every call whose prompt exceeds the tokenizer (77
    tokens for SDXL, 32 for the tiny preset): the programs that draw say it once themselves,
    before the first batch."""
    for name in ("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
                 "diffusers.pipelines.flux.pipeline_flux"):
        logging.getLogger(name).addFilter(_DropMessages(("input was truncated because",)))


@contextlib.contextmanager
def multiple_adapters_expected():
    """Around code that adds a second adapter to a model on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute",
                                category=UserWarning)
        yield


@contextlib.contextmanager
def no_loading_bars():
    """Hide diffusers' "Loading pipeline components" and transformers' "Loading weights"
    bars while a pipeline loads (the programs print one line when it is loaded)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    d_on, t_on = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d_on:
            dlog.enable_progress_bar()
        if t_on:
            tlog.enable_progress_bar()
