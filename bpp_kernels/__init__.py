"""bpp_kernels: evaluate many structured masks of a transformer in one batched pass.

Stands alone: depends on torch (and triton for the GPU path), never on bpp or transformers.
"""
from .layout import pack_attention, pack_swiglu
from .ops import (
    BACKENDS,
    add_rms_norm,
    backend_info,
    linear_cross_entropy,
    mask_to_index,
    masked_attention,
    masked_swiglu,
    rms_norm,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "add_rms_norm",
    "backend_info",
    "linear_cross_entropy",
    "mask_to_index",
    "masked_attention",
    "masked_swiglu",
    "pack_attention",
    "pack_swiglu",
    "rms_norm",
]
