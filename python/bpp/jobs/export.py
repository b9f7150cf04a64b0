"""``bpp.export_gguf``: a compacted model folder → one GGUF file that llama.cpp loads and runs as
is. The format itself (layer plan, tensors, tokenizer) is :mod:`bpp.gguf`."""
from __future__ import annotations

import os
from pathlib import Path

from .. import gguf
from ..errors import BppError
from ..fileio import atomic_file
from ..modelio import resolve_model_dir
from ..runs import clean_partials, model_folder_lock

DTYPES = gguf.DTYPES


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "f32",
                force: bool = False, progress: bool = True) -> Path:
    """Write the model folder ``model_dir`` (a bpp-compacted folder, per-layer sizes or stock, a
    ``bpp prune`` / ``bpp baseline`` run folder holding one in ``model/``, or a stock Llama /
    Mistral / Qwen2 / Qwen3 / Gemma 3 folder) as the GGUF file ``out`` for llama.cpp.
    Per-layer sizes are read from config.json's ``kv_heads_per_layer`` and
    ``intermediate_size_per_layer`` (model type the family's, or ``bpp_pruned_<family>``).

    ``dtype``: "f32", "f16", "bf16" or "q8_0" for the weight matrices (norms, biases and the
    all-zero stand-ins are always f32). q8_0 needs every matrix row width (its input size) to be a
    multiple of 32; otherwise it is refused (compact with ``--round-to 32``, or pick f16).
    The file is written beside ``out`` under a temporary name, synced and renamed, so a failure
    leaves nothing behind; an existing ``out`` is only replaced with ``force``. Returns ``out``."""
    if dtype not in DTYPES:
        raise BppError(f"unknown GGUF dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    folder, out = resolve_model_dir(model_dir), Path(out).expanduser()
    if out.is_dir():
        raise BppError(f"{out} is a folder; give the path of the .gguf file to write")
    if out.exists() and out.resolve().is_relative_to(folder.resolve()):
        raise BppError(f"{out} is a file of the model folder {folder}, which the export reads; write the GGUF "
                       "file elsewhere")
    if out.exists() and not force:
        raise BppError(f"{out} exists; pass --force to replace it")
    file = gguf.prepare(folder, dtype)  # every check on the folder, before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = model_folder_lock(out, "export").acquire()  # one export of `out` at a time
    try:
        clean_partials(out.parent, (out.name,))  # the temporary file a killed export of `out` left
        with atomic_file(out) as tmp:
            file.write(tmp, progress=progress)
    finally:
        lock.release()
    return out
