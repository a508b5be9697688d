"""The types every backend module shares: the validated inputs of one call of each op and
the records a backend module lists in ``BACKENDS`` (one per op it implements).

Two ops go through the registry: ``segment_attention`` (:class:`Backend`) and
``qk_norm_rope`` (:class:`QKNormRopeBackend`).  They live below the registry
(``storyattn.backends``) so that a backend module imports only this file and the registry
imports the backend modules: one direction, no circle.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch


SEGMENT_ATTENTION = "segment_attention"
QK_NORM_ROPE = "qk_norm_rope"


class _OnQ:
    """Device, dtype and head dim of a call are its queries': the backends' checks ask."""

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]


@dataclass
class SegmentInputs(_OnQ):
    """Validated inputs of one segment-attention call (see ``storyattn.api``).

    ``ref_k``/``ref_v`` are ``None`` when there is no reference pool (``P == 0``
    or not given). ``ref_index`` is ``None`` (every target reads all ``P``
    entries) or an int64 tensor ``[B, R]`` with entries in ``[-1, P)``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    ref_k: Optional[torch.Tensor]
    ref_v: Optional[torch.Tensor]
    ref_index: Optional[torch.Tensor]
    scale: float

    @property
    def needs_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        ts = [self.q, self.k, self.v, self.ref_k, self.ref_v]
        return any(t is not None and t.requires_grad for t in ts)


# forward(inputs) -> (out [B, Lq, H, D] in q.dtype, lse [B, H, Lq] natural log; float32,
# or float64 for float64 inputs so float64 backwards stay exact)
ForwardFn = Callable[[SegmentInputs], "tuple[torch.Tensor, torch.Tensor]"]
# backward(inputs, dout, out, lse) -> (dq, dk, dv, dref_k, dref_v); dref_* None without a pool
BackwardFn = Callable[..., tuple]


@dataclass
class Backend:
    """One implementation of segment attention.

    ``forward`` is a plain (non-autograd) function; ``backward``, when given,
    computes all five gradients from the saved ``out``/``lse``.  The public op
    wraps the pair in one ``torch.library`` custom op with its autograd formula,
    so every backend looks the same to autograd and to ``torch.compile``.  A
    backend without ``backward`` is inference-only and its ``check`` must refuse
    calls that need gradients.
    """
    OP = SEGMENT_ATTENTION
    name: str
    forward: ForwardFn
    # () -> None when usable on this machine, else a reason including how to install.
    availability: Callable[[], Optional[str]]
    # (inputs) -> None when these inputs can run, else the reason.
    check: Callable[[SegmentInputs], Optional[str]]
    # higher runs first when backend=None; per device type ("cpu", "cuda").
    priority: Dict[str, int] = field(default_factory=dict)
    backward: Optional[BackwardFn] = None


# ----------------------------------------------------------------------------- qk_norm_rope

Rotary = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class QKNormRopeInputs(_OnQ):
    """Checked inputs of one :func:`storyattn.rope.qk_norm_rope` call: ``q``/``k``
    ``[B, L, H, D]``, the attention's norm modules (or None) and ``(cos, sin)`` ``[L, D]``
    (or None)."""

    q: torch.Tensor
    k: torch.Tensor
    norm_q: Optional[torch.nn.Module]
    norm_k: Optional[torch.nn.Module]
    rotary: Optional[Rotary]

    @property
    def needs_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        ts = [self.q, self.k] + [getattr(n, "weight", None) for n in (self.norm_q, self.norm_k)
                                 if n is not None]
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


@dataclass
class QKPool:
    """The reference-pool write of :func:`storyattn.rope.qk_norm_rope_into_cache`: rows of
    ``k_out`` / ``v`` from token ``start`` on go to entries ``index`` (int64 ``[B]``, -1 =
    not written; ``rows``: the written rows as a list, or None under torch.compile), keys
    rotated once more by ``cos``/``sin`` ``[B, D]`` when given."""

    v: torch.Tensor
    pool_k: torch.Tensor
    pool_v: torch.Tensor
    index: torch.Tensor
    rows: Optional[list]
    start: int
    cos: Optional[torch.Tensor] = None
    sin: Optional[torch.Tensor] = None


@dataclass
class QKKernelArgs:
    """What a fused q/k norm + rope kernel takes: the norm modules turned into tensors and
    flags (``weight`` None = no affine, ``on`` False = no norm), everything else as given."""

    q: torch.Tensor
    k: torch.Tensor
    weight_q: Optional[torch.Tensor]
    weight_k: Optional[torch.Tensor]
    eps_q: float
    eps_k: float
    round_q: bool
    round_k: bool
    norm_q: bool
    norm_k: bool
    cos: Optional[torch.Tensor]
    sin: Optional[torch.Tensor]
    pool: Optional[QKPool] = None


@dataclass
class QKNormRopeBackend:
    """One implementation of q/k norm + rope.

    Either ``module_forward`` (calls the norm modules themselves: differentiable, keeps any
    hook or adapter on them; runs directly) or ``kernel`` (a forward-only fused kernel on
    :class:`QKKernelArgs`; the public op runs it inside one ``torch.library`` custom op, so
    ``torch.compile`` sees one opaque op with exact fake shapes, as for segment attention).
    ``availability``/``check``/``priority`` mean what they mean on :class:`Backend`.
    """
    OP = QK_NORM_ROPE
    name: str
    availability: Callable[[], Optional[str]]
    check: Callable[[QKNormRopeInputs], Optional[str]]
    priority: Dict[str, int] = field(default_factory=dict)
    module_forward: Optional[Callable[[QKNormRopeInputs, Optional[QKPool]], Tuple]] = None
    kernel: Optional[Callable[[QKKernelArgs], Tuple]] = None
