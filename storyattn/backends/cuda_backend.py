"""``cuda`` backend: the precompiled kernels of ``storyattn._C`` (sources in ``csrc/``).

Inference only (no backward).  Two forward paths:

* **kernel** -- ``csrc/segment_attn_fwd.cu``: one FA2-style tensor-core kernel
  that walks the own keys and then the pool entries named by ``ref_index`` in a
  single online softmax (fp32 accumulation, no partial outputs, no merge pass).
  fp16/bf16, head_dim 64 or 128, compute capability >= 8.0.
* **fa3** -- when FlashAttention-3 (module ``flash_attn_interface``, package
  ``flash_attn_3``) imports and the device is sm_90: FA3's lse-returning
  forward per segment, merged in place by ``csrc/merge_states.cu``.  With a
  page table, column ``r`` of ``ref_index`` is one segment for every target
  (entries gathered per target) and the merge takes it only where
  ``ref_index[:, r] >= 0`` -- a device-side mask, so no host sync and the launch
  shapes do not depend on the table's contents (CUDA-graph friendly).
  FA3 is the faster path on Hopper; partial outputs are rounded to the
  activation dtype before merging (the fused kernel avoids that rounding).

``storyattn._C`` is imported lazily by the availability test, never at
``import storyattn``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import torch

from ._primitives import vector_ready
from ._qk import fused_reason, norm_params
from .base import Backend, QKKernelArgs, QKNormRopeBackend, QKNormRopeInputs, SegmentInputs
from . import _cuda_ext

_DTYPES = (torch.float16, torch.bfloat16)
_FA3_MAX_HEAD_DIM = 256


@lru_cache(maxsize=None)
def _fa3():
    """(flash_attn_func, None) when FlashAttention-3 imports, else (None, reason)."""
    try:
        from flash_attn_interface import flash_attn_func
        return flash_attn_func, None
    except Exception as e:  # keep the real reason: missing package, ABI mismatch...
        return None, f"flash_attn_3 does not import ({type(e).__name__}: {e})"


def fa3_error() -> Optional[str]:
    return _fa3()[1]


def _fa3_fwd(q, k, v, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    """FA3 forward returning ``(out, lse)`` (natural log, float32, ``[B, H, Lq]``).

    FA3 releases differ: early ones always return ``(out, lse)``, later ones only
    with ``return_attn_probs=True`` (and reject the keyword before it existed).
    """
    fn = _fa3()[0]
    try:
        res = fn(q, k, v, softmax_scale=scale, causal=False, return_attn_probs=True)
    except TypeError:
        res = fn(q, k, v, softmax_scale=scale, causal=False)
    if not isinstance(res, (tuple, list)) or len(res) < 2:
        raise RuntimeError("this flash_attn_3 release does not return the softmax lse; "
                           "upgrade flash_attn_3 or use the fused kernel path")
    # some releases pad the lse's query axis; keep the real rows
    return res[0], res[1][..., : q.shape[1]].float()


def _cuda_capability(device: torch.device) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _use_fa3(inputs: SegmentInputs) -> bool:
    return fa3_error() is None and _cuda_capability(inputs.device)[0] == 9


def _availability() -> Optional[str]:
    why = _cuda_ext.extension_error()
    if why is not None:
        return why
    if not torch.cuda.is_available():
        return "storyattn._C is built but no CUDA device is visible"
    return None


def _check(inputs: SegmentInputs) -> Optional[str]:
    if inputs.device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got device {inputs.device}"
    if inputs.needs_grad:
        return ("the cuda backend is inference-only (forward kernels, no backward); "
                "use backend='triton' or 'torch' when gradients are needed")
    if inputs.dtype not in _DTYPES:
        return f"the cuda backend supports float16/bfloat16, got {inputs.dtype}"
    major, minor = _cuda_capability(inputs.device)
    if major < 8:
        return f"the cuda backend needs compute capability >= 8.0, got {major}.{minor}"
    d = inputs.head_dim
    if _use_fa3(inputs):
        if d > _FA3_MAX_HEAD_DIM or d % 8 != 0:
            return f"flash_attn_3 supports head_dim <= 256 and a multiple of 8, got {d}"
    elif d not in _cuda_ext.SEGMENT_ATTN_HEAD_DIMS:
        return (f"the fused cuda kernel supports head_dim in {_cuda_ext.SEGMENT_ATTN_HEAD_DIMS}, "
                f"got {d}" + ("" if fa3_error() is None else
                              f" (larger/odd head dims need flash_attn_3 on sm_90: {fa3_error()})"))
    return None


# csrc's kernels copy 16-byte chunks: the same alignment torch's flash kernels need.
_kernel_ready = vector_ready


def forward_kernel(inputs: SegmentInputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused ``csrc`` kernel: one pass over own keys + pool entries."""
    return _cuda_ext.segment_attn_fwd_cuda(
        _kernel_ready(inputs.q), _kernel_ready(inputs.k), _kernel_ready(inputs.v),
        _kernel_ready(inputs.ref_k), _kernel_ready(inputs.ref_v), inputs.ref_index,
        inputs.scale)


