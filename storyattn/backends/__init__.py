"""Backend registry for :func:`storyattn.segment_attention`.

Each backend lives in its own small module and exposes a :class:`Backend` as ``BACKEND``:
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
from typing import Dict, List, Optional

import torch

from .base import Backend, SegmentInputs

__all__ = ["Backend", "SegmentInputs", "available", "all_backends", "get", "register",
           "select"]


_REGISTRY: Dict[str, Backend] = {}

# Modules that each define one ``BACKEND``; this registry imports them, never the reverse.  Imported lazily (first use of
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
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a backend module not written for this build
            if e.name != mod:
                raise
            continue
        register(module.BACKEND)


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
