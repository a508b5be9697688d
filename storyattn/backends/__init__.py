"""Backend registry for :func:`storyattn.segment_attention`.

Each backend lives in its own small module and registers a :class:`Backend`:
the function that computes ``(out, lse)`` (differentiable where the backend
supports training), an availability test that returns the reason (with an
install hint) when the backend cannot be imported here, and a per-call check
that returns the reason when the backend cannot run *these* inputs.

Nothing here touches a GPU at import time; optional packages are imported
lazily inside the availability tests and the real import error is kept for the
message.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

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


_REGISTRY: Dict[str, Backend] = {}

# Modules that register a backend when imported.  Imported lazily (first use of
# the registry) so that ``import storyattn`` stays cheap and GPU-free.
_BACKEND_MODULES = [
    "storyattn.backends.torch_backend",
    "storyattn.backends.triton_backend",
    "storyattn.backends.flash_backend",
    "storyattn.backends.xformers_backend",
    "storyattn.backends.cuda_backend",
]
_loaded = False
# availability() per backend, computed once per process: it imports optional
# packages and probes devices, which should neither repeat on every call nor be
# traced by torch.compile.
_AVAILABILITY: Dict[str, Optional[str]] = {}


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BACKEND_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a backend module not written for this build
            if e.name != mod:
                raise


def availability(b: Backend) -> Optional[str]:
    """Cached ``b.availability()``: None when usable here, else the reason."""
    if b.name not in _AVAILABILITY:
        _AVAILABILITY[b.name] = b.availability()
    return _AVAILABILITY[b.name]


def get(name: str) -> Backend:
    _load()
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown segment-attention backend {name!r}; known backends: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def all_backends() -> List[Backend]:
    _load()
    return list(_REGISTRY.values())


def _probe_inputs(device: str, dtype: torch.dtype) -> SegmentInputs:
    q = torch.zeros(1, 1, 1, 64, device=device, dtype=dtype)
    return SegmentInputs(q, q, q, None, None, None, 0.125)


def available() -> List[str]:
    """Names of the backends whose packages import and that can run a call on some
    local device (probed with tiny tensors; called on demand, never at import)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    names = []
    for b in all_backends():
        if availability(b) is not None:
            continue
        with torch.no_grad():
            if any(b.check(_probe_inputs(dev, dt)) is None
                   for dev in devices if dev in b.priority
                   for dt in (torch.float32, torch.bfloat16, torch.float16)):
                names.append(b.name)
    return names


def select(inputs: SegmentInputs, name: Optional[str]) -> Backend:
    """The backend to run ``inputs`` on: ``name`` if given (error if it cannot run),
    else the highest-priority backend for the device that can run them."""
    if name is not None:
        b = get(name)
        why = availability(b)
        if why is not None:  # not installed / no device: an environment problem
            raise RuntimeError(f"segment_attention backend {name!r} cannot run this call: {why}")
        why = b.check(inputs)
        if why is not None:  # installed, but these inputs are outside what it supports
            raise ValueError(f"segment_attention backend {name!r} cannot run these inputs "
                             f"(q {tuple(inputs.q.shape)} {inputs.dtype} on {inputs.device}): {why}")
        return b
    dev = inputs.device.type
    cands = sorted((b for b in all_backends() if dev in b.priority),
                   key=lambda b: -b.priority[dev])
    reasons = []
    for b in cands:
        why = availability(b) or b.check(inputs)
        if why is None:
            return b
        reasons.append(f"{b.name}: {why}")
    raise RuntimeError("no segment_attention backend can run this call: " + "; ".join(reasons))
