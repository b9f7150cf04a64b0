"""Model folders in and out: the supported families, loading a model and its tokenizer (the embedded
default, a local folder, a hub id, a folder bpp compacted), and the modeling file that bpp ships
inside compacted folders whose layers differ in size.

Nothing here knows about masks or pruning: every other module reads and writes model folders
through this one.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from .embedded import EMBEDDED_MODELS, GEMMA3_MODEL, cache_dir, embedded_model_dir, load_errors  # noqa: F401  (re-exported)
from .errors import BppError, first_line
from .model_configs import SUPPORTED_FAMILIES, check_config_sizes, check_supported  # noqa: F401  (re-exported)

# Hugging Face class-name prefix of each family (LlamaForCausalLM, ...)
FAMILY_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
                       "gemma3_text": "Gemma3"}
# the transformers module of each family whose model type is not its module's name
FAMILY_MODULE = {"gemma3_text": "gemma3"}
# the config class of each family not named <prefix>Config
FAMILY_CONFIG_CLASS = {"gemma3_text": "Gemma3TextConfig"}
# the linear layers of a decoder block (LoRA targets, and what compaction resizes)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# model_type of per-layer-size folders written by bpp before their config took the family's own
PRUNED_PREFIX = "bpp_pruned_"
MODELING_FILE = "modeling_bpp.py"
_MODELING_TEMPLATE = Path(__file__).parent / "models" / MODELING_FILE
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise BppError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(set(_DTYPES)))}")
    return _DTYPES[dtype]


def native_half_dtype(device: str | torch.device) -> torch.dtype | None:
    """bfloat16 where ``device`` computes it natively (a CPU with AVX512-BF16 or AMX-BF16, the
    instructions bpp_kernels' C++ ops use for it; a GPU that supports it), else None."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    if device.type != "cpu":
        return None
    try:
        caps = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):
        return None
    return torch.bfloat16 if caps.get("avx512_bf16") or caps.get("amx_bf16") else None


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that exists here, or a one-line error."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BppError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise BppError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}); "
                           "use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise BppError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    elif parsed.type != "cpu":
        raise BppError(f"--device {device}: bpp runs on cpu or cuda devices")
    return parsed


def read_config(folder: Path) -> dict:
    """``folder/config.json`` as a dict, or a clear error."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BppError(f"cannot read {folder / 'config.json'}: {e}") from None
    if not isinstance(config, dict):
        raise BppError(f"{folder / 'config.json'} is not a model config (a JSON object)")
    return config


def pruned_family(config: dict) -> str | None:
    """The family of a per-layer-size folder bpp compacted (its config.json as a dict), else None:
    a supported model type with per-layer sizes and bpp's modeling file in ``auto_map`` (or the
    ``bpp_pruned_<family>`` model type of earlier bpp versions)."""
    model_type = str(config.get("model_type"))
    if model_type.startswith(PRUNED_PREFIX) and model_type[len(PRUNED_PREFIX):] in SUPPORTED_FAMILIES:
        return model_type[len(PRUNED_PREFIX):]
    if model_type in SUPPORTED_FAMILIES and "kv_heads_per_layer" in config \
            and MODELING_FILE[:-3] in json.dumps(config.get("auto_map")):
        return model_type
    return None


def _is_bpp_pruned(folder: Path) -> bool:
    return pruned_family(read_config(folder)) is not None


def load_model(name_or_path: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", device_map: str | dict | None = None):
    """``(model, tokenizer)`` for an embedded model (None or "default"; "gemma3-270m"), a local Hugging Face
    folder (a per-layer-size folder written by ``bpp compact`` too: it loads from bpp's copy of its
    modeling file), or a hub id. The model is in eval mode; dtype defaults to float32. ``device_map``
    (e.g. "auto") spreads the layers over the GPUs of a node (accelerate) for models too large
    for one; the masked engine then pipelines the batched samples through them."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    check_device(device)
    if name_or_path is None or str(name_or_path) in EMBEDDED_MODELS:
        source = embedded_model_dir(str(name_or_path or "default"))
    else:
        source = Path(name_or_path).expanduser()
        if source.exists():
            if not (source / "config.json").is_file():
                raise BppError(f"{source} has no config.json: not a Hugging Face model folder")
        elif str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
            raise BppError(f"model {str(name_or_path)!r} not found: give a local folder with config.json, "
                           f"a hub id like 'meta-llama/Llama-2-7b-hf', {GEMMA3_MODEL!r} for the embedded Gemma 3 "
                           "270M, or nothing for the embedded default")
        else:
            source = str(name_or_path)
    if isinstance(source, Path) and _is_bpp_pruned(source):  # a per-layer-size folder bpp compacted
        if device_map is not None:
            raise BppError(f"{source} has per-layer sizes; device_map is not supported for it")
        model, tokenizer, _ = load_pruned(source, dtype=torch_dtype, device=device)
        return model, tokenizer
    raw = read_config(source) if isinstance(source, Path) else {}
    if raw.get("model_type") in SUPPORTED_FAMILIES:  # before transformers builds anything from it
        check_config_sizes(raw, source)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, TypeError) as e:
        raise BppError(f"cannot load the config of {str(source)!r}: {first_line(e, 200)}") from None
    check_supported(config)
    check_config_sizes(config.to_dict(), source)
    with load_errors(source):
        if device_map is not None:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, device_map=device_map).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer


