"""Drawing world frames with the trained models: text only, or with GSA references in-batch.

``load_world(path, loras)`` loads the pipeline with ``FluxPipeline.from_pretrained`` and the
LoRA files with ``load_lora_weights`` (the same calls a user makes).  ``draw`` runs FLUX's
flow-matching Euler sampling (the pipeline's own scheduler, sigmas and resolution shift) in a
loop that can hold references in the batch: each target row is followed by its clean reference
rows at timestep 0, inside ``GroupSharedAttention.in_batch`` (exactly what stage gsa trains).
Targets are grouped by how many references they read (a group has one size).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from storyattn import region_masks

from .. import flux_inputs as TM
from ..world import data as D
from ..model_presets import WORLD_MAX_SEQUENCE_LENGTH as MAX_SEQUENCE_LENGTH
from ..model_presets import images_to_tensor
from ..world.reader import read_image

__all__ = ["load_world", "draw", "reference_prompt"]


def load_world(path, loras: Sequence[str] = (), device="cpu", dtype=torch.float32):
    """FluxPipeline from a local folder, with LoRA files (paths) active at weight 1."""
    from diffusers import FluxPipeline

    from ..lora_files import LORA_WEIGHT_NAME, load_lora_files

    pipe = FluxPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    # a training output folder stands for the LoRA file the trainer writes into it
    files = [str(Path(lp) / LORA_WEIGHT_NAME) if Path(lp).is_dir() else str(lp)
             for lp in loras]
    load_lora_files(pipe, files, "flux")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_prompt(image, name: str) -> str:
    """The world prompt of a reference image of ``name`` (scene, size and slot read from it)."""
    r = read_image(image)
    ch = r.characters[0] if r.characters else None
    scene = r.scene if r.scene != "unknown" else "day"
    size = ch["size"] if ch and ch["size"] != "unknown" else "big"
    pos = ch["position"] if ch else "centre"
    return D.frame_prompt(scene, [(name, size, pos)])


@torch.no_grad()
def _sigmas(pipe, steps: int, seq_len: int, device):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = pipe.scheduler
    sig = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(seq_len, sched.config.get("base_image_seq_len", 256),
                         sched.config.get("max_image_seq_len", 4096),
                         sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.15))
    sched.set_timesteps(sigmas=sig, mu=mu, device=device)
    return sched.sigmas.to(device)        # steps + 1 values, last 0


@torch.no_grad()
def draw(pipe, prompts: List[str], seeds: Sequence[int], steps: int = 20,
         refs: Optional[List[List]] = None, ref_prompts: Optional[List[List[str]]] = None,
         gsa=None, batch: int = 16, ref_sigma: float = 0.0,
         regions: Optional[List[List]] = None) -> List[np.ndarray]:
    """Draw one 64x64 frame per prompt; ``refs[i]``: reference images of frame i (needs
    ``gsa``, a ``GroupSharedAttention`` on ``pipe.transformer``).  Frame i's noise comes from
    ``seeds[i]`` alone (the same noise ``FluxPipeline`` draws from a generator with that seed),
    so a frame does not depend on its batch.  ``ref_sigma`` > 0 feeds the
    references noised to that level (a check that clean references matter).  ``regions[i]``:
    one box (or None) per reference of frame i, where that reference is read
    (:func:`storyattn.region_masks`); None = every token reads every reference."""
    device = pipe.transformer.device
    dtype = pipe.transformer.dtype
    n = len(prompts)
    refs = refs or [[] for _ in range(n)]
    ref_prompts = ref_prompts or [[""] * len(r) for r in refs]
    out: List[Optional[np.ndarray]] = [None] * n
    by_k: Dict[int, List[int]] = {}
    for i in range(n):
        by_k.setdefault(len(refs[i]), []).append(i)
    vae = pipe.vae
    hw = 64 // pipe.vae_scale_factor
    img_ids = TM.image_ids(hw, hw, device, dtype)
    for k, items in sorted(by_k.items()):
        if k and gsa is None:
            raise ValueError("frames with references need gsa (a GroupSharedAttention)")
        per = max(1, batch // (k + 1))
        for s in range(0, len(items), per):
            chunk = items[s:s + per]
            rows_prompts = []
            for i in chunk:
                rows_prompts += [prompts[i]] + list(ref_prompts[i])
            text = TM.encode_prompts(pipe, rows_prompts, device, MAX_SEQUENCE_LENGTH)
            emb = torch.stack([text[p][0] for p in rows_prompts]).to(device, dtype)
            pooled = torch.stack([text[p][1] for p in rows_prompts]).to(device, dtype)
            # the noise FluxPipeline draws for a generator seeded so: [1, C, h, w], packed
            c = pipe.transformer.config.in_channels // 4
            noise = torch.cat([torch.randn((1, c, hw, hw), generator=torch.Generator()
                                           .manual_seed(int(seeds[i]))) for i in chunk])
            x = TM.pack_latents(noise).to(device, dtype)
            ref_lat = None
            if k:
                pix = images_to_tensor([np.asarray(im.convert("RGB") if hasattr(im, "convert")
                                                   else im) for i in chunk for im in refs[i]])
                ref_lat = TM.pack_latents(TM.encode_latents(vae, pix)).to(device, dtype)
                ref_lat = ref_lat.view(len(chunk), k, *ref_lat.shape[1:])
                if ref_sigma > 0:
                    g = torch.Generator().manual_seed(12345)
                    rn = torch.randn(ref_lat.shape, generator=g).to(device, dtype)
                    ref_lat = (1 - ref_sigma) * ref_lat + ref_sigma * rn
            sig = _sigmas(pipe, steps, x.shape[1], device)
            for t in range(steps):
                st = sig[t].expand(len(chunk)).to(dtype)
                if k:
                    rows = torch.cat([x[:, None], ref_lat], 1).flatten(0, 1)
                    ts = torch.zeros(len(chunk), k + 1, device=device, dtype=dtype)
                    ts[:, 0] = st
                    ts[:, 1:] = ref_sigma
                    masks = None if regions is None else region_masks(
                        [regions[i] for i in chunk], (hw // 2, hw // 2), num_slots=k)
                    with gsa.in_batch(group_size=k + 1, num_targets=1, ref_regions=masks):
                        v = TM.flux_forward(pipe.transformer, rows, emb, pooled, ts.flatten(),
                                            img_ids, None)
                    v = v.view(len(chunk), k + 1, *v.shape[1:])[:, 0]
                else:
                    v = TM.flux_forward(pipe.transformer, x, emb, pooled, st, img_ids, None)
                x = x + (sig[t + 1] - sig[t]).to(dtype) * v
            lat = pipe._unpack_latents(x, 64, 64, pipe.vae_scale_factor)
            lat = lat / vae.config.scaling_factor + vae.config.shift_factor
            img = vae.decode(lat.to(vae.dtype)).sample
            img = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            for j, i in enumerate(chunk):
                out[i] = img[j].permute(1, 2, 0).cpu().numpy()
    return out
