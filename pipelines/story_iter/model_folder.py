"""What a local diffusers model folder says about itself: its pipeline class (so the
backbone), the image size it was built for and the size multiple it needs.

Read from the folder's JSON files only (no weights load).  Both the plan (defaults and
checks) and the sampling presets (is this a small model?) ask these questions, so they live
below both.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from ..cli_common import UsageError

__all__ = ["SMALL_BELOW", "native_size", "size_multiple", "check_model", "detect_backbone",
           "is_distilled"]

SMALL_BELOW = 512   # a model whose config was built for fewer pixels than this is "small"

# model_index.json _class_name -> backbone
_PIPELINE_BACKBONE = {"FluxPipeline": "flux", "StableDiffusionXLPipeline": "sdxl",
                      "Flux2KleinPipeline": "flux2", "Flux2KleinKVPipeline": "flux2",
                      "Flux2Pipeline": "flux2"}
# what each backbone loads, for the mismatch error
_NEEDS = {"flux2": "Flux2KleinPipeline/Flux2Pipeline", "flux": "FluxPipeline",
          "sdxl": "StableDiffusionXLPipeline"}


def _model_index(model: Path) -> dict:
    try:
        return json.loads((model / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}


def detect_backbone(model: Optional[str]) -> Optional[str]:
    """The backbone a model folder's ``model_index.json`` names (None: no folder, or a
    class Story-Iter does not run; :func:`check_model` then says what is wrong)."""
    if model is None:
        return None
    return _PIPELINE_BACKBONE.get(_model_index(Path(model)).get("_class_name", ""))


def is_distilled(model: Path) -> bool:
    """A FLUX.2 klein folder of the step-distilled model (4 steps, no CFG), not the base."""
    return bool(_model_index(model).get("is_distilled", False))


def _config(model: Path, sub: str) -> dict:
    try:
        return json.loads((model / sub / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _vae_scale(model: Path) -> int:
    return 2 ** (len(_config(model, "vae").get("block_out_channels", [0, 0, 0, 0])) - 1)


def native_size(backbone: str, model: Path) -> Optional[int]:
    """The image size the model's config was built for (None when the config does not say)."""
    if backbone == "sdxl":
        s = _config(model, "unet").get("sample_size")
        return int(s) * _vae_scale(model) if isinstance(s, int) else None
    s = _config(model, "vae").get("sample_size")
    return int(s) if isinstance(s, int) else None


def size_multiple(backbone: str, model: Path) -> int:
    """Height/width must be a multiple of this: SDXL's pipeline checks multiples of 8 and the
    VAE needs whole latents; FLUX packs 2x2 latents (its pipeline would silently round)."""
    v = _vae_scale(model)
    return math.lcm(8, v) if backbone == "sdxl" else 2 * v


def check_model(backbone: str, model: str) -> Path:
    p = Path(model)
    if not p.is_dir():
        raise UsageError(f"--model {model}: not a local folder (weights load only from local "
                         "diffusers pipeline folders)")
    try:
        cls = json.loads((p / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError):
        raise UsageError(f"--model {model}: no readable model_index.json, so not a diffusers "
                         "pipeline folder; give the folder that holds model_index.json") from None
    found = _PIPELINE_BACKBONE.get(cls)
    if found is None:
        raise UsageError(f"--model {model}: a {cls or 'unknown'} folder; Story-Iter needs a "
                         "StableDiffusionXLPipeline (--backbone sdxl), FluxPipeline "
                         "(--backbone flux) or Flux2KleinPipeline (--backbone flux2) folder")
    if found != backbone:
        raise UsageError(f"--model {model}: a {cls} folder, not the {_NEEDS[backbone]} "
                         f"--backbone {backbone} loads; use --backbone {found} (or leave "
                         f"--backbone out: the folder names it) or give a {_NEEDS[backbone]} "
                         "folder")
    return p
