"""The GGUF format (llama.cpp's model file): a model folder → one file llama.cpp runs as is.

- ``plan``: the folder's config and weights → the architecture (``deci`` for per-layer sizes,
  else the family's own) and what each layer of the file holds
- ``tensors``: the file's tensors in writing order, and their encoding (f32, f16, bf16, q8_0)
- ``gemma3``: Gemma 3 as llama.cpp's ``gemma3`` (its checks, layer plan, tensors and keys)
- ``tokenizer``: tokenizer.json → llama.cpp's tokenizer keys
- ``writer``: :func:`prepare` reads and checks a folder whole; :meth:`GGUFFile.write` streams
  the metadata and tensors to a path

Inside this package ``import gguf`` is the PyPI ``gguf`` package (absolute imports), not this one.
"""
from .writer import DTYPES, GGUFFile, prepare

__all__ = ["DTYPES", "GGUFFile", "prepare"]
