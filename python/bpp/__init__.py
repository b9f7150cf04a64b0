"""bpp: structured pruning of LLMs by policy gradient, without back-propagation through the model."""
import importlib

from .errors import BppError
from .load import SUPPORTED_FAMILIES, load_model
from .space import Masks, MaskSpace

__version__ = "0.1.0"
__all__ = ["BppError", "MaskSpace", "MaskedModel", "Masks", "SUPPORTED_FAMILIES", "compact", "load_model"]

# heavier parts load on first use
_LAZY = {"MaskedModel": ".models.masked", "compact": ".compact"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'bpp' has no attribute {name!r}")
