"""Results that depend only on a model, a text and a few options, kept under ``$BPP_CACHE`` by a
digest of all of them, so that a second run on the same model and text skips them (the dense
model's held-out perplexity, BESA's allocation). A key covers every parameter and buffer of the
model (names, dtypes, shapes and bytes), its class and config, the torch and transformers versions
and the CPU's instruction set; the caller adds the rest (the text, the options, its own code).
A file that cannot be read is computed again; a cache that cannot be written costs the next run
the same work, nothing more. Only models on the CPU: on a GPU the work is faster than reading the
weights back to hash them. ``BPP_RESULTS_CACHE=0`` turns it off (the test suite does)."""
from __future__ import annotations

import hashlib
import inspect
import io
import os
from pathlib import Path

import torch


def model_key(model, *parts) -> str | None:
    """The digest of ``model`` and ``parts`` (reprs, tensors, modules: a module counts by its
    source), or None when the model is not on the CPU or a tensor cannot be read back."""
    import transformers

    if os.environ.get("BPP_RESULTS_CACHE", "1") == "0":
        return None
    try:
        if next(model.parameters()).device.type != "cpu":
            return None
        h = hashlib.blake2b(digest_size=20)
        h.update(repr((torch.__version__, transformers.__version__, torch.backends.cpu.get_cpu_capability(),
                       type(model).__name__, model.config.to_json_string(use_diff=False),
                       getattr(model.config, "_attn_implementation", None))).encode())
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
        for part in parts:
            if torch.is_tensor(part):
                h.update(f"{part.dtype} {tuple(part.shape)}".encode())
                h.update(part.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
            elif inspect.ismodule(part):
                h.update(inspect.getsource(part).encode())
            else:
                h.update(repr(part).encode())
        return h.hexdigest()
    except Exception:  # a meta or offloaded tensor, a module without source: no cache
        return None


def path(kind: str, key: str, suffix: str) -> Path:
    from .embedded import cache_dir

    return cache_dir() / kind / f"{key}{suffix}"


def load(kind: str, key: str | None):
    """The object saved under ``kind``/``key`` (tensors, numbers, strings, lists and dicts of them),
    or None when there is none or it cannot be read."""
    if key is None:
        return None
    try:
        return torch.load(path(kind, key, ".pt"), weights_only=True)
    except Exception:  # missing, truncated or not ours: computed again
        return None


def save(kind: str, key: str | None, obj) -> None:
    """Save ``obj`` under ``kind``/``key`` atomically; a cache that cannot be written is skipped."""
    from .fileio import atomic_file

    if key is None:
        return
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        target = path(kind, key, ".pt")
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as tmp:  # a unique temporary name: two runs may write the same key
            tmp.write_bytes(buffer.getvalue())
    except OSError:
        pass
