# Modeling file shipped inside a bpp-compacted model folder whose layers differ in size.
#
# It depends only on torch and transformers (not on bpp): the folder loads anywhere with
#   AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
# bpp writes this file with the family's modules filled in (FAMILY / Family below), so the
# pruned model is the stock Hugging Face model whose layers have per-layer sizes:
#   kv_heads_per_layer[i]         KV groups kept in layer i (query heads: that times the ratio)
#   intermediate_size_per_layer[i] MLP channels kept in layer i
#   heads_per_group_per_layer[i]  query heads per KV group in layer i (optional: absent, every
#                                 layer keeps num_attention_heads // num_key_value_heads)
# A layer with no KV group has no attention (it adds nothing); one with no channel has no MLP;
# either goes with the norms of its block (Gemma 3: the norms before and after it).
# o_proj_bias / down_proj_bias add output biases (bias compensation of the pruned units); an
# emptied block then adds just a constant (the bias; in Gemma 3 the bias after the block's norm).
import torch
from torch import nn
from transformers.models.FAMILY.configuration_FAMILY import FamilyConfig as _BaseConfig
from transformers.models.FAMILY.modeling_FAMILY import FamilyForCausalLM as _BaseForCausalLM


class BppPrunedConfig(_BaseConfig):
    # the family's own model type: AutoConfig (and so AutoTokenizer) reads the folder without
    # running this file; the model itself needs it (auto_map, trust_remote_code=True)
    model_type = "FAMILY"

    def __init__(self, kv_heads_per_layer=None, intermediate_size_per_layer=None, o_proj_bias=False,
                 down_proj_bias=False, heads_per_group_per_layer=None, **kwargs):
        super().__init__(**kwargs)
        n = self.num_hidden_layers
        self.kv_heads_per_layer = list(kv_heads_per_layer or [self.num_key_value_heads] * n)
        self.intermediate_size_per_layer = list(intermediate_size_per_layer or [self.intermediate_size] * n)
        if heads_per_group_per_layer is not None:  # written only when query heads were pruned inside groups
            self.heads_per_group_per_layer = list(heads_per_group_per_layer)
        self.o_proj_bias = bool(o_proj_bias)
        self.down_proj_bias = bool(down_proj_bias)


class NoAttention(nn.Module):
    """Stands in for an attention block whose heads were all pruned: it adds zero, or a constant
    ``bias`` when bias compensation put back the pruned heads' mean output. It still records the
    sequence length in the KV cache (a 1-wide stub), so generation positions stay right."""

    def __init__(self, layer_idx, hidden_size=None, bias=False, like=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=like.dtype, device=like.device)) if bias else None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                cache=None, **kwargs):
        cache = past_key_values if past_key_values is not None else cache  # transformers >= 5.2 passes cache=
        if cache is not None:
            stub = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(stub, stub, self.layer_idx)
        out = torch.zeros_like(hidden_states)
        return (out if self.bias is None else out + self.bias), None


class NoMLP(nn.Module):
    """Stands in for an MLP whose channels were all pruned: it adds zero (or the constant ``bias``)."""

    def __init__(self, hidden_size=None, bias=False, like=None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=like.dtype, device=like.device)) if bias else None

    def forward(self, hidden_states):
        out = torch.zeros_like(hidden_states)
        return out if self.bias is None else out + self.bias


def _linear(n_in, n_out, bias, like):
    return nn.Linear(n_in, n_out, bias=bias, dtype=like.weight.dtype, device=like.weight.device)


def _block_norms(layer):
    """The norms of a decoder layer's attention block and of its MLP block."""
    if hasattr(layer, "post_feedforward_layernorm"):  # Gemma 3: one before and one after each block
        return ("input_layernorm", "post_attention_layernorm"), ("pre_feedforward_layernorm",
                                                                 "post_feedforward_layernorm")
    return ("input_layernorm",), ("post_attention_layernorm",)


def _resize_layer(layer, kv_heads, channels, config, heads_per_group):
    attn, mlp = layer.self_attn, layer.mlp
    d = config.hidden_size
    attn_norms, mlp_norms = _block_norms(layer)
    if kv_heads == 0 or heads_per_group == 0:
        layer.self_attn = NoAttention(attn.layer_idx, d, config.o_proj_bias, attn.o_proj.weight)
        for name in attn_norms:
            setattr(layer, name, nn.Identity())
    else:
        hd = attn.head_dim
        q_heads = kv_heads * heads_per_group
        attn.num_key_value_groups = heads_per_group  # the query heads that read each KV head
        attn.q_proj = _linear(d, q_heads * hd, attn.q_proj.bias is not None, attn.q_proj)
        attn.k_proj = _linear(d, kv_heads * hd, attn.k_proj.bias is not None, attn.k_proj)
        attn.v_proj = _linear(d, kv_heads * hd, attn.v_proj.bias is not None, attn.v_proj)
        attn.o_proj = _linear(q_heads * hd, d, config.o_proj_bias, attn.o_proj)
    if channels == 0:
        layer.mlp = NoMLP(d, config.down_proj_bias, mlp.down_proj.weight)
        for name in mlp_norms:
            setattr(layer, name, nn.Identity())
    else:
        mlp.gate_proj = _linear(d, channels, False, mlp.gate_proj)
        mlp.up_proj = _linear(d, channels, False, mlp.up_proj)
        mlp.down_proj = _linear(channels, d, config.down_proj_bias, mlp.down_proj)


class BppPrunedForCausalLM(_BaseForCausalLM):
    config_class = BppPrunedConfig

    def __init__(self, config):
        super().__init__(config)
        ratio = config.num_attention_heads // config.num_key_value_heads
        slots = getattr(config, "heads_per_group_per_layer", None) or [ratio] * len(self.model.layers)
        for layer, kv_heads, channels, heads in zip(self.model.layers, config.kv_heads_per_layer,
                                                    config.intermediate_size_per_layer, slots):
            _resize_layer(layer, kv_heads, channels, config, heads)
