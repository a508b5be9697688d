"""FLUX model plumbing for ``python -m pipelines.train``: loading, LoRA adapters,
latents, text embeddings, the transformer call, saving LoRA files.  FLUX.1 (``FluxPipeline``)
and FLUX.2 [klein] (``Flux2KleinPipeline``; FLUX.2 dev's ``Flux2Pipeline`` too): the folder's
``model_index.json`` names the family, :func:`inputs` gives its input module
(:mod:`pipelines.flux_inputs` / :mod:`pipelines.flux2_inputs`, same functions).

LoRA targets (``LORA_TARGET_REGEX``, matched by peft against full module names):

- double-stream blocks ``transformer_blocks.N``: ``attn.to_q/to_k/to_v/to_out.0``,
  the added (text) projections ``attn.add_q_proj/add_k_proj/add_v_proj/to_add_out``,
  the FFNs ``ff.net.0.proj/ff.net.2`` and ``ff_context.net.0.proj/ff_context.net.2``;
- single-stream blocks ``single_transformer_blocks.N``: ``attn.to_q/to_k/to_v``,
  ``proj_mlp``, ``proj_out``.

Not targeted: the model's top-level ``proj_out``, embedders, and the AdaLN
modulation linears (``norm1.linear`` ...), which only carry the timestep/pooled text.

FLUX.2 (``FLUX2_LORA_TARGET_REGEX``; ``Flux2Transformer2DModel``'s module names):

- double-stream blocks (``Flux2Attention``): ``attn.to_q/to_k/to_v/to_out.0``,
  ``attn.add_q_proj/add_k_proj/add_v_proj/to_add_out``, the FFNs ``ff.linear_in/linear_out``
  and ``ff_context.linear_in/linear_out``;
- single-stream blocks (``Flux2ParallelSelfAttention``): the fused QKV + MLP input
  ``attn.to_qkv_mlp_proj`` and the fused output ``attn.to_out``.

Not targeted: the shared modulation linears (``double_stream_modulation_*``,
``single_stream_modulation``), embedders, ``norm_out`` and ``proj_out``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..cli_common import UsageError
# the inputs and the forward are shared with the world's build (re-exported for the stages)
from ..flux_inputs import (encode_latents, encode_prompts, flux_forward,  # noqa: F401
                           has_guidance_embeds, image_ids, pack_latents)
from ..lora_files import LORA_WEIGHT_NAME, check_lora_fits, lora_file

FLUX2_LORA_TARGET_REGEX = (
    r"^(?:transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj"
    r"|add_v_proj|to_add_out)|ff\.(?:linear_in|linear_out)|ff_context\.(?:linear_in|linear_out))"
    r"|single_transformer_blocks\.\d+\.attn\.(?:to_qkv_mlp_proj|to_out))$"
)

# model_index.json _class_name -> family; the pipeline class each family loads and saves with
_FAMILY = {"FluxPipeline": "flux", "Flux2KleinPipeline": "flux2", "Flux2KleinKVPipeline": "flux2",
           "Flux2Pipeline": "flux2"}

LORA_TARGET_REGEX = (
    r"^(?:transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj"
    r"|add_v_proj|to_add_out)|ff\.net\.(?:0\.proj|2)|ff_context\.net\.(?:0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v)|proj_mlp|proj_out))$"
)

STAGE1_ADAPTER = "gsa"
DPO_ADAPTER = "dpo"


class ModelError(UsageError):
    """A model or LoRA file that cannot be used: raised before training starts."""


# ----------------------------------------------------------------------------------------
# loading


def check_model_path(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model folder {p} does not exist")
    if not (p / "model_index.json").is_file():
        raise ModelError(f"{p} is not a diffusers pipeline folder (no model_index.json); "
                         f"--model must be a local FLUX.1 folder (FluxPipeline layout)")
    import json

    try:
        cls = json.loads((p / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError):
        cls = ""
    if cls and cls not in _FAMILY:
        raise ModelError(f"--model {p}: a {cls} folder; training needs a FLUX.1 (FluxPipeline) "
                         "or FLUX.2 klein (Flux2KleinPipeline) folder")
    if not (p / "transformer").is_dir():
        raise ModelError(f"{p} has no transformer/ sub-folder; is it a FLUX pipeline?")
    return p


def _class_name(path) -> str:
    import json

    try:
        return json.loads((Path(path) / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError):
        return ""


def model_family(path) -> str:
    """``flux`` (FLUX.1) or ``flux2`` (FLUX.2), from the folder's model_index.json."""
    return _FAMILY.get(_class_name(path), "flux")


def family_of(transformer) -> str:
    return "flux2" if type(transformer).__name__.startswith("Flux2") else "flux"


def inputs(family: str):
    """The family's input module (text, latents, ids, the forward; same function names)."""
    if family == "flux2":
        from .. import flux2_inputs

        return flux2_inputs
    from .. import flux_inputs

    return flux_inputs


def pipeline_class(family_or_path: str):
    """The diffusers pipeline class that loads (and saves LoRAs for) a family or folder."""
    import diffusers

    if family_or_path in ("flux", "flux2"):
        return diffusers.Flux2KleinPipeline if family_or_path == "flux2" else diffusers.FluxPipeline
    cls = _class_name(family_or_path)
    if cls == "Flux2KleinKVPipeline":
        cls = "Flux2KleinPipeline"   # the same weights; the KV pipeline's image= path is unused
    return getattr(diffusers, cls if cls in _FAMILY else "FluxPipeline")


