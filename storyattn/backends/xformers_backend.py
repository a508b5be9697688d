"""``xformers`` backend: xformers' memory-efficient forward with lse, per segment, merged.

xformers returns the lse in natural log, ``[B, H, Lq]`` (padded on some
versions; trimmed here).
"""
from __future__ import annotations

from functools import lru_cache

from .base import Backend, SegmentInputs
from ._adapter import common_check, guarded_import, split_merge_forward


@lru_cache(maxsize=None)
def _import():
    return guarded_import("xformers.ops", "fmha", "pip install 'storyattn[xformers]'")


def _availability():
    return _import()[1]


def _fwd(q, k, v, scale):
    fmha = _import()[0]
    out, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, scale=scale)
    return out, lse[..., : q.shape[1]].float()


def forward(inputs: SegmentInputs):
    return split_merge_forward(inputs, _fwd)


SEGMENT_ATTENTION = Backend(
    name="xformers",
    forward=forward,
    availability=_availability,
    check=lambda i: common_check(i, "xformers", 256),
    priority={"cuda": 30},
)

BACKENDS = (SEGMENT_ATTENTION,)
