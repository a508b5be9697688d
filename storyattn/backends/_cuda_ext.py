"""Python wrappers of the optional CUDA extension ``storyattn._C`` (sources in ``csrc/``).

The extension is built by ``setup.py`` only where a CUDA toolchain and a CUDA
build of torch are present; everywhere else these functions raise a
``RuntimeError`` that carries the real import error and how to build it.
``storyattn._C`` is imported on first use, never at ``import storyattn``.

Ops (inference only: none of them records autograd history):

* :func:`merge_states_` -- in-place merge of two attention states, with an
  optional device-side row mask so one captured CUDA graph serves every step;
* :func:`qk_norm_rope_cuda` -- fused q/k RMSNorm + FLUX RoPE, optionally writing
  the reference image tokens' K/V into a reference pool in the same pass;
* :func:`segment_attn_fwd_cuda` -- the fused segment-attention forward
  (fp16/bf16, head_dim 64/128, sm_80+), returning ``(out, lse)``.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Tuple

import torch

BUILD_HINT = ("build with a CUDA toolchain: pip install -e . --no-build-isolation "
              "(STORYATTN_FORCE_CUDA_BUILD=1)")

#: head dims the fused attention kernel is instantiated for (csrc/segment_attn_fwd.cu)
SEGMENT_ATTN_HEAD_DIMS = (64, 128)
#: the qk_norm_rope kernel keeps a row in registers: at most 256, even
QK_NORM_ROPE_MAX_HEAD_DIM = 256


@lru_cache(maxsize=None)
def _load():
    """(module, None) when ``storyattn._C`` imports, else (None, reason)."""
    try:
        from storyattn import _C  # type: ignore[attr-defined]
        return _C, None
    except Exception as e:  # ImportError, or an undefined-symbol OSError from an ABI mismatch
        return None, (f"the CUDA extension storyattn._C does not import "
                      f"({type(e).__name__}: {e}); {BUILD_HINT}")


def extension_error() -> Optional[str]:
    """None when ``storyattn._C`` is importable, else why not (with the build hint)."""
    return _load()[1]


def kernel_device_type() -> str:
    """Device type of the tensors the extension's kernels take: ``"cuda"``; the
    test-only host emulation of ``csrc/`` (tests/_cuda_emu.py) says ``"cpu"``."""
    mod = _load()[0]
    return getattr(mod, "device_type", "cuda") if mod is not None else "cuda"


def _ext():
    mod, why = _load()
    if mod is None:
        raise RuntimeError(why)
    return mod


def merge_states_(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                  lse_b: torch.Tensor, mask: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """In place: ``(out_a, lse_a) <- merge((out_a, lse_a), (out_b, lse_b))``.

    Args:
        out_a, out_b: ``[B, L, H, D]`` CUDA tensors of one dtype (fp32/fp16/bf16),
            head dim contiguous (other strides free).
        lse_a, lse_b: ``[B, H, L]`` float32, natural log.
        mask: optional bool/uint8 CUDA tensor ``[B]`` (per batch row) or ``[B, L]``
            (per query row); where it is 0 the row keeps segment a unchanged.
            The launch does not depend on its values, so a merge captured in a
            CUDA graph is steered by rewriting the mask in place.

    Rows with ``-inf`` on both sides become ``out = 0``, ``lse = -inf`` (no NaN);
    a side with zero weight is never read.  Returns ``(out_a, lse_a)``.
    """
    _ext().merge_states_(out_a, lse_a, out_b, lse_b, mask)
    return out_a, lse_a


def merge_states(out_a, lse_a, out_b, lse_b, mask=None):
    """Out-of-place :func:`merge_states_` (copies ``out_a`` and ``lse_a`` first)."""
    oa, la = out_a.clone(), lse_a.clone()
    return merge_states_(oa, la, out_b, lse_b, mask)


def qk_norm_rope_cuda(q: Optional[torch.Tensor], k: Optional[torch.Tensor],
                      q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
                      cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6, *,
                      inplace: bool = False, round_norm: bool = True,
                      q_round_before_weight: bool = False,
                      k_round_before_weight: bool = False,
                      v: Optional[torch.Tensor] = None, pool_k: Optional[torch.Tensor] = None,
                      pool_v: Optional[torch.Tensor] = None,
                      entry_ids: Optional[torch.Tensor] = None, img_start: int = 0,
                      extra_cos: Optional[torch.Tensor] = None,
                      extra_sin: Optional[torch.Tensor] = None,
                      ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Fused RMSNorm + FLUX rotary embedding of ``q`` and ``k`` in one launch.

    Per row ``x = t[b, l, h, :]``: ``y = x / sqrt(mean(x^2) + eps) * weight`` (fp32,
    rounded to the input dtype when ``round_norm``, as diffusers' norm output is),
    then ``out[2i] = y[2i] cos[l, 2i] - y[2i+1] sin[l, 2i]``,
    ``out[2i+1] = y[2i+1] cos[l, 2i+1] + y[2i] sin[l, 2i+1]`` -- diffusers'
    ``apply_rotary_emb(..., use_real=True, use_real_unbind_dim=-1)``.

    Args:
        q, k: ``[B, L, H, D]`` CUDA tensors (fp32/fp16/bf16, D even <= 256), either
            may be None.  Layout of diffusers' FLUX attention after ``unflatten``.
        q_weight, k_weight: RMSNorm weights ``[D]`` or None (no affine).
        cos, sin: float32 ``[L, D]`` repeat-interleaved tables (``FluxPosEmbed``).
        inplace: write the results into ``q``/``k`` instead of new tensors.
        q_round_before_weight, k_round_before_weight: reproduce diffusers'
            ``RMSNorm`` with a half-precision weight (it casts before multiplying).
        v, pool_k, pool_v, entry_ids, img_start: optional reference-pool write:
            for rows ``b`` with ``entry_ids[b] >= 0`` (int64 ``[B]``), tokens
            ``[img_start, img_start + Lr)`` of the rotated k (and of ``v``) go to
            ``pool_k/pool_v[entry_ids[b]]`` (``[P, Lr, H, D]``, same dtype).
        extra_cos, extra_sin: optional float32 ``[B, D]``: one more rotation of the
            pooled keys (the reference's own index-axis position).

    Returns ``(q_out, k_out)`` (None where the input was None).
    """
    C = _ext()
    q_out = None if q is None else (q if inplace else torch.empty_like(q))
    k_out = None if k is None else (k if inplace else torch.empty_like(k))
    C.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, float(eps), q_out, k_out, v, pool_k,
                   pool_v, entry_ids, int(img_start), extra_cos, extra_sin, bool(round_norm),
                   bool(q_round_before_weight), bool(k_round_before_weight))
    return q_out, k_out


def segment_attn_fwd_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          ref_k: Optional[torch.Tensor] = None,
                          ref_v: Optional[torch.Tensor] = None,
                          ref_index: Optional[torch.Tensor] = None,
                          scale: Optional[float] = None,
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused segment-attention forward of ``csrc/segment_attn_fwd.cu``.

    Same semantics as :func:`storyattn.segment_attention` (own keys, then the pool
    entries of ``ref_index[b]`` with -1 skipped and duplicates counted; every entry
    when ``ref_index`` is None).  fp16/bf16 ``[B, L, H, D]`` with D in
    :data:`SEGMENT_ATTN_HEAD_DIMS`, compute capability >= 8.0.  Returns ``out``
    ``[B, Lq, H, D]`` and ``lse`` ``[B, H, Lq]`` float32 natural log.  Not
    differentiable.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if ref_index is not None and ref_index.dtype != torch.int64:
        ref_index = ref_index.to(torch.int64)
    out, lse = _ext().segment_attn_fwd(q, k, v, float(scale), ref_k, ref_v, ref_index)
    return out, lse