def model_defaults(path) -> Tuple[int, int]:
    """(resolution, T5 sequence length) defaults for a pipeline folder: 512 each, or
    the VAE's ``sample_size`` / the T5 tokenizer's ``model_max_length`` if smaller."""
    import json

    p = Path(path)
    res, seq = 512, 512
    try:
        res = min(res, int(json.loads((p / "vae" / "config.json").read_text())["sample_size"]))
    except (OSError, KeyError, ValueError, TypeError):
        pass
    # FLUX.1's T5 is tokenizer_2; FLUX.2's Qwen3 is tokenizer
    sub = "tokenizer" if model_family(p) == "flux2" else "tokenizer_2"
    try:
        cfg = json.loads((p / sub / "tokenizer_config.json").read_text())
        seq = min(seq, int(cfg["model_max_length"]))
    except (OSError, KeyError, ValueError, TypeError):
        pass
    return res, seq


def vae_scale_factor(path) -> int:
    """The VAE's downsampling factor read from its config (what FluxPipeline computes)."""
    import json

    try:
        cfg = json.loads((Path(path) / "vae" / "config.json").read_text())
        return 2 ** (len(cfg["block_out_channels"]) - 1)
    except (OSError, KeyError, ValueError, TypeError):
        return 8


def load_pipeline(path, dtype: torch.dtype):
    """``FluxPipeline`` / ``Flux2KleinPipeline.from_pretrained`` from a local folder, all
    weights frozen."""
    p = check_model_path(path)
    pipe = pipeline_class(str(p)).from_pretrained(str(p), dtype=dtype, local_files_only=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, name, None)
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    return pipe


# ----------------------------------------------------------------------------------------
# LoRA


def lora_config(rank: int, alpha: Optional[float] = None, family: str = "flux"):
    """peft ``LoraConfig`` on the family's target regex; B is zero-initialised (delta 0)."""
    from peft import LoraConfig

    regex = FLUX2_LORA_TARGET_REGEX if family == "flux2" else LORA_TARGET_REGEX
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                      init_lora_weights=True, target_modules=regex, lora_dropout=0.0)


def lora_module_names(transformer, adapter: str) -> List[str]:
    """Names of the modules that carry LoRA weights of ``adapter``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = []
    for name, mod in transformer.named_modules():
        if isinstance(mod, BaseTunerLayer) and adapter in getattr(mod, "lora_A", {}):
            names.append(name)
    return names


def adapter_params(transformer, adapter: str) -> Dict[str, torch.nn.Parameter]:
    tag = f".{adapter}."
    return {n: p for n, p in transformer.named_parameters() if tag in n and ".lora_" in n}


def add_trainable_lora(transformer, adapter: str, rank: int, alpha: Optional[float] = None) -> None:
    """Inject a fresh LoRA named ``adapter``; its params become fp32 and trainable,
    everything else stays frozen."""
    transformer.add_adapter(lora_config(rank, alpha, family_of(transformer)), adapter_name=adapter)
    for n, p in transformer.named_parameters():
        p.requires_grad_(False)
    for p in adapter_params(transformer, adapter).values():
        p.data = p.data.float()
        p.requires_grad_(True)


def activate_adapters(transformer, active: Sequence[str], trainable: Optional[str]) -> None:
    """Make ``active`` the adapters used in forward passes.

    peft's ``set_adapter`` marks every active adapter trainable; here only
    ``trainable`` (or none) ever has ``requires_grad``, whatever is active, and
    that is checked after every switch.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    active = list(active)
    for mod in transformer.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.set_adapter(active, inference_mode=True)
    if trainable is not None:
        for p in adapter_params(transformer, trainable).values():
            p.requires_grad_(True)
    bad = [n for n, p in transformer.named_parameters()
           if p.requires_grad and (trainable is None or f".{trainable}." not in n)]
    if bad:
        raise RuntimeError(f"frozen parameters became trainable after an adapter switch: {bad[:5]}")


def lora_state_dict(transformer, adapter: str) -> Dict[str, torch.Tensor]:
    """peft state dict of one adapter (keys without the adapter name), CPU, contiguous."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, adapter_name=adapter)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_lora(transformer, adapter: str, out_dir, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``OUT/pytorch_lora_weights.safetensors`` in the diffusers format (keys
    ``transformer.<module>.lora_A/B.weight`` + peft config metadata), loadable with
    ``FluxPipeline`` / ``Flux2KleinPipeline.load_lora_weights(OUT, adapter_name=...)``."""
    sd = lora_state_dict(transformer, adapter)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    meta = transformer.peft_config[adapter].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    pipeline_class(family_of(transformer)).save_lora_weights(str(out_dir), transformer_lora_layers=sd,
                                   weight_name=LORA_WEIGHT_NAME,
                                   transformer_lora_adapter_metadata=meta)
    return Path(out_dir) / LORA_WEIGHT_NAME


def load_frozen_lora(pipe, path, adapter: str = STAGE1_ADAPTER) -> int:
    """Check then load a stage-1 LoRA as ``adapter``; freeze it. Returns its layer count."""
    transformer = pipe.transformer
    _, n_layers = check_lora_fits(transformer, path)
    p = lora_file(path)
    pipe.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name=adapter)
    loaded = lora_module_names(transformer, adapter)
    if len(loaded) != n_layers:
        raise ModelError(f"stage-1 LoRA {p}: {n_layers} layers in the file but {len(loaded)} were "
                         f"loaded into the model")
    for p_ in adapter_params(transformer, adapter).values():
        p_.requires_grad_(False)
    return n_layers


def trainable_parameters(module) -> List[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def count(params: Iterable[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