# --- the modeling file shipped inside per-layer-size folders -----------------------------------

def modeling_source(family: str) -> str:
    """The shipped modeling file for ``family`` (torch + transformers only, no bpp)."""
    prefix = FAMILY_CLASS_PREFIX[family]
    return (_MODELING_TEMPLATE.read_text().replace('"FAMILY"', f'"{family}"')
            .replace("FAMILY", FAMILY_MODULE.get(family, family))
            .replace("FamilyConfig", FAMILY_CONFIG_CLASS.get(family, f"{prefix}Config")).replace("Family", prefix))


# sha256 of the modeling files earlier bpp versions shipped (the first: model type bpp_pruned_<family>;
# the second: before Gemma 3; the third: before query-head slots): their folders still load, with this
# version's code (the same model)
_EARLIER_MODELING_FILES = {
    "llama": ("62d6588ebf5916330a7fdc27676af531b99af2f42e937882ecb45bf98331d245",
              "91c72473ca2de6fa95fb2ec332b2f2fd4148fb5349de09f31adaeac6b663bdc4",
              "cf752ca94ca3bb873f0f33245d851646abf9d451189c625a75196c2fce881678"),
    "mistral": ("ce7ed4116b103b53af90b6d6195bf5d6ce9661b7e2424b5ef6e21eb48ae31e49",
                "fdfdbc249b0c493b246b9cf0e1ecb684925631d216bac5586206e554fa9a9e97",
                "2556b33075a2da5c59ed44718c3cdc6399a9f7200821e163f53757b1aec71f81"),
    "qwen2": ("d022b7d6384f27d4b3280af8761c01544084efc1a25cd23dbb5a96f20c79a25c",
              "b8666841793b379607378374f62c315b2fcbb665306778345ed84fef216c7f58",
              "1b68b6edf238c6913adce1e40c503bb8a802222fa53858ac27b70b5b8debf706"),
    "qwen3": ("8339e37a1d527f00c9be7e0230d0888e9f7bfa7df683c3d2117055105cb74983",
              "9c1adce6401ce63ddc0f4f6a1ffbb4998c46e068a871d2b8ccb91c1d5b720523",
              "f59868840fa2f57519f8ecd72600affe456f7254f203d1a8d3960660d8744237"),
    "gemma3_text": ("cf76fdd8cebafe3d12b072db020b59071f2df5838636b18c6b81d66023096867",),
}


def _is_bpps_modeling_file(text: str, family: str) -> bool:
    """``text`` is the modeling file this bpp ships for ``family``, or one an earlier version shipped."""
    return text == modeling_source(family) or \
        hashlib.sha256(text.encode()).hexdigest() in _EARLIER_MODELING_FILES.get(family, ())


