"""Preflight memory estimate for ``python -m pipelines.story_iter`` (before any weights load).

estimate = weights + reference caches + activations + runtime overhead, where

* weights: the parameter counts in the folders' ``*.safetensors`` headers (read without
  loading a tensor) times the bytes of the run's dtype (``*.bin`` files: their size);
* caches: SDXL/GRCA: 2 (K, V) x (references + 1 null entry) x tokens per image x hidden
  size of every IP-Adapter layer; FLUX/GSA: ``ReferenceKVCache.estimate_bytes`` for the
  entries the cache holds at once (all references of a round, or one batch's union);
* activations: a per-row rule of thumb for the denoiser (rows = batch, x2 with CFG)
  plus the VAE decoder at full resolution.  Rough on purpose; the manifest records the
  measured peak next to it so the rule can be checked on real runs.

``check_fits`` raises :class:`PreflightError` with the estimate and concrete options
(``--refs topk:K``, a smaller ``--batch-size``, a lower ``--height/--width``) and what
each would need.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

__all__ = ["PreflightError", "MemoryPlan", "Estimate", "estimate", "available_bytes",
           "check_fits", "safetensors_numel", "GiB"]

GiB = 1024 ** 3

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
                "float64": 8}


class PreflightError(RuntimeError):
    """The run will not fit; the message holds the estimate and the options."""


@dataclass(frozen=True)
class MemoryPlan:
    """What the estimate depends on (everything known before loading weights)."""

    backbone: str                 # "sdxl" | "flux" | "flux2" (same cache layout as flux)
    model: str                    # pipeline folder
    extra_weight_paths: Tuple[str, ...] = ()   # ip-adapter file, image encoder, LoRA files
    dtype: str = "float32"
    device: str = "cpu"
    frames: int = 1
    batch_size: int = 1
    height: int = 1024
    width: int = 1024
    guidance: float = 5.0
    refs: str = "all"             # "all" | "topk:K" | "window:W" | "solo:K"
    extra_refs: int = 0           # character reference images
    characters: int = 1           # the most characters one frame names (solo:K reads K each)
    story_characters: int = 1     # characters in the story (solo:K caches K each)
    ip_adapter: Optional[str] = None


@dataclass
class Estimate:
    weights: int
    caches: int
    activations: int
    overhead: int
    notes: Dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.caches + self.activations + self.overhead

    def describe(self) -> str:
        return (f"{fmt(self.total)} (weights {fmt(self.weights)}, caches {fmt(self.caches)}, "
                f"activations {fmt(self.activations)}, runtime {fmt(self.overhead)})")

    def as_dict(self) -> Dict[str, int]:
        return {"weights": self.weights, "caches": self.caches, "activations": self.activations,
                "overhead": self.overhead, "total": self.total}


def fmt(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 1024 ** 2:.1f} MiB"


def _dtype_bytes(dtype: str) -> int:
    try:
        return _DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (float32, float16, bfloat16)") from None


def _header(path: Path) -> dict:
    """The JSON header; ValueError for a file that is not safetensors (its first 8 bytes
    would otherwise be taken as a length, e.g. a pickle's: a MemoryError)."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if not 2 <= n <= Path(path).stat().st_size - 8:
            raise ValueError(f"{path}: not a safetensors file")
        return json.loads(f.read(n))


def safetensors_numel(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (no tensor data is read)."""
    return {k: tuple(v["shape"]) for k, v in _header(Path(path)).items() if k != "__metadata__"}


def _weights_bytes(paths: List[Path], bytes_per: int) -> int:
    total = 0
    seen = set()
    for root in paths:
        if not root.exists():
            continue
        files = [root] if root.is_file() else sorted(root.rglob("*"))
        for f in files:
            if f in seen or not f.is_file():
                continue
            seen.add(f)
            if f.suffix == ".safetensors":
                n = sum(math.prod(s) for s in safetensors_numel(f).values())
                total += n * bytes_per
            elif f.suffix in (".bin", ".pt", ".pth", ".ckpt"):
                total += f.stat().st_size
    return total


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _vae_scale(model: Path) -> int:
    cfg = _read_config(model / "vae" / "config.json")
    return 2 ** (len(cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)


def _vae_c0(model: Path) -> int:
    cfg = _read_config(model / "vae" / "config.json")
    return int((cfg.get("block_out_channels") or [128])[0])


def refs_per_target(refs: str, frames: int, characters: int = 1) -> int:
    if refs == "all":
        return frames
    kind, _, k = refs.partition(":")
    if kind == "solo":
        return min(frames, int(k) * max(1, characters))
    return min(frames, int(k))


def _sdxl_cache_bytes(plan: MemoryPlan, bytes_per: int) -> Tuple[int, str]:
    """Per-layer GRCA pool: 2 x (N refs + 1 null) x T tokens x hidden, over IP layers."""
    n = plan.frames + plan.extra_refs + 1
    if plan.ip_adapter and Path(plan.ip_adapter).is_file() \
            and Path(plan.ip_adapter).suffix == ".safetensors":
        shapes = safetensors_numel(Path(plan.ip_adapter))
        hidden = sum(s[0] for k, s in shapes.items() if k.endswith("to_k_ip.weight"))
        if "image_proj.latents" in shapes:
            tokens = shapes["image_proj.latents"][1]
        else:
            proj = shapes.get("image_proj.proj.weight")
            norm = shapes.get("image_proj.norm.weight")
            tokens = proj[0] // norm[0] if proj and norm else 4
        return 2 * n * tokens * hidden * bytes_per, f"{n} pool entries x {tokens} tokens"
    # no adapter file to read: SDXL's ten-layer sizes (640/1280 hidden) as an upper bound
    return 2 * n * 16 * 70 * 1280 * bytes_per, "adapter shapes unknown; SDXL sizes assumed"


def _flux_image_tokens(plan: MemoryPlan) -> int:
    s = _vae_scale(Path(plan.model)) * 2  # 2x2 patch packing
    return (plan.height // s) * (plan.width // s)


def flux_cache_entries(plan: MemoryPlan) -> int:
    """Entries the FLUX cache holds at once: the whole round's references when they fit
    the budget the caller checks, else one batch's union (at most batch x K + character refs)."""
    k = refs_per_target(plan.refs, plan.frames)
    if plan.refs == "all":
        return plan.frames + plan.extra_refs
    if plan.refs.startswith("solo:"):       # one choice per character for the whole round
        return min(plan.frames, k * max(1, plan.story_characters)) + plan.extra_refs
    return min(plan.frames, plan.batch_size * k) + plan.extra_refs


def _flux_cache_bytes(plan: MemoryPlan, bytes_per: int) -> Tuple[int, str]:
    cfg = _read_config(Path(plan.model) / "transformer" / "config.json")
    layers = cfg.get("num_layers", 19) + cfg.get("num_single_layers", 38)
    hd = cfg.get("num_attention_heads", 24) * cfg.get("attention_head_dim", 128)
    entries = flux_cache_entries(plan)
    tokens = _flux_image_tokens(plan)
    return 2 * layers * entries * tokens * hd * bytes_per, f"{entries} entries x {tokens} tokens"


def _activations(plan: MemoryPlan, bytes_per: int) -> int:
    model = Path(plan.model)
    scale = _vae_scale(model)
    vae = plan.batch_size * plan.height * plan.width * _vae_c0(model) * bytes_per * 6
    if plan.backbone == "sdxl":
        cfg = _read_config(model / "unet" / "config.json")
        c0 = int((cfg.get("block_out_channels") or [320])[0])
        rows = plan.batch_size * (2 if plan.guidance > 1 else 1)
        tokens = (plan.height // scale) * (plan.width // scale)
        unet = rows * tokens * c0 * bytes_per * 40
        return unet + vae
    cfg = _read_config(model / "transformer" / "config.json")
    hd = cfg.get("num_attention_heads", 24) * cfg.get("attention_head_dim", 128)
    tokens = _flux_image_tokens(plan) + 512
    k = refs_per_target(plan.refs, plan.frames, plan.characters)
    ref_tokens = k * _flux_image_tokens(plan)
    attn = plan.batch_size * (tokens + ref_tokens) * hd * bytes_per * 2  # gathered K/V reads
    return plan.batch_size * tokens * hd * bytes_per * 16 + attn + vae


def estimate(plan: MemoryPlan) -> Estimate:
    bytes_per = _dtype_bytes(plan.dtype)
    weight_paths = [Path(plan.model)] + [Path(p) for p in plan.extra_weight_paths if p]
    weights = _weights_bytes(weight_paths, bytes_per)
    if plan.backbone == "sdxl":
        caches, note = _sdxl_cache_bytes(plan, bytes_per)
    else:
        caches, note = _flux_cache_bytes(plan, bytes_per)
    acts = _activations(plan, bytes_per)
    overhead = int(0.6 * GiB) if plan.device.startswith("cuda") else int(0.5 * GiB)
    return Estimate(weights, caches, acts, overhead, {"caches": note})


def available_bytes(device: str) -> Tuple[int, str]:
    """Free memory on ``device`` and where the number comes from."""
    if str(device).startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free), "torch.cuda.mem_get_info"
    try:
        import psutil  # a dependency of accelerate
    except ImportError:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"], "/proc/meminfo MemAvailable"
    return int(psutil.virtual_memory().available), "psutil.virtual_memory().available"


def check_fits(plan: MemoryPlan, available: Optional[int] = None, source: str = "",
               headroom: float = 0.92) -> Tuple[Estimate, int]:
    """Return ``(estimate, available)`` or raise :class:`PreflightError` with options."""
    if available is None:
        available, source = available_bytes(plan.device)
    est = estimate(plan)
    budget = int(available * headroom)
    if est.total <= budget:
        return est, available
    options = []
    if plan.backbone in ("flux", "flux2"):
        for k in (3, 1):
            if refs_per_target(plan.refs, plan.frames) > k:
                alt = replace(plan, refs=f"topk:{k}")
                options.append((f"--refs topk:{k}", estimate(alt)))
    b = plan.batch_size
    while b > 1:
        b = max(1, b // 2)
        options.append((f"--batch-size {b}", estimate(replace(plan, batch_size=b))))
        if estimate(replace(plan, batch_size=b)).total <= budget:
            break
    h, w = plan.height, plan.width
    m = 8 * _vae_scale(Path(plan.model))
    for f in (2, 4):
        hh, ww = max(m, h // f // m * m), max(m, w // f // m * m)
        if (hh, ww) != (h, w):
            options.append((f"--height {hh} --width {ww}",
                            estimate(replace(plan, height=hh, width=ww))))
    lines = [f"preflight: this run needs about {est.describe()} on {plan.device}, but only "
             f"{fmt(available)} is available ({source}; {int(headroom * 100)}% usable = "
             f"{fmt(budget)}). Nothing was loaded.",
             f"  caches: {est.notes.get('caches', '')}",
             "Options:"]
    for flag, alt in options:
        ok = "fits" if alt.total <= budget else "still too large"
        lines.append(f"  {flag:<28} -> about {fmt(alt.total)} ({ok})")
    if plan.dtype == "float32":
        alt = estimate(replace(plan, dtype="bfloat16"))
        ok = "fits" if alt.total <= budget else "still too large"
        lines.append(f"  {'--dtype bfloat16':<28} -> about {fmt(alt.total)} ({ok})")
    lines.append("  (combine options; --max-memory GiB overrides the available figure)")
    raise PreflightError("\n".join(lines))
