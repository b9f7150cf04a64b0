"""Sanity of a model's ``config.json`` before anything is built from it: every size a whole,
positive and plausible number (transformers allocates the whole model from them before it checks
any), heads that split into KV groups, and per-layer sizes (folders bpp compacted) of the right
length and never negative."""
from __future__ import annotations

from .errors import BppError

# the largest size a real model of the supported families could have: far above any released one
LIMITS = {"num_hidden_layers": 1024, "hidden_size": 1 << 17, "intermediate_size": 1 << 20,
          "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "head_dim": 1 << 12,
          "vocab_size": 1 << 22}
OPTIONAL = ("num_key_value_heads", "head_dim")  # null: the family's default
PER_LAYER = ("kv_heads_per_layer", "intermediate_size_per_layer")


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
