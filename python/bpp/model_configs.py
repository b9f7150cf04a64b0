"""Sanity of a model's ``config.json`` before anything is built from it: every size a whole,
positive and plausible number (transformers allocates the whole model from them before it checks
any), heads that split into KV groups, per-layer sizes (folders bpp compacted) of the right
length and never negative, and Gemma 3's attention fields (sliding window, kind of each layer,
the query scale)."""
from __future__ import annotations

from .errors import BppError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
FAMILY_NAMES = "Llama 1/2/3, Mistral, Qwen2, Qwen3, Gemma 3 text models"

# the largest size a real model of the supported families could have: far above any released one
LIMITS = {"num_hidden_layers": 1024, "hidden_size": 1 << 17, "intermediate_size": 1 << 20,
          "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "head_dim": 1 << 12,
          "vocab_size": 1 << 22}
OPTIONAL = ("num_key_value_heads", "head_dim")  # null: the family's default
PER_LAYER = ("kv_heads_per_layer", "intermediate_size_per_layer", "heads_per_group_per_layer")
LAYER_TYPES = ("sliding_attention", "full_attention")  # Gemma 3's layers: sliding-window or full attention
MAX_WINDOW = 1 << 22


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config_sizes(config: dict, where) -> None:
    """Refuse a config (``config.json`` as a dict; ``where`` names it) whose sizes no model has."""
    def bad(key: str, what: str):
        return BppError(f"{where}/config.json: {key} must be {what}, got {config.get(key)!r}; not a usable "
                        "model config")

    for key, limit in LIMITS.items():
        value = config.get(key)
        if value is None and key in OPTIONAL:
            continue
        if not _whole(value) or not 1 <= value <= limit:
            raise bad(key, f"a whole number from 1 to {limit}")
    heads, groups = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % groups:
        raise bad("num_key_value_heads", f"a divisor of num_attention_heads ({heads})")
    for key in PER_LAYER:
        if key not in config:
            continue
        sizes = config[key]
        if not isinstance(sizes, list) or len(sizes) != config["num_hidden_layers"] \
                or not all(_whole(s) and 0 <= s <= LIMITS["intermediate_size"] for s in sizes):
            raise bad(key, f"a list of {config['num_hidden_layers']} whole numbers of at least 0 "
                           "(one per layer)")
    slots = config.get("heads_per_group_per_layer")
    if slots is not None and max(slots, default=0) > heads // groups:
        raise bad("heads_per_group_per_layer", f"at most num_attention_heads / num_key_value_heads ({heads // groups}) "
                                               "in every layer")
    if config.get("model_type") == "gemma3_text":
        _check_gemma3(config, bad)


def _check_gemma3(config: dict, bad) -> None:
    window = config.get("sliding_window")
    if window is not None and (not _whole(window) or not 1 <= window <= MAX_WINDOW):
        raise bad("sliding_window", f"a whole number from 1 to {MAX_WINDOW} (or null)")
    kinds = config.get("layer_types")
    if kinds is not None and (not isinstance(kinds, list) or len(kinds) != config["num_hidden_layers"]
                              or not all(k in LAYER_TYPES for k in kinds)):
        raise bad("layer_types", f"a list of {config['num_hidden_layers']} of {' / '.join(LAYER_TYPES)}")
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and (isinstance(scalar, bool) or not isinstance(scalar, (int, float))
                               or not 0 < scalar <= LIMITS["hidden_size"]):
        raise bad("query_pre_attn_scalar", f"a number above 0 and at most {LIMITS['hidden_size']}")


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3":
        raise BppError("this is a multimodal Gemma 3 model (model type 'gemma3'); bpp prunes Gemma 3 text models "
                       "(model type 'gemma3_text', Gemma3ForCausalLM: the 270M and 1B checkpoints)")
    if model_type not in SUPPORTED_FAMILIES:
        raise BppError(
            f"architecture {model_type!r} is not supported; bpp supports the families "
            f"{', '.join(SUPPORTED_FAMILIES)} ({FAMILY_NAMES})"
        )
