"""storyattn: fused segment attention and diffusers processors for consistent stories.

Importing this package never touches a GPU and never needs triton, flash-attn
or xformers; backends are looked up on first use.
"""
from .api import available_backends, merge_attention_states, segment_attention
from .cache import ReferenceKVCache
from .gsa import GroupSharedAttention
# imported for its registration: GroupSharedAttention(flux2_transformer) -> the FLUX.2 handle
from .flux2 import Flux2GroupSharedAttention
from .processors.flux_gsa import GroupSharedFluxAttnProcessor
from .regions import region_masks

__version__ = "0.1.0"

# The two handles stand side by side: gsa.py (FLUX) and grca.py (SDXL).  GRCA's processor
# subclasses diffusers' IP-Adapter processor, so its modules import diffusers: loaded on
# first access to keep ``import storyattn`` light.
_LAZY = {"GlobalReferenceAttnProcessor": ".processors.grca",
         "GRCAHandle": ".grca",
         "install_global_reference_attention": ".grca"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "GroupSharedAttention",
    "GroupSharedFluxAttnProcessor",
    "ReferenceKVCache",
    "segment_attention",
    "merge_attention_states",
    "available_backends",
    "GlobalReferenceAttnProcessor",
    "GRCAHandle",
    "install_global_reference_attention",
    "Flux2GroupSharedAttention",
    "region_masks",
]
