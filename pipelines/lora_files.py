"""The one place LoRA files are checked and loaded.

Before any weights load: is it safetensors, does it hold LoRA weights, and which model parts
do they target (so a FLUX LoRA given to SDXL is refused instead of being skipped by diffusers
with a log line).  Against a loaded FLUX transformer (the DPO stage's frozen stage 1): does
every layer and shape fit (:func:`check_lora_fits`).  After loading: did it apply.

Key conventions read here (diffusers / peft and kohya exports):

* FLUX: ``transformer.<...>.lora_A.weight`` (diffusers), ``lora_unet_double_blocks_*`` /
  ``lora_unet_single_blocks_*`` (kohya FLUX).  FLUX.2 uses the same ``transformer.`` prefix;
  its own module names (the single blocks' fused ``to_qkv_mlp_proj``, the FFNs'
  ``linear_in``/``linear_out``) tell it from FLUX.1 (``proj_mlp``, ``ff.net.*``); a file
  holding only the attention projections both share counts as either.
* SDXL: ``unet.*``, ``text_encoder.*``, ``text_encoder_2.*`` (diffusers), ``lora_unet_*``,
  ``lora_te1_*``, ``lora_te2_*`` (kohya).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, List, Set, Tuple

from .cli_common import UsageError

__all__ = ["LORA_WEIGHT_NAME", "read_safetensors_keys", "lora_targets", "check_lora_file",
           "check_lora_applied", "lora_load_error", "load_lora_files", "lora_file",
           "check_lora_fits"]

# the file a LoRA training run writes into its output folder (diffusers' default name)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def read_safetensors_keys(path: Path, arg: str) -> List[str]:
    """Tensor names from the header; :class:`UsageError` when the file is not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{arg} {path}: file not found")
    size = path.stat().st_size
    bad = UsageError(f"{arg} {path}: not a safetensors file; give the .safetensors LoRA file "
                     "(e.g. pytorch_lora_weights.safetensors written by save_lora_weights)")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad
        n = struct.unpack("<Q", head)[0]
        if n < 2 or n > size - 8:
            raise bad
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            raise bad from None
    if not isinstance(header, dict):
        raise bad
    return [k for k in header if k != "__metadata__"]


_FLUX2_ONLY = (".to_qkv_mlp_proj.", ".ff.linear_in.", ".ff.linear_out.",
               ".ff_context.linear_in.", ".ff_context.linear_out.", ".attn.to_out.lora")
_FLUX1_ONLY = (".proj_mlp.", ".ff.net.", ".ff_context.net.", ".norm.linear.")


def lora_targets(keys: List[str]) -> Set[str]:
    """Which backbone the LoRA keys are for: a subset of {"flux", "flux2", "sdxl"} (empty:
    unknown)."""
    out: Set[str] = set()
    shared = False
    for k in keys:
        if k.startswith("transformer."):
            if any(t in k for t in _FLUX2_ONLY):
                out.add("flux2")
            elif any(t in k for t in _FLUX1_ONLY):
                out.add("flux")
            else:
                shared = True   # attention projections: both FLUX families have them
        elif k.startswith(("lora_unet_double_blocks", "lora_unet_single_blocks")):
            out.add("flux")
        elif k.startswith(("unet.", "text_encoder.", "text_encoder_2.", "lora_unet_",
                           "lora_te1_", "lora_te2_", "lora_te_")):
            out.add("sdxl")
    if shared and not out & {"flux", "flux2"}:
        out |= {"flux", "flux2"}
    return out


def check_lora_file(path: str, backbone: str, arg: str = "--lora") -> None:
    """Refuse, before loading, a file that is not a LoRA for ``backbone`` ("flux" | "flux2" |
    "sdxl")."""
    keys = read_safetensors_keys(Path(path), arg)
    if not any("lora" in k.lower() for k in keys):
        raise UsageError(f"{arg} {path}: holds no LoRA weights (no tensor name contains 'lora'); "
                         "give a LoRA file, e.g. one written by python -m pipelines.train")
    targets = lora_targets(keys)
    if targets and backbone not in targets:
        other = sorted(targets)[0]
        # story_iter's --lora can switch backbone; train's --stage1-lora must fit the model
        fix = (f"use --backbone {other} or a {backbone.upper()} LoRA" if arg == "--lora"
               else f"give a {backbone.upper()} LoRA (one trained on this --model)")
        raise UsageError(f"{arg} {path}: a {other.upper()} LoRA, it does not apply to the "
                         f"{backbone.upper()} backbone; {fix}")


