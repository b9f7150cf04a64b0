"""bpp: structured pruning of LLMs by policy gradient, without back-propagation through the model."""
from .errors import BppError
from .load import SUPPORTED_FAMILIES, load_model

__version__ = "0.1.0"
__all__ = ["BppError", "SUPPORTED_FAMILIES", "load_model"]
