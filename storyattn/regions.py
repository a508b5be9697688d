"""Regional references: which image tokens of a target may read which of its references.

Why: a target that reads two characters' references in one softmax blends them (every
token of the frame sees both looks, and nothing tells a token which look is its own).
When the caller knows *where* each character stands (a layout: one box per reference),
each image token can read only the reference(s) whose box covers it, and the frame
becomes, token by token, what the model was trained on: one character reading its own
reference.  Measured on the story world (docs/world.md): stage 1 in two-character frames
goes from blending both looks to drawing each one.

Two pieces:

* :func:`region_masks` turns boxes into the token mask ``[B, R, N]`` the GSA modes take
  (``GroupSharedAttention.replay(..., ref_regions=)`` / ``in_batch(..., ref_regions=)``);
  its policy: a token inside one or more boxes reads only those references, a token in no
  box reads every reference (the background is free to look), a reference without a box
  is read by every token.
* :func:`regional_segment_attention` computes it exactly: rows are grouped by the set of
  reference slots they may read, and each group that differs from "all of the target's
  references" is one more :func:`~storyattn.segment_attention` call over the targets that
  have such rows, its ``ref_index`` columns outside the set turned to ``-1``.  A frame with
  two boxes costs three calls for its rows instead of one; frames without regions cost
  nothing extra.  Text tokens read every reference some image token reads (all of them,
  unless a slot's mask is empty: that slot is absent, as a ``-1`` is).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .api import segment_attention

__all__ = ["Box", "region_masks", "regional_segment_attention", "check_ref_regions"]

# (x0, y0, x1, y1) as fractions of the frame's width and height, x to the right, y down
Box = Tuple[float, float, float, float]

# slot sets are bit codes in an int64
MAX_SLOTS = 62


def region_masks(boxes: Sequence[Sequence[Optional[Box]]], grid: Tuple[int, int],
                 num_slots: Optional[int] = None) -> torch.Tensor:
    """Token masks from boxes.

    Args:
        boxes: per target, per reference slot (the columns of its ``ref_index`` row), a box
            ``(x0, y0, x1, y1)`` in fractions of the frame, or None (that reference is read
            by every token).  Rows may be shorter than ``num_slots`` (missing = None).
        grid: ``(rows, cols)`` of the image tokens, in the model's token order (row-major,
            as FLUX packs its 2x2 latent patches).
        num_slots: ``R``, the width of the ``ref_index`` the masks go with (default: the
            longest row of ``boxes``).

    Returns:
        bool ``[B, R, rows * cols]``: token ``i`` of target ``b`` may read slot ``r``.  A
        token whose centre lies in some boxes reads exactly those slots; a token in no box
        reads every slot; a slot without a box is read by every token.
    """
    gh, gw = int(grid[0]), int(grid[1])
    if gh <= 0 or gw <= 0:
        raise ValueError(f"region_masks: grid must be positive (rows, cols), got {grid}")
    R = int(num_slots) if num_slots is not None else max((len(b) for b in boxes), default=0)
    ys = (torch.arange(gh, dtype=torch.float64) + 0.5) / gh
    xs = (torch.arange(gw, dtype=torch.float64) + 0.5) / gw
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    cy, cx = cy.reshape(-1), cx.reshape(-1)
    out = torch.ones(len(boxes), R, gh * gw, dtype=torch.bool)
    for b, row in enumerate(boxes):
        if len(row) > R:
            raise ValueError(f"region_masks: target {b} has {len(row)} boxes for {R} slots")
        inside = torch.zeros(R, gh * gw, dtype=torch.bool)
        boxed = torch.zeros(R, dtype=torch.bool)
        for r, box in enumerate(row):
            if box is None:
                continue
            if len(box) != 4:
                raise ValueError(f"region_masks: box {box!r} of target {b} is not "
                                 "(x0, y0, x1, y1)")
            x0, y0, x1, y1 = (float(v) for v in box)
            if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
                raise ValueError(f"region_masks: box {box!r} of target {b} is not 0 <= x0 < x1 "
                                 "<= 1 and 0 <= y0 < y1 <= 1 (fractions of the frame)")
            inside[r] = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
            boxed[r] = True
        if bool(boxed.any()):
            covered = inside[boxed].any(0)
            # a boxed slot: its box, plus the tokens no box covers
            out[b, boxed] = inside[boxed] | ~covered
    return out


def check_ref_regions(ref_regions: torch.Tensor, num_slots: int, device,
                      rows: Optional[int] = None) -> torch.Tensor:
    """Validate a ``[B, R, N]`` bool mask (host side, once per ``with`` block): ``R`` must be
    ``num_slots`` (the ``ref_index`` width, or the group's references), ``B`` ``rows`` when
    given (the ``ref_index`` rows)."""
    if not isinstance(ref_regions, torch.Tensor) or ref_regions.dtype != torch.bool \
            or ref_regions.dim() != 3:
        raise TypeError("ref_regions must be a bool tensor [B, R, N] (storyattn.region_masks), "
                        f"got {getattr(ref_regions, 'dtype', type(ref_regions).__name__)} "
                        f"{tuple(getattr(ref_regions, 'shape', ()))}")
    if ref_regions.shape[1] != num_slots:
        raise ValueError(f"ref_regions has {ref_regions.shape[1]} slots per target, the targets "
                         f"read {num_slots} references: one mask [N] per reference slot")
    if rows is not None and ref_regions.shape[0] != rows:
        raise ValueError(f"ref_regions has {ref_regions.shape[0]} rows, ref_index {rows}: one "
                         "row per ref_index row")
    if num_slots > MAX_SLOTS:
        raise ValueError(f"ref_regions: at most {MAX_SLOTS} reference slots per target, got "
                         f"{num_slots}")
    return ref_regions.to(device=device)


def regional_segment_attention(q, k, v, ref_k, ref_v, ref_index: torch.Tensor,
                               ref_regions: torch.Tensor, text_len: int,
                               backend: Optional[str] = None) -> torch.Tensor:
    """:func:`~storyattn.segment_attention` where image token ``i`` of target ``b`` reads only
    the slots ``r`` with ``ref_regions[b, r, i]`` (and its own keys); its text tokens read
    every slot that some image token reads.  ``q``: ``[B, text_len + N, H, D]``;
    ``ref_regions``: bool ``[B, R, N]``."""
    B, L, H, D = q.shape
    N = L - text_len
    R = ref_index.shape[1]
    if tuple(ref_regions.shape) != (B, R, N):
        raise ValueError(f"ref_regions {tuple(ref_regions.shape)} does not fit {B} targets x "
                         f"{R} slots x {N} image tokens")
    out = segment_attention(q, k, v, ref_k, ref_v, ref_index=ref_index, backend=backend)
    bits = torch.pow(2, torch.arange(R, device=q.device, dtype=torch.int64))
    reads = ref_regions & (ref_index >= 0)[:, :, None]                       # [B, R, N]
    # each row's set of slots as a bit code: an image token's from its mask; a text token
    # reads every slot some image token reads (a slot masked out everywhere is not in the
    # frame at all, like a -1: how a trainer pads a target that reads fewer references)
    img_codes = (reads.long() * bits[None, :, None]).sum(1)                  # [B, N]
    text_codes = (reads.any(2).long() * bits[None]).sum(1, keepdim=True)     # [B, 1]
    codes = torch.cat([text_codes.expand(B, text_len), img_codes], 1)        # [B, L]
    full = ((ref_index >= 0).long() * bits[None]).sum(1, keepdim=True)       # [B, 1]
    differs = codes != full
    if not bool(differs.any()):
        return out
    out = out.clone()
    for code in torch.unique(codes[differs]).tolist():
        rows = (codes == code) & differs                                     # [B, L]
        sel = rows.any(1).nonzero().squeeze(1)
        keep = torch.bitwise_and(torch.tensor(code, device=q.device), bits) != 0   # [R]
        idx = torch.where(keep[None], ref_index[sel], torch.full_like(ref_index[sel], -1))
        part = segment_attention(q[sel], k[sel], v[sel], ref_k, ref_v, ref_index=idx,
                                 backend=backend)
        out[sel] = torch.where(rows[sel][:, :, None, None], part.to(out.dtype), out[sel])
    return out
