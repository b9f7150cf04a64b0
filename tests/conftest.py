"""Shared fixtures and helpers. The Triton interpreter must be switched on before any @triton.jit
module is imported, so it is set here, at the very top, for CPU runs."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# results cached across runs (bpp.results_cache) would let one test's computation stand in for
# another's; the tests of the cache turn it back on
os.environ["BPP_RESULTS_CACHE"] = "0"

from tests.tiny import FAMILIES, tiny_model, tiny_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny(family):
    """A fresh tiny random model of ``family`` (2 layers, GQA, odd sizes), fp32, eval mode."""
    return tiny_model(family)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


# --- tiny model folders ------------------------------------------------------------------------------

def _save_tiny(folder: Path, family: str) -> Path:
    tiny_model(family).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A model folder with the tiny Llama (``tiny_model("llama")``) and the tiny tokenizer, shared by
    the session: tests read it and never write into it."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama") / "tiny", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A model folder with the tiny Qwen2 (q/k/v biases) and the tiny tokenizer, shared by the
    session: tests read it and never write into it."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-qwen2") / "tiny", "qwen2")


@pytest.fixture(scope="module")
def tiny_llama_loaded(tiny_llama_dir):
    """``bpp.load_model(tiny_llama_dir)``: (model, tokenizer), one pair per test module."""
    import bpp

    return bpp.load_model(tiny_llama_dir)


# --- helpers -----------------------------------------------------------------------------------------

def prune_cmd(model_dir, out, *extra) -> list[str]:
    """``bpp prune`` of a tiny model for 1,500 short steps with a checkpoint every 25: long enough to
    be killed half-way."""
    return [sys.executable, "-m", "bpp", "prune", "--model", str(model_dir), "--steps", "1500", "--samples", "2",
            "--batch-size", "1", "--seq-len", "16", "--init-windows", "2", "--init-seq-len", "16",
            "--sparsity", "0.3", "--checkpoint-every", "25", "--no-eval", "--quiet", "--seed", "7", *extra,
            *(["--out", str(out)] if out else [])]


def kill_9_at_checkpoint(proc: subprocess.Popen, checkpoint: Path, at: int, finished: Path, *,
                         pause: Callable[[], list[int]] | None = None,
                         kill: Callable[[list[int]], list[int]] | None = None, timeout: float = 240) -> int:
    """Kill -9 a running job once its ``checkpoint`` holds step ``at`` or later; return that step.

    Each time the checkpoint file changes, the processes ``pause()`` names (default: ``proc``) are
    stopped with SIGSTOP while the step is read, so a job cannot run on, or finish, between the check
    and the kill. At the kill, ``finished`` (a file only a completed job writes) must not exist. The
    processes ``kill(paused)`` names (default: all paused) get SIGKILL, the others SIGCONT. Fails the
    test when the job ends or ``timeout`` passes before its checkpoint reaches ``at``."""
    import torch

    pause = pause or (lambda: [proc.pid])
    kill = kill or (lambda pids: pids)
    deadline = time.monotonic() + timeout
    seen = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                st = checkpoint.stat()
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp is not None and stamp != seen:
                seen = stamp
                paused = pause()
                for pid in paused:
                    os.kill(pid, signal.SIGSTOP)
                step = torch.load(checkpoint, weights_only=False)["step"]  # written atomically: complete
                victims = kill(paused) if step >= at else []
                if victims:
                    assert not finished.exists(), f"{finished} exists: the job finished before it was killed"
                for pid in paused:
                    os.kill(pid, signal.SIGKILL if pid in victims else signal.SIGCONT)
                if victims:
                    return step
            time.sleep(0.01)
        pytest.fail(f"the job ended (exit code {proc.poll()}) or {timeout:.0f} s passed before its checkpoint "
                    f"reached step {at}")
    except BaseException:
        for pid in ([] if proc.poll() is not None else pause()) + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise
    finally:
        proc.wait(timeout=120)


def isolated_load(path, ids, trust):
    """Load and run the saved folder in a fresh interpreter where bpp cannot be imported."""
    code = f"""
import importlib.abc, json, sys, torch

class NoBpp(importlib.abc.MetaPathFinder):  # as if bpp were not installed (it is, editable)
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('bpp', 'bpp_kernels'):
            raise ImportError('bpp is not installed here')
        return None

sys.meta_path.insert(0, NoBpp())
try:
    import bpp
    raise SystemExit('bpp is importable in the isolated check')
except ImportError:
    pass
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code={trust})
ids = torch.tensor({ids.tolist()})
with torch.no_grad():
    logits = m(ids).logits
    full = m.generate(ids[:1], max_new_tokens=5, do_sample=False, use_cache=True)
    nocache = m.generate(ids[:1], max_new_tokens=5, do_sample=False, use_cache=False)
print(json.dumps({{"logits": logits.tolist(), "cache": full.tolist(), "nocache": nocache.tolist(),
                   "cls": type(m).__name__}}))
"""
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the command line and run folders (test_runs, test_run_safety) ---------------------------------

FAST_CLI = ["--steps", "3", "--samples", "2", "--batch-size", "1", "--seq-len", "16", "--init-windows", "2",
        "--init-seq-len", "16", "--sparsity", "0.3", "--no-eval", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir, tmp_path_factory):
    """A finished bpp prune run (3 steps, with its compacted model)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert cli("prune", "--model", str(tiny_llama_dir), "--out", str(out), *FAST_CLI)[0] == 0
    return out


def cli(*args) -> tuple[int, str]:
    """``bpp ARGS`` in this process: (exit code, what it printed on stderr, as one string)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from bpp.cli import main

    err, out = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stderr(err), redirect_stdout(out):
        try:
            main(list(map(str, args)))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


def one_line_error(code: int, err: str, *needles: str) -> None:
    """The command failed with exit 2 and one ``error: ...`` line holding every needle."""
    assert code == 2, err
    # progress bars (model loading, BESA's blocks) share stderr; the error itself must be one line
    lines = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not re.search(r"\|\s*\d+/\d+ \[", line)]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
