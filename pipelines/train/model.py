"""FLUX model plumbing for ``python -m pipelines.train``: loading, LoRA adapters,
latents, text embeddings, the transformer call, saving LoRA files.

LoRA targets (``LORA_TARGET_REGEX``, matched by peft against full module names):

- double-stream blocks ``transformer_blocks.N``: ``attn.to_q/to_k/to_v/to_out.0``,
  the added (text) projections ``attn.add_q_proj/add_k_proj/add_v_proj/to_add_out``,
  the FFNs ``ff.net.0.proj/ff.net.2`` and ``ff_context.net.0.proj/ff_context.net.2``;
- single-stream blocks ``single_transformer_blocks.N``: ``attn.to_q/to_k/to_v``,
  ``proj_mlp``, ``proj_out``.

Not targeted: the model's top-level ``proj_out``, embedders, and the AdaLN
modulation linears (``norm1.linear`` ...), which only carry the timestep/pooled text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

LORA_TARGET_REGEX = (
    r"^(?:transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj"
    r"|add_v_proj|to_add_out)|ff\.net\.(?:0\.proj|2)|ff_context\.net\.(?:0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v)|proj_mlp|proj_out))$"
)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
STAGE1_ADAPTER = "gsa"
DPO_ADAPTER = "dpo"


class ModelError(ValueError):
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
    if cls and cls != "FluxPipeline":
        raise ModelError(f"--model {p}: a {cls} folder; training needs a FLUX.1 folder "
                         "(FluxPipeline in model_index.json)")
    if not (p / "transformer").is_dir():
        raise ModelError(f"{p} has no transformer/ sub-folder; is it a FLUX pipeline?")
    return p


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
    try:
        cfg = json.loads((p / "tokenizer_2" / "tokenizer_config.json").read_text())
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
    """``FluxPipeline.from_pretrained`` from a local folder, all weights frozen."""
    from diffusers import FluxPipeline

    p = check_model_path(path)
    pipe = FluxPipeline.from_pretrained(str(p), dtype=dtype, local_files_only=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, name, None)
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    return pipe


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], device, max_sequence_length: int,
                   batch_size: int = 8) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Unique prompt -> (T5 embeddings ``[L, D]``, CLIP pooled ``[P]``), kept on the CPU."""
    uniq = list(dict.fromkeys(prompts))
    out: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    for i in range(0, len(uniq), batch_size):
        chunk = uniq[i:i + batch_size]
        emb, pooled, _ = pipe.encode_prompt(prompt=chunk, prompt_2=None, device=device,
                                            num_images_per_prompt=1,
                                            max_sequence_length=max_sequence_length)
        for j, p in enumerate(chunk):
            out[p] = (emb[j].cpu(), pooled[j].cpu())
    return out


def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> normalised FLUX latents ``[B, 16, H/f, W/f]``
    (float32), by the same code that records GSA references
    (:func:`storyattn.references.encode_latents`: posterior mode, so a cached latent
    equals an on-the-fly one and training stays deterministic)."""
    from storyattn.references import encode_latents as encode

    return encode(vae, pixels).float()


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> FLUX packed ``[B, H/2 * W/2, 4C]`` (2x2 patches)."""
    from storyattn.references import pack_latents as pack

    return pack(latents)


def image_ids(latent_h: int, latent_w: int, device, dtype) -> torch.Tensor:
    """Position ids ``[H/2 * W/2, 3]`` of a lone image, as FluxPipeline makes them."""
    from storyattn.references import latent_image_ids

    return latent_image_ids(latent_h, latent_w, device, dtype)


def flux_forward(transformer, packed: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                 sigma: torch.Tensor, img_ids: torch.Tensor, guidance: Optional[float]) -> torch.Tensor:
    """One transformer call on ``[rows, L, 64]`` packed latents at noise levels ``sigma``
    ``[rows]``; returns the predicted velocity ``[rows, L, 64]``."""
    txt_ids = torch.zeros(text.shape[1], 3, device=packed.device, dtype=img_ids.dtype)
    g = None
    if guidance is not None:
        g = torch.full((packed.shape[0],), float(guidance), device=packed.device, dtype=torch.float32)
    out = transformer(hidden_states=packed, encoder_hidden_states=text, pooled_projections=pooled,
                      timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, guidance=g,
                      return_dict=False)
    return out[0]


def has_guidance_embeds(transformer) -> bool:
    return bool(getattr(transformer.config, "guidance_embeds", False))


# ----------------------------------------------------------------------------------------
# LoRA


def lora_config(rank: int, alpha: Optional[float] = None):
    """peft ``LoraConfig`` on ``LORA_TARGET_REGEX``; B is zero-initialised (delta 0)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                      init_lora_weights=True, target_modules=LORA_TARGET_REGEX, lora_dropout=0.0)


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
    transformer.add_adapter(lora_config(rank, alpha), adapter_name=adapter)
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
    ``FluxPipeline.load_lora_weights(OUT, adapter_name=...)``."""
    from diffusers import FluxPipeline

    sd = lora_state_dict(transformer, adapter)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    meta = transformer.peft_config[adapter].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    FluxPipeline.save_lora_weights(str(out_dir), transformer_lora_layers=sd,
                                   weight_name=LORA_WEIGHT_NAME,
                                   transformer_lora_adapter_metadata=meta)
    return Path(out_dir) / LORA_WEIGHT_NAME


def _lora_file(path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / LORA_WEIGHT_NAME
    if not p.is_file():
        raise ModelError(f"stage-1 LoRA {p} does not exist (give --stage1-lora the file or the "
                         f"output folder of a stage gsa run)")
    return p


def check_lora_matches(transformer, path) -> Tuple[Dict[str, torch.Tensor], int]:
    """Read a diffusers-format LoRA file and check it fits ``transformer``.

    Every ``lora_A``/``lora_B`` key must name a linear layer of this model with
    matching in/out features and one rank per layer; a file with no transformer
    LoRA keys, or one for another model, raises ``ModelError`` naming the keys.
    Returns the transformer state dict (prefix removed) and the number of layers.
    """
    from diffusers import FluxPipeline

    p = _lora_file(path)
    try:
        sd = FluxPipeline.lora_state_dict(str(p))
    except Exception as exc:
        raise ModelError(f"cannot read LoRA file {p}: {type(exc).__name__}: {exc}") from None
    if isinstance(sd, tuple):
        sd = sd[0]
    tsd = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    if not tsd:
        raise ModelError(f"{p} holds no transformer LoRA weights (keys like "
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
        raise ModelError(f"stage-1 LoRA {p} does not fit this model ({len(problems)} problem(s)); "
                         f"was it trained on a different model? {shown}{more}")
    return tsd, len(layers)


def load_frozen_lora(pipe, path, adapter: str = STAGE1_ADAPTER) -> int:
    """Check then load a stage-1 LoRA as ``adapter``; freeze it. Returns its layer count."""
    transformer = pipe.transformer
    _, n_layers = check_lora_matches(transformer, path)
    p = _lora_file(path)
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
