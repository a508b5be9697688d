"""One backend registry for every op: :func:`storyattn.segment_attention` and
:func:`storyattn.rope.qk_norm_rope` (with its cache-writing form).

Each backend lives in its own small module and lists its records in ``BACKENDS``, one per
op it implements (:class:`Backend` for segment attention, :class:`QKNormRopeBackend` for
q/k norm + rope): the function that computes the op, an availability test that returns the
reason (with an install hint) when the backend cannot be imported here, a per-call check
that returns the reason when the backend cannot run *these* inputs, and a priority per
device for ``backend=None``.  Both ops pick a backend the same way (:func:`select`), raise
the same errors, and run their kernels through ``torch.library`` custom ops
(:mod:`._custom_op`), so ``torch.compile`` sees one opaque op with exact fake shapes.

Nothing here touches a GPU at import time; optional packages are imported
lazily inside the availability tests and the real import error is kept for the
message.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Tuple, Union

import torch

from .base import (QK_NORM_ROPE, SEGMENT_ATTENTION, Backend, QKNormRopeBackend,
                   QKNormRopeInputs, SegmentInputs)

__all__ = ["Backend", "QKNormRopeBackend", "SegmentInputs", "QKNormRopeInputs",
           "SEGMENT_ATTENTION", "QK_NORM_ROPE", "available", "all_backends", "availability",
           "get", "register", "select"]

AnyBackend = Union[Backend, QKNormRopeBackend]

# (op, name) -> backend
_REGISTRY: Dict[Tuple[str, str], AnyBackend] = {}

# Modules that each list their records in ``BACKENDS``; this registry imports them, never
# the reverse.  Imported lazily (first use of the registry) so that ``import storyattn``
# stays cheap and GPU-free.
_BACKEND_MODULES = [
    "storyattn.backends.torch_backend",
    "storyattn.backends.triton_backend",
    "storyattn.backends.flash_backend",
    "storyattn.backends.xformers_backend",
    "storyattn.backends.cuda_backend",
]
_LABEL = {SEGMENT_ATTENTION: "segment-attention", QK_NORM_ROPE: "qk_norm_rope"}
_loaded = False
# availability() per backend, computed once per process: it imports optional
# packages and probes devices, which should neither repeat on every call nor be
# traced by torch.compile.
_AVAILABILITY: Dict[Tuple[str, str], Optional[str]] = {}


def register(backend: AnyBackend) -> AnyBackend:
    _REGISTRY[(backend.OP, backend.name)] = backend
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
        for b in module.BACKENDS:
            register(b)


def availability(b: AnyBackend) -> Optional[str]:
    """Cached ``b.availability()``: None when usable here, else the reason."""
    key = (b.OP, b.name)
    if key not in _AVAILABILITY:
        _AVAILABILITY[key] = b.availability()
    return _AVAILABILITY[key]


def get(name: str, op: str = SEGMENT_ATTENTION) -> AnyBackend:
    _load()
    if (op, name) not in _REGISTRY:
        known = sorted(n for o, n in _REGISTRY if o == op)
        raise ValueError(f"unknown {_LABEL[op]} backend {name!r}; known backends: {known} "
                         f"(backend must be one of them or None)")
    return _REGISTRY[(op, name)]


def all_backends(op: Optional[str] = SEGMENT_ATTENTION) -> List[AnyBackend]:
    """The registered backends of ``op`` (every op's with ``op=None``)."""
    _load()
    return [b for (o, _), b in _REGISTRY.items() if op is None or o == op]


def _probe_inputs(device: str, dtype: torch.dtype) -> SegmentInputs:
    q = torch.zeros(1, 1, 1, 64, device=device, dtype=dtype)
    return SegmentInputs(q, q, q, None, None, None, 0.125)


def available() -> List[str]:
    """Names of the segment-attention backends whose packages import and that can run a
    call on some local device (probed with tiny tensors; called on demand, never at
    import)."""
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


def select(inputs, name: Optional[str], op: str = SEGMENT_ATTENTION) -> AnyBackend:
    """The backend of ``op`` to run ``inputs`` on: ``name`` if given (``RuntimeError`` when
    it cannot run here, ``ValueError`` when it cannot run these inputs), else the
    highest-priority backend for the device that can run them."""
    if name is not None:
        b = get(name, op)
        why = availability(b)
        if why is not None:  # not installed / no device: an environment problem
            raise RuntimeError(f"{op} backend {name!r} cannot run this call: {why}")
        why = b.check(inputs)
        if why is not None:  # installed, but these inputs are outside what it supports
            raise ValueError(f"{op} backend {name!r} cannot run these inputs "
                             f"(q {tuple(inputs.q.shape)} {inputs.dtype} on {inputs.device}): "
                             f"{why}")
        return b
    dev = inputs.device.type
    cands = sorted((b for b in all_backends(op) if dev in b.priority),
                   key=lambda b: -b.priority[dev])
    reasons = []
    for b in cands:
        why = availability(b) or b.check(inputs)
        if why is None:
            return b
        reasons.append(f"{b.name}: {why}")
    raise RuntimeError(f"no {op} backend can run this call: " + "; ".join(reasons))
