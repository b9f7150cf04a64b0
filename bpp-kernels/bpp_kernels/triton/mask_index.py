"""mask → index lists on the device. A stable sort of ~mask puts the kept units first in
ascending order; it runs as torch ops on the mask's device (no host sync), which is as fast
as a custom kernel for the few thousand units a model has."""
from ..reference import mask_to_index  # noqa: F401
