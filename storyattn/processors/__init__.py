"""Drop-in diffusers attention processors (diffusers is imported on first use)."""
from .flux_gsa import GroupSharedFluxAttnProcessor, GSAForwardContext

__all__ = ["GroupSharedFluxAttnProcessor", "GSAForwardContext"]
