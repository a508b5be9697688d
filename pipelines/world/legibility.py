"""Can the world's models see a character?  The two measurements made before anything
downstream is trained.

``token_coverage``  how many of the transformer's image tokens each character fills (every
                    identity x slot x size, exact: from the renderer's own masks).  The models
                    see a 64x64 frame as 8 x 8 tokens of 8 x 8 pixels (VAE 4x, 2x2 patches);
                    a character's look has to pass through those tokens.
``vae_roundtrip``   the reader on frames after a VAE encode + decode, against the reader on the
                    same renders (exact on renders: tests/test_world.py): per attribute, the
                    share that survives.  Nothing the VAE loses can be learned downstream.

``python benchmarks/bench_world_legibility.py`` prints both for a weights folder.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from . import data as D
from . import render as R
from .reader import read_image

__all__ = ["token_coverage", "vae_roundtrip", "ROUNDTRIP_KEYS"]

ROUNDTRIP_KEYS = ("scene", "count", "position", "size") + R.ATTRIBUTES


def token_coverage(min_share: float = 1 / 8) -> Dict[str, float]:
    """min / mean tokens per character over every identity, slot and size, and the worst case
    (shape, size)."""
    counts, worst = [], None
    for ident in R.all_identities():
        for pos in R.POSITIONS:
            for size in R.SIZES:
                n = R.character_tokens(R.Placement(ident, pos, size), min_share)
                counts.append(n)
                if worst is None or n < worst[0]:
                    worst = (n, ident.shape, size)
    return {"min_share": min_share, "min": int(min(counts)), "mean": float(np.mean(counts)),
            "tokens_per_frame": (R.SIZE // R.TOKEN_PX) ** 2,
            "worst": f"{worst[2]} {worst[1]}"}


def _agree(a, b) -> Dict[str, Optional[bool]]:
    out = {"scene": a.scene == b.scene, "count": len(a.characters) == len(b.characters)}
    for k in ("position", "size") + R.ATTRIBUTES:
        out[k] = None
    if out["count"]:
        for k in ("position", "size") + R.ATTRIBUTES:
            out[k] = all(x[k] == y[k] for x, y in zip(a.characters, b.characters))
    return out


def vae_roundtrip(vae, n: int = 512, seed: int = 1000, device="cpu", batch: int = 64
                  ) -> Dict[str, float]:
    """Share of ``n`` random world frames (one or two characters, seed ``seed``: not the
    training frames' seeds) whose reading after encode (posterior mode) + decode equals the
    reading of the render, per key of ``ROUNDTRIP_KEYS``; a frame whose character count
    changed counts as lost for every per-character key."""
    import torch

    from ..model_presets import images_to_tensor, tensor_to_uint8

    frames = [f[0] for f in D.make_base_frames(n, seed=seed)]
    hits = {k: 0 for k in ROUNDTRIP_KEYS}
    vae = vae.to(device).eval()
    with torch.no_grad():
        for i in range(0, n, batch):
            x = images_to_tensor(frames[i:i + batch]).to(device=device, dtype=vae.dtype)
            rec = tensor_to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample.float())
            for img, r in zip(frames[i:i + batch], rec):
                got = _agree(read_image(img), read_image(r))
                for k, v in got.items():
                    hits[k] += bool(v)
    return {k: hits[k] / n for k in ROUNDTRIP_KEYS}
