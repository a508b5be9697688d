"""``flash`` backend: flash-attn's lse-returning forward per segment, merged.

flash-attn returns ``softmax_lse`` ``[B, H, Lq]`` in natural log (FlashInfer
and the Triton tutorial use base 2; flash-attn does not), so no conversion is
needed here -- tests/test_segment_attention.py checks the convention on GPU.
"""
from __future__ import annotations

from functools import lru_cache

from .base import Backend, SegmentInputs
from ._adapter import common_check, guarded_import, split_merge_forward


@lru_cache(maxsize=None)
def _import():
    return guarded_import("flash_attn", "flash_attn_func", "pip install 'storyattn[flash]' (needs CUDA)")


def _availability():
    return _import()[1]


def _fwd(q, k, v, scale):
    flash_attn_func = _import()[0]
    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
    return out, lse[..., : q.shape[1]].float()


def forward(inputs: SegmentInputs):
    return split_merge_forward(inputs, _fwd)


SEGMENT_ATTENTION = Backend(
    name="flash",
    forward=forward,
    availability=_availability,
    check=lambda i: common_check(i, "flash-attn", 256),
    priority={"cuda": 40},
)

BACKENDS = (SEGMENT_ATTENTION,)
