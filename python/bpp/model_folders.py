"""Writing model folders: a model, its tokenizer and extra files saved into a temporary folder
beside the target and renamed into place, with a manifest of what bpp wrote, one writer at a
time (the run-folder rules of :mod:`bpp.runs`)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .fileio import atomic_write_json, io_errors
from .runs import MANIFEST, PARTIAL_MARKER, check_model_folder_target, clean_partials, model_folder_lock


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out``; an old ``out`` is moved aside first and removed
    only once the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_model_folder(model, out: str | os.PathLike, *, tokenizer=None, force: bool = False,
                      extra_files: dict | None = None, copy_files: list | None = None, protected: tuple = ()) -> Path:
    """Save ``model`` (safetensors, config, generation config; the shipped ``modeling_bpp.py`` when
    its config names it in ``auto_map``) and ``tokenizer`` to ``out``, with ``extra_files``
    ({name: text}) and ``copy_files`` (paths copied in), and a manifest of what bpp wrote.

    Written to a temporary folder beside ``out`` and renamed: ``out`` is complete or absent. With
    ``force`` an earlier model folder bpp wrote is replaced; anything else is refused (see
    :mod:`bpp.runs`), as is a target holding one of the ``protected`` inputs."""
    out = Path(out)
    check_model_folder_target(out, force=force, protected=protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = model_folder_lock(out, "model").acquire()
    try:
        clean_partials(out.parent, (out.name,))
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            (tmp / PARTIAL_MARKER).write_text("")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the model folder is not
            with io_errors(tmp):  # a full disk: OSError, not the writer's own exception
                model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for path in copy_files or []:
                shutil.copy2(path, tmp / Path(path).name)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            (tmp / PARTIAL_MARKER).unlink()
            files = sorted(e.name for e in tmp.iterdir())
            atomic_write_json(tmp / MANIFEST, {"tool": "bpp", "job": "model", "files": files})
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()
    return out