def modeling_module(family: str):
    """The rendered modeling file imported as a module (the same code the saved folder ships).

    It is imported as ``bpp_modeling_<family>.modeling_bpp`` and its classes are registered for
    the Auto classes, so ``save_pretrained`` of a model built from it copies ``modeling_bpp.py``
    into the folder (transformers saves the file that defines a registered custom class), and the
    folder loads with ``trust_remote_code=True`` however it was saved."""
    package = f"bpp_modeling_{family}"
    name = f"{package}.{MODELING_FILE[:-3]}"
    if name not in sys.modules:
        folder = Path(tempfile.mkdtemp(prefix="bpp-modeling-")) / package
        folder.mkdir()
        (folder / "__init__.py").write_text("")
        (folder / MODELING_FILE).write_text(modeling_source(family))
        for module_name, path in ((package, folder / "__init__.py"), (name, folder / MODELING_FILE)):
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        module = sys.modules[name]
        module.BppPrunedConfig.register_for_auto_class("AutoConfig")
        module.BppPrunedForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    return sys.modules[name]


# --- folders bpp wrote -------------------------------------------------------------------------

def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The model folder: ``path`` itself, or ``path/model`` for a ``bpp prune`` / ``bpp baseline``
    output folder."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise BppError(f"model folder {str(path)!r} does not exist")
    if not folder.is_dir():
        raise BppError(f"{str(path)!r} is not a folder (give the model folder that bpp compact or bpp prune wrote)")
    # a bpp prune / baseline run folder holds its own config.json (the run's) beside model/
    if (folder / "config.json").is_file() and "model_type" in read_config(folder):
        return folder
    if (folder / "model" / "config.json").is_file():
        return folder / "model"
    if (folder / "config.json").is_file():
        return folder
    raise BppError(f"{str(path)!r} has no config.json (nor model/config.json): not a model folder")


def load_pruned(path: str | os.PathLike, dtype: str | torch.dtype | None = "float32", device: str = "cpu",
                trust_remote_code: bool = False):
    """``(model, tokenizer, folder)`` for a compacted model folder: a stock config of a supported
    family, or bpp's per-layer-size config whose ``modeling_bpp.py`` is bpp's own (then it is
    loaded from bpp's copy of that code, not executed from the folder; a different file runs
    only with ``trust_remote_code``)."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(path)
    torch_dtype = parse_dtype(dtype)
    check_device(device)
    config = read_config(folder)
    model_type = str(config.get("model_type"))
    family = pruned_family(config)
    if family is not None or model_type in SUPPORTED_FAMILIES:
        check_config_sizes(config, folder)
    if family is not None:
        shipped = folder / MODELING_FILE
        if not shipped.is_file():
            raise BppError(f"{folder} has a per-layer-size config ({model_type}) but no {MODELING_FILE}")
        if _is_bpps_modeling_file(shipped.read_text(), family):
            with load_errors(folder):
                model = modeling_module(family).BppPrunedForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        elif trust_remote_code:
            with load_errors(folder):
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, trust_remote_code=True)
        else:
            raise BppError(f"{shipped} differs from the modeling file this bpp writes (another bpp version, or "
                           "edited); pass --trust-remote-code to load it with its own code")
    elif model_type in SUPPORTED_FAMILIES:
        with load_errors(folder):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    else:
        raise BppError(f"{folder}: model type {model_type!r} is not supported; give a folder written by "
                       f"bpp compact / bpp prune, or a model of the families {', '.join(SUPPORTED_FAMILIES)}")
    return model.to(device).eval(), load_tokenizer(folder), folder


def load_tokenizer(folder: Path):
    """The folder's tokenizer. ``trust_remote_code=False``: the tokenizer needs no code, and
    without it transformers would ask on the terminal whether to run the folder's modeling file;
    its warning that the config is not a stock model type is silenced (that is expected here)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise BppError(f"cannot load the tokenizer saved in {folder}: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
