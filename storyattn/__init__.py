"""storyattn: fused segment attention and diffusers processors for consistent stories.

Importing this package never touches a GPU and never needs triton, flash-attn
or xformers; backends are looked up on first use.
"""
from .api import available_backends, merge_attention_states, segment_attention
from .cache import ReferenceKVCache
from .gsa import GroupSharedAttention
from .processors.flux_gsa import GroupSharedFluxAttnProcessor
from .processors.grca import GlobalReferenceAttnProcessor, install_global_reference_attention

__version__ = "0.1.0"

__all__ = [
    "GroupSharedAttention",
    "GroupSharedFluxAttnProcessor",
    "ReferenceKVCache",
    "segment_attention",
    "merge_attention_states",
    "available_backends",
    "GlobalReferenceAttnProcessor",
    "install_global_reference_attention",
]