def check_lora_applied(pipe, adapter: str, path: str, backbone: str, arg: str = "--lora") -> None:
    """After ``load_lora_weights(..., adapter_name=adapter)``: some model part holds it
    (diffusers skips a LoRA whose keys match nothing, with only a log line)."""
    for name in ("transformer", "unet", "text_encoder", "text_encoder_2"):
        part = getattr(pipe, name, None)
        if part is not None and adapter in (getattr(part, "peft_config", None) or {}):
            return
    raise UsageError(f"{arg} {path}: none of its weights match a layer of this "
                     f"{backbone.upper()} model, so it would change nothing; give a LoRA "
                     "trained for this model")


def lora_load_error(path: str, exc: BaseException, backbone: str, arg: str = "--lora") -> UsageError:
    """``load_lora_weights`` refused the file (e.g. peft: target modules not found)."""
    why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return UsageError(f"{arg} {path}: does not fit this {backbone.upper()} model ({why}); give "
                      "a LoRA trained for this model")


def load_lora_files(pipe, loras, backbone: str, arg: str = "--lora") -> List[str]:
    """Load each LoRA file into ``pipe`` as adapter ``lora<i>``, all active at weight 1; a
    file diffusers cannot load becomes the one-line :func:`lora_load_error`.  Returns the
    adapter names."""
    names = []
    for i, lora in enumerate(loras):
        lp, name = Path(lora), f"lora{i}"
        try:
            pipe.load_lora_weights(str(lp.parent), weight_name=lp.name, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as e:
            raise lora_load_error(lora, e, backbone, arg) from None
        names.append(name)
    if len(names) > 1:
        # load_lora_weights activates only the adapter it just loaded: stage 1 + stage 2 (and
        # any stack a user passes) must all be on
        pipe.set_adapters(names, adapter_weights=[1.0] * len(names))
    return names


def lora_file(path) -> Path:
    """A LoRA file, or the training output folder that holds one (``LORA_WEIGHT_NAME``)."""
    p = Path(path)
    if p.is_dir():
        p = p / LORA_WEIGHT_NAME
    if not p.is_file():
        raise UsageError(f"stage-1 LoRA {p} does not exist (give --stage1-lora the file or the "
                         f"output folder of a stage gsa run)")
    return p


def check_lora_fits(transformer, path) -> Tuple[Dict[str, torch.Tensor], int]:
    """Read a diffusers-format LoRA file and check it fits ``transformer``.

    Every ``lora_A``/``lora_B`` key must name a linear layer of this model with
    matching in/out features and one rank per layer; a file with no transformer
    LoRA keys, or one for another model, raises :class:`UsageError` naming the keys.
    Returns the transformer state dict (prefix removed) and the number of layers.
    """
    import torch
    import diffusers

    # the transformer's own family reads the file (FLUX.2 keys are not FLUX.1 conversions)
    loader = (diffusers.Flux2KleinPipeline if type(transformer).__name__.startswith("Flux2")
              else diffusers.FluxPipeline)
    p = lora_file(path)
    try:
        sd = loader.lora_state_dict(str(p))
    except Exception as exc:
        raise UsageError(f"cannot read LoRA file {p}: {type(exc).__name__}: {exc}") from None
    if isinstance(sd, tuple):
        sd = sd[0]
    tsd = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    if not tsd:
        raise UsageError(f"{p} holds no transformer LoRA weights (keys like "
                         f"'transformer.<module>.lora_A.weight'); found e.g. {list(sd)[:3]}")
    modules = dict(transformer.named_modules())
    problems: List[str] = []
    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, val in tsd.items():
        for part in (".lora_A.", ".lora_B."):
            if part in key:
                mod_name = key.split(part)[0]
                layers.setdefault(mod_name, {})[part.strip(".")] = val
                break
        else:
            problems.append(f"{key}: not a LoRA A/B weight")
    for mod_name, ab in layers.items():
        mod = modules.get(mod_name)
        base = getattr(mod, "base_layer", mod)
        if not isinstance(base, torch.nn.Linear):
            problems.append(f"{mod_name}: no such linear layer in this transformer")
            continue
        a, b = ab.get("lora_A"), ab.get("lora_B")
        if a is None or b is None:
            problems.append(f"{mod_name}: has only {sorted(ab)} (needs lora_A and lora_B)")
            continue
        if a.dim() != 2 or a.shape[1] != base.in_features:
            problems.append(f"{mod_name}.lora_A: shape {tuple(a.shape)}, this model needs "
                            f"[rank, {base.in_features}]")
        if b.dim() != 2 or b.shape[0] != base.out_features or b.shape[1] != a.shape[0]:
            problems.append(f"{mod_name}.lora_B: shape {tuple(b.shape)}, this model needs "
                            f"[{base.out_features}, {a.shape[0]}]")
    if problems:
        # one line (a user's mistake): the first few problems stand for the rest
        shown = "; ".join(problems[:3])
        more = f"; ... and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise UsageError(f"stage-1 LoRA {p} does not fit this model ({len(problems)} problem(s)); "
                         f"was it trained on a different model? {shown}{more}")
    return tsd, len(layers)
