"""Public segment-attention op and the merge of attention states.

Layout follows diffusers: ``[batch, tokens, heads, head_dim]``.  The log-sum-exp
(lse) is always float32, natural log, ``[batch, heads, tokens]``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch

from . import backends as _backends
from .backends._custom_op import run as _run
from .backends._merge import merge_states, merge_states_  # noqa: F401  (re-exported)
from .backends.base import SegmentInputs

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Optional[torch.Tensor]) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), "
                        f"got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims [batch, tokens, heads, head_dim], "
                         f"got shape {_shape(t)}")


def validate(q, k, v, ref_k=None, ref_v=None, ref_index=None, scale=None) -> SegmentInputs:
    """Check the arguments of :func:`segment_attention` and normalise them.

    Raises ``TypeError`` (wrong types/dtypes) or ``ValueError`` (shapes, ranges,
    devices) naming the argument and the shapes.  Nothing is broadcast silently.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
    B, Lq, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {_shape(k)} and v {_shape(v)}")
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"k/v must be [B={B}, Lk, H={H}, D={D}] to match q {_shape(q)}, "
                         f"got {_shape(k)}")
    if k.shape[1] == 0:
        raise ValueError(f"k/v must have at least one token (each target attends to its own "
                         f"keys), got {_shape(k)}")
    if B == 0 or H == 0 or D == 0:
        raise ValueError(f"q must have non-zero batch, heads and head_dim, got {_shape(q)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on device {t.device} but q is on device {q.device}")

    if (ref_k is None) != (ref_v is None):
        raise ValueError(f"ref_k and ref_v must be given together, got ref_k {_shape(ref_k)} "
                         f"and ref_v {_shape(ref_v)}")
    if ref_k is not None:
        _check_tensor("ref_k", ref_k, 4)
        _check_tensor("ref_v", ref_v, 4)
        if ref_k.shape != ref_v.shape:
            raise ValueError(f"ref_k and ref_v must have the same shape [P, Lr, H, D], got "
                             f"ref_k {_shape(ref_k)} and ref_v {_shape(ref_v)}")
        if ref_k.shape[2] != H or ref_k.shape[3] != D:
            raise ValueError(f"ref_k/ref_v must be [P, Lr, H={H}, D={D}] to match q {_shape(q)}, "
                             f"got {_shape(ref_k)}")
        for name, t in (("ref_k", ref_k), ("ref_v", ref_v)):
            if t.dtype != q.dtype:
                raise TypeError(f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} is on device {t.device} but q is on device {q.device}")
        if ref_k.shape[0] > 0 and ref_k.shape[1] == 0:
            raise ValueError(f"ref_k/ref_v have P={ref_k.shape[0]} entries of zero tokens: "
                             f"{_shape(ref_k)}")
    P = 0 if ref_k is None else ref_k.shape[0]

    if ref_index is not None:
        if ref_k is None:
            raise ValueError("ref_index was given but there is no reference pool (ref_k/ref_v)")
        if not isinstance(ref_index, torch.Tensor):
            raise TypeError(f"ref_index must be an integer torch.Tensor [B, R], got "
                            f"{type(ref_index).__name__}")
        if ref_index.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            raise TypeError(f"ref_index must be an integer tensor, got {ref_index.dtype}")
        if ref_index.dim() != 2 or ref_index.shape[0] != B:
            raise ValueError(f"ref_index must be [B={B}, R], got {_shape(ref_index)}")
        if ref_index.device != q.device:
            raise ValueError(f"ref_index is on device {ref_index.device} but q is on device {q.device}")
        # The range check reads the values (a host sync); under torch.compile it
        # would break the graph, so it runs in eager mode only.
        if ref_index.numel() > 0 and not torch.compiler.is_compiling():
            lo, hi = int(ref_index.min()), int(ref_index.max())
            if lo < -1 or hi >= P:
                raise ValueError(f"ref_index entries must be in [-1, P={P}) (-1 = none), "
                                 f"got values in [{lo}, {hi}]")
        ref_index = ref_index.to(torch.int64)

    if P == 0:
        ref_k = ref_v = None
        ref_index = None

    if scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        scale = float(scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number, got {scale}")
    return SegmentInputs(q, k, v, ref_k, ref_v, ref_index, scale)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      ref_k: Optional[torch.Tensor] = None, ref_v: Optional[torch.Tensor] = None,
                      *, ref_index: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                      return_lse: bool = False, backend: Optional[str] = None,
                      ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Softmax attention of each target over its own keys plus shared reference keys.

    Target ``b`` attends to the concatenation ``[k[b] ; ref_k[j] for j in S_b]``
    (and the matching values), where ``S_b`` is every pool entry (``ref_index``
    is None) or the entries ``ref_index[b, :]`` with ``-1`` skipped and
    duplicates counted as often as they appear.  The concatenation is never
    materialised, and the pool is never copied per target.

    Args:
        q: ``[B, Lq, H, D]`` queries.
        k, v: ``[B, Lk, H, D]`` each target's own keys/values (``Lk >= 1``).
        ref_k, ref_v: ``[P, Lr, H, D]`` pool of ``P`` reference entries shared by
            all targets, or None.  Same dtype and device as ``q``.
        ref_index: None, or an integer tensor ``[B, R]`` of pool entries per
            target (``-1`` = none).
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp.
        backend: ``"torch"``, ``"triton"``, ``"flash"``, ``"xformers"``, ``"cuda"``
            or None to pick the best one that can run these inputs
            (see :func:`available_backends`).

    Returns:
        ``out`` ``[B, Lq, H, D]`` in ``q.dtype``, and with ``return_lse`` also
        ``lse`` ``[B, H, Lq]`` float32 (natural log; not differentiable).

    Differentiable in ``q, k, v, ref_k, ref_v`` on the ``torch`` and ``triton``
    backends; the gradient of a pool entry sums over every target that reads it.

    Example::

        >>> q = torch.randn(4, 64, 2, 32); k = v = torch.randn(4, 64, 2, 32)
        >>> pool_k = pool_v = torch.randn(3, 48, 2, 32)      # 3 references
        >>> out = segment_attention(q, k, v, pool_k, pool_v)  # every target reads all 3
        >>> idx = torch.tensor([[0, -1], [1, 2], [2, 2], [-1, -1]])
        >>> out, lse = segment_attention(q, k, v, pool_k, pool_v, ref_index=idx,
        ...                              return_lse=True)
    """
    inputs = validate(q, k, v, ref_k, ref_v, ref_index, scale)
    be = _backends.select(inputs, backend)
    out, lse = _run(be, inputs)
    return (out, lse) if return_lse else out


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor,
                           out_b: torch.Tensor, lse_b: torch.Tensor
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets.

    ``out_*``: ``[B, L, H, D]``; ``lse_*``: ``[B, H, L]`` natural log.  Returns the
    attention over the union of both key sets: ``lse = logaddexp(lse_a, lse_b)``
    and ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b`` (computed in
    float32, ``out`` returned in ``out_a``'s dtype, ``lse`` in float32).  Rows
    where both lse are ``-inf`` (no keys at all) give ``out = 0`` and
    ``lse = -inf``, never NaN.  Differentiable in all four inputs.
    """
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if out_a.dim() != 4 or out_a.shape != out_b.shape:
        raise ValueError(f"out_a and out_b must both be [B, L, H, D], got {_shape(out_a)} and "
                         f"{_shape(out_b)}")
    B, L, H, _ = out_a.shape
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(t.shape) != (B, H, L):
            raise ValueError(f"{name} must be [B={B}, H={H}, L={L}] to match out {_shape(out_a)}, "
                             f"got {_shape(t)}")
    devs = {t.device for t in (out_a, lse_a, out_b, lse_b)}
    if len(devs) != 1:
        raise ValueError(f"merge_attention_states inputs are on several devices: {devs}")
    out, lse = merge_states(out_a, lse_a, out_b, lse_b)
    return out, lse.to(torch.float32)


def available_backends() -> List[str]:
    """Backends whose packages import here and that can run on some local device.

    ``torch`` is always listed.  ``triton`` is listed when triton imports and a
    CUDA device is present, or on CPU when ``TRITON_INTERPRET=1``.  ``flash``,
    ``xformers`` and ``cuda`` need their optional packages / the built extension
    and a CUDA device.
    """
    return _backends.available()