def forward_fa3(inputs: SegmentInputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """FA3 per segment + the in-place CUDA merge (see the module docstring)."""
    q, scale = inputs.q, inputs.scale
    B, Lq, H, D = q.shape
    out, lse = _fa3_fwd(q, inputs.k, inputs.v, scale)
    out = out.contiguous()
    lse = lse.contiguous()
    ref_k, ref_v, ref_index = inputs.ref_k, inputs.ref_v, inputs.ref_index
    if ref_k is None:
        return out, lse
    P, Lr = ref_k.shape[:2]
    if ref_index is None:
        # Every target reads the whole pool: fold the batch into the query length
        # and the pool into one key segment -- one FA3 call, the pool never copied.
        po, pl = _fa3_fwd(q.reshape(1, B * Lq, H, D), ref_k.reshape(1, P * Lr, H, D),
                          ref_v.reshape(1, P * Lr, H, D), scale)
        po = po.reshape(B, Lq, H, D)
        pl = pl.reshape(H, B, Lq).permute(1, 0, 2)  # strided view; the merge takes strides
        _cuda_ext.merge_states_(out, lse, po, pl)
        return out, lse
    for r in range(ref_index.shape[1]):
        col = ref_index[:, r]
        take = col >= 0
        entries = col.clamp(min=0)  # -1 rows read entry 0 and are masked out of the merge
        po, pl = _fa3_fwd(q, ref_k.index_select(0, entries), ref_v.index_select(0, entries),
                          scale)
        _cuda_ext.merge_states_(out, lse, po, pl, take)
    return out, lse


def forward(inputs: SegmentInputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Lq, H, D] in q's dtype, lse [B, H, Lq] float32 natural log)``."""
    if _use_fa3(inputs):
        return forward_fa3(inputs)
    return forward_kernel(inputs)


SEGMENT_ATTENTION = Backend(
    name="cuda",
    forward=forward,
    availability=_availability,
    check=_check,
    # Below triton (50) for backend=None until bench_cuda.py on a GPU shows the
    # precompiled path wins; backend="cuda" selects it explicitly.
    priority={"cuda": 45},
)


# ----------------------------------------------------------------------------- qk_norm_rope
# csrc/qk_norm_rope.cu: forward only, always normalises both and rotates, one eps.

def _qk_check(inputs: QKNormRopeInputs) -> Optional[str]:
    # the extension is asked per call, not through the cached availability: where its
    # kernel runs is the loaded extension's answer (a GPU build, or the tests' host
    # emulation on CPU tensors)
    why = _cuda_ext.extension_error()
    if why is not None:
        return why
    want = _cuda_ext.kernel_device_type()
    if inputs.device.type != want:
        return f"tensors are on {inputs.device}; the cuda kernel needs {want} tensors"
    if inputs.rotary is None:
        return "no image_rotary_emb: the cuda kernel always rotates (use 'torch' or 'triton')"
    for norm, name in ((inputs.norm_q, "norm_q"), (inputs.norm_k, "norm_k")):
        if norm is None:
            return f"{name} is None: the cuda kernel always normalises (use 'torch' or 'triton')"
    why = fused_reason(inputs, "cuda", _cuda_ext.QK_NORM_ROPE_MAX_HEAD_DIM)
    if why is not None:
        return why
    eps = {norm_params(n, inputs.dtype)[1] for n in (inputs.norm_q, inputs.norm_k)}
    if len(eps) > 1:
        return f"norm_q and norm_k use different eps {sorted(eps)}; the cuda kernel takes one"
    return None


def _pair_ready(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The cuda kernel moves RoPE pairs as one access: unit stride on the last
    dim, even other strides, pair-aligned address.  Copy only when that fails."""
    if t is None:
        return None
    ok = (t.stride(-1) == 1 and all(s % 2 == 0 for s in t.stride()[:-1])
          and t.data_ptr() % (2 * t.element_size()) == 0)
    return t if ok else t.contiguous()


def _table(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else _pair_ready(t.float())


def _qk_kernel(a: QKKernelArgs):
    p = a.pool
    if p is not None:
        for pool, name in ((p.pool_k, "pool_k"), (p.pool_v, "pool_v")):
            if _pair_ready(pool) is not pool:
                raise ValueError(f"{name} must have a unit-stride head dim, even strides and a "
                                 "pair-aligned address for the cuda backend (it is written in "
                                 "place)")
    return _cuda_ext.qk_norm_rope_cuda(
        _pair_ready(a.q), _pair_ready(a.k),
        None if a.weight_q is None else _pair_ready(a.weight_q),
        None if a.weight_k is None else _pair_ready(a.weight_k),
        _table(a.cos), _table(a.sin), a.eps_q, round_norm=True,
        q_round_before_weight=a.round_q, k_round_before_weight=a.round_k,
        v=None if p is None else _pair_ready(p.v),
        pool_k=None if p is None else p.pool_k, pool_v=None if p is None else p.pool_v,
        entry_ids=None if p is None else p.index.contiguous(),
        img_start=0 if p is None else p.start,
        extra_cos=None if p is None else _table(p.cos),
        extra_sin=None if p is None else _table(p.sin))


QK_NORM_ROPE = QKNormRopeBackend(
    name="cuda",
    availability=lambda: None,   # see _qk_check
    check=_qk_check,
    priority={},                 # by name only: the default on CUDA is triton's kernel
    kernel=_qk_kernel,
)

BACKENDS = (SEGMENT_ATTENTION, QK_NORM_ROPE)
