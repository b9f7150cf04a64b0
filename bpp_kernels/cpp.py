"""The C++ CPU backend: thin wrappers over ``torch.ops.bpp.*`` from the extension ``bpp_kernels._C``.

Each function here has the signature of its op in :mod:`bpp_kernels.reference`. Fake (meta)
implementations are registered so ``torch.compile`` can trace through the ops.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.bpp.*)

    AVAILABLE = True
except ImportError:
    AVAILABLE = False


if AVAILABLE:

    @torch.library.register_fake("bpp::mask_to_index")
    def _mask_to_index_fake(mask):
        S, n = mask.shape
        return mask.new_empty((S, n), dtype=torch.int32), mask.new_empty((S,), dtype=torch.int32)

    def mask_to_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.bpp.mask_to_index(mask)
