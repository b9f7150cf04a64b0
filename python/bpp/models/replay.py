"""Decoder layers replayed one at a time: the inputs of layer 0 (and the arguments the model
passes to every layer) captured once, then any layer run on them. Layer-by-layer calibration
(wanda-sp, BESA) and reconstruction build on it."""
from __future__ import annotations

import torch


class _StopForward(Exception):
    pass


def layer_inputs(model, input_ids: torch.Tensor):
    """The hidden states entering layer 0, and the other arguments the model passes to every
    decoder layer (position embeddings, attention mask, ...), captured by a pre-hook."""
    captured = {}

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _StopForward

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    args, kwargs = captured["args"], dict(captured["kwargs"])
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return hidden, kwargs


def run_layer(layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer on ``hidden`` with the arguments :func:`layer_inputs` captured."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
