"""The two types every backend module shares: the validated inputs of one call and the
:class:`Backend` record a backend module exposes as ``BACKEND``.

They live below the registry (``storyattn.backends``) so that a backend module imports
only this file and the registry imports the backend modules: one direction, no circle.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch


@dataclass
class SegmentInputs:
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

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]


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
    name: str
    forward: ForwardFn
    # () -> None when usable on this machine, else a reason including how to install.
    availability: Callable[[], Optional[str]]
    # (inputs) -> None when these inputs can run, else the reason.
    check: Callable[[SegmentInputs], Optional[str]]
    # higher runs first when backend=None; per device type ("cpu", "cuda").
    priority: Dict[str, int] = field(default_factory=dict)
    backward: Optional[BackwardFn] = None
