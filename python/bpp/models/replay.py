"""Decoder layers replayed one at a time: the inputs of layer 0 (and the arguments the model
passes to every layer) captured once, then any layer run on them. Layer-by-layer calibration
(wanda-sp, BESA) and reconstruction build on it."""
from __future__ import annotations

import torch


class _StopForward(Exception):
    pass


class LayerArguments(dict):
    """The keyword arguments the model passes to layer 0 (position embeddings, attention mask,
    ...), and in ``per_layer`` those of every layer (a decoder layer module → its arguments):
    they differ where layers differ in kind (Gemma 3's sliding-window layers get their own
    attention mask and rotary embedding)."""

    def __init__(self, first: dict, per_layer: dict):
        super().__init__(first)
        self.per_layer = per_layer

    def of(self, layer) -> dict:
        return self.per_layer.get(layer, self)


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


def layer_inputs(model, input_ids: torch.Tensor):
    """The hidden states entering layer 0, and the other arguments the model passes to each
    decoder layer (a :class:`LayerArguments`), captured by pre-hooks; while they are captured,
    every layer but the last passes its input through (only its arguments are wanted)."""
    layers = model.model.layers
    captured = {}

    def grab(i):
        def hook(module, args, kwargs):
            captured[i] = (args, dict(kwargs))
            if i == len(layers) - 1:
                raise _StopForward
        return hook

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    # an instance's own forward (accelerate's device hooks set one) is put back afterwards
    own_forwards = [layer.__dict__.get("forward") for layer in layers]
    for layer in list(layers)[:-1]:
        layer.forward = _pass_through
    try:
        model(input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
        for layer, own in zip(list(layers)[:-1], own_forwards):
            if own is None:
                del layer.forward
            else:
                layer.forward = own
    args, kwargs = captured[0]
    hidden = args[0] if args else kwargs["hidden_states"]
    per_layer = {}
    for i, layer in enumerate(layers):
        args, kwargs = captured[i]
        if args[1:] or (not args and "hidden_states" not in kwargs):
            raise RuntimeError(f"decoder layer {i} was called with unexpected positional arguments")
        kwargs.pop("hidden_states", None)
        per_layer[layer] = kwargs
    return hidden, LayerArguments(per_layer[layers[0]], per_layer)


def run_layer(layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer on ``hidden`` with the arguments :func:`layer_inputs` captured for it."""
    out = layer(hidden, **(kwargs.of(layer) if isinstance(kwargs, LayerArguments) else kwargs))
    return out[0] if isinstance(out, tuple) else out
