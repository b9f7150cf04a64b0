"""The batched masked forward: the per-sample loss of S structured masks in one pass.

Weights are re-laid out once (interleaved gate/up, transposed down, q/k/v/o grouped by KV
group); the forward is only calls to bpp_kernels ops, so the backend (reference, C++, Triton)
decides how pruned work is skipped. Works for the Llama family and its relatives that share
its decoder block: Llama 1/2/3, Mistral, Qwen2 (q/k/v biases) and Qwen3 (q/k RMSNorm); and for
Gemma 3 (GELU-tanh gated MLP, RMSNorms scaled by 1 + w before and after both attention and MLP,
q/k norms, embeddings scaled by √d, sliding-window layers with their own RoPE base).

A layer that a sample drops is given zero kept channels and groups for that sample, so its
attention and MLP add exactly zero and the residual passes through. Query-head slots (masks'
``heads``) go to the attention op as ``head_keep``, slot j kept or pruned in every group alike.

With a compute ``dtype`` narrower than the model's (bf16 for an fp32 model), the projections
run in that dtype while the residual stream, the norms' statistics and weights, and the loss
stay in the model's dtype: each block's normed input is rounded once on its way in and its
output is added to the residual in the wider dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import bpp_kernels as K

from ..errors import BppError
from ..masks import Masks
from ..space import MaskSpace


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    w_o_t: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    mlp_norm: torch.Tensor
    w_gate_up: torch.Tensor
    w_down_t: torch.Tensor
    attn_post_norm: torch.Tensor | None = None  # Gemma 3: norms of the attention and MLP outputs
    mlp_post_norm: torch.Tensor | None = None
    window: int | None = None  # sliding-window attention: keys at distance < window
    rope: str | None = None  # which RoPE table (Gemma 3: the layer's type)


GEMMA3 = "gemma3_text"


def _gemma_norm(norm) -> torch.Tensor:
    """A Gemma RMSNorm's effective weight: it scales by 1 + w (computed in float32)."""
    return (1.0 + norm.weight.detach().float()).to(norm.weight.dtype)


def _pack_gemma3_layer(layer, index: int, config, n_groups: int, dtype: torch.dtype) -> _Layer:
    packed = _pack_layer(layer, n_groups, dtype, norm=_gemma_norm, mlp_norm=layer.pre_feedforward_layernorm)
    packed.attn_post_norm = _gemma_norm(layer.post_attention_layernorm)
    packed.mlp_post_norm = _gemma_norm(layer.post_feedforward_layernorm)
    packed.rope = config.layer_types[index]
    packed.window = int(config.sliding_window) if packed.rope == "sliding_attention" else None
    return packed


def _pack_layer(layer, n_groups: int, dtype: torch.dtype, norm=lambda n: n.weight.detach(),
                mlp_norm=None) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    bias = lambda lin: None if lin.bias is None else lin.bias.detach()  # noqa: E731
    w_qkv, w_o_t, b_qkv = K.pack_attention(
        attn.q_proj.weight.detach(), attn.k_proj.weight.detach(), attn.v_proj.weight.detach(),
        attn.o_proj.weight.detach(), n_groups, bias(attn.q_proj), bias(attn.k_proj), bias(attn.v_proj))
    w_gate_up, w_down_t = K.pack_swiglu(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                                        mlp.down_proj.weight.detach())
    q_norm = getattr(attn, "q_norm", None)
    k_norm = getattr(attn, "k_norm", None)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731  (a no-op in the model's dtype)
    return _Layer(
        attn_norm=norm(layer.input_layernorm), w_qkv=cast(w_qkv), b_qkv=cast(b_qkv), w_o_t=cast(w_o_t),
        q_norm=None if q_norm is None else cast(norm(q_norm)),
        k_norm=None if k_norm is None else cast(norm(k_norm)),
        mlp_norm=norm(layer.post_attention_layernorm if mlp_norm is None else mlp_norm), w_gate_up=cast(w_gate_up),
        w_down_t=cast(w_down_t))


def sliding_window(config, index: int) -> int | None:
    """The sliding window of layer ``index`` (Mistral: every layer; Qwen2/Qwen3 with
    ``use_sliding_window``: the layers ``layer_types`` marks), or None for full causal attention."""
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True):
        return None
    types = getattr(config, "layer_types", None)
    return int(window) if types is None or types[index] == "sliding_attention" else None


class MaskedModel:
    """Evaluates many structured masks of one Hugging Face causal LM in batched passes.

    ``max_tokens_per_pass`` bounds S·B·T per pass (activation memory); more samples than fit are
    evaluated in consecutive passes, with identical results (batch invariance). ``dtype``: what
    the projections compute in (default: the model's); the residual stream, norms and loss stay
    in the model's dtype, and :meth:`teacher` uses the model itself.
    """

    def __init__(self, model, max_tokens_per_pass: int = 32768, dtype: torch.dtype | None = None):
        self.space = MaskSpace.from_model(model)
        config = model.config
        if getattr(config, "mlp_bias", False) or getattr(model.model.layers[0].self_attn.o_proj, "bias", None) is not None:
            raise BppError("biases on o_proj or the MLP are not supported by the masked engine")
        if max_tokens_per_pass < 1:
            raise BppError("max_tokens_per_pass must be positive")
        self.model = model
        self.max_tokens_per_pass = int(max_tokens_per_pass)
        self.eps = float(config.rms_norm_eps)
        self.scale = float(model.model.layers[0].self_attn.scaling)
        self.vocab_size = int(config.vocab_size)
        self.gemma3 = getattr(config, "model_type", None) == GEMMA3
        if self.gemma3:
            for name in ("attn_logit_softcapping", "final_logit_softcapping"):
                if getattr(config, name, None) is not None:
                    raise BppError(f"Gemma 3 with {name} is not supported by the masked engine")
            if config.hidden_activation != "gelu_pytorch_tanh":
                raise BppError(f"Gemma 3 with hidden_activation {config.hidden_activation!r} is not supported by the "
                               "masked engine (gelu_pytorch_tanh is)")
        self.activation = "gelu_tanh" if self.gemma3 else "silu"
        self.embed_scale = getattr(model.model.embed_tokens, "embed_scale", None)
        self.embed = model.model.embed_tokens.weight.detach()
        self.dtype = self.embed.dtype if dtype is None else dtype
        if not self.dtype.is_floating_point:
            raise BppError(f"the masked engine computes in a floating dtype, got {self.dtype}")
        self.final_norm = _gemma_norm(model.model.norm) if self.gemma3 else model.model.norm.weight.detach()
        self.lm_head = model.lm_head.weight.detach().to(self.dtype)
        self.rotary = model.model.rotary_emb
        if self.gemma3:
            self.layers = [_pack_gemma3_layer(layer, i, config, self.space.n_groups, self.dtype)
                           for i, layer in enumerate(model.model.layers)]
        else:
            self.layers = [_pack_layer(layer, self.space.n_groups, self.dtype) for layer in model.model.layers]
            for i, layer in enumerate(self.layers):
                layer.window = sliding_window(config, i)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    # --- inputs --------------------------------------------------------------------------
    def _check_inputs(self, input_ids: torch.Tensor, masks: Masks) -> None:
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise BppError("input_ids must be an integer tensor of shape (B, T)")
        B, T = input_ids.shape
        if B == 0:
            raise BppError("input_ids is an empty batch (B = 0)")
        if T < 2:
            raise BppError(f"input_ids needs at least 2 tokens per row to predict one, got T={T}")
        masks.validate(self.space)
        if masks.S == 0:
            raise BppError("masks holds no sample (S = 0)")
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # the one device->host sync of a call
        if lo < 0 or hi >= self.vocab_size:
            raise BppError(f"input_ids must lie in [0, {self.vocab_size}); got values in [{lo}, {hi}]")

    def _indices(self, masks: Masks):
        """Per layer: (keep_idx (S, n), keep_count (S,)) for groups and channels, built on device, and
        the kept query-head slots as ``head_keep (S, G, r)`` per layer (None: masks without slots)."""
        eff = masks.effective().to(self.device)
        S, L = eff.layers.shape

        def per_layer(m: torch.Tensor):
            idx, cnt = K.mask_to_index(m.transpose(0, 1).reshape(L * S, -1))
            idx, cnt = idx.view(L, S, -1), cnt.view(L, S)
            return [(idx[l], cnt[l]) for l in range(L)]

        heads = None
        if eff.heads is not None:  # a slot is head j of every group: the op takes it per group
            keep = eff.heads.unsqueeze(2).expand(S, L, self.space.n_groups, -1)
            heads = [keep[:, l].contiguous() for l in range(L)]
        return per_layer(eff.groups), per_layer(eff.channels), heads

    def _rope(self, T: int, dtype: torch.dtype, kind: str | None = None):
        positions = torch.arange(T, device=self.device).unsqueeze(0)
        x = self.embed[:1].to(dtype)
        cos, sin = self.rotary(x, positions) if kind is None else self.rotary(x, positions, kind)
        return cos[0].to(dtype), sin[0].to(dtype)

    @staticmethod
    def _on(device, *tensors):
        """Tensors moved to ``device`` (a layer placed on another GPU by a device map)."""
        return tuple(t if t.device == device else t.to(device, non_blocking=True) for t in tensors)

    # --- the forward ---------------------------------------------------------------------
    def _hidden(self, input_ids: torch.Tensor, groups, channels, biases=None, heads=None) -> torch.Tensor:
        """Final-normed hidden states ``(S, B, T, d)`` of the samples whose index lists are given;
        ``biases``: optional ``(attn, mlp)`` output biases, each ``(L, S, d)``; ``heads``: optional
        ``head_keep (S, G, r)`` per layer."""
        S = groups[0][0].shape[0]
        B, T = input_ids.shape
        h = self.embed[input_ids]
        if self.embed_scale is not None:  # Gemma: embeddings scaled by √d (in the weights' dtype)
            h = h * self.embed_scale.to(h.device, h.dtype)
        h = h.unsqueeze(0).expand(S, B, T, -1).contiguous()
        ropes = {kind: self._rope(T, self.dtype, kind) for kind in {layer.rope for layer in self.layers}}
        mlp_kwargs = {} if self.activation == "silu" else {"activation": self.activation}
        for i, (layer, (g_idx, g_cnt), (c_idx, c_cnt)) in enumerate(zip(self.layers, groups, channels)):
            # pipeline by layer: with a device map, the samples' hidden states follow the layers
            cos, sin = ropes[layer.rope]
            h, cos, sin, g_idx, g_cnt, c_idx, c_cnt = self._on(layer.w_qkv.device, h, cos, sin, g_idx, g_cnt, c_idx,
                                                               c_cnt)
            attn_kwargs = {} if layer.window is None or T <= layer.window else {"window": layer.window}
            if heads is not None:
                attn_kwargs["head_keep"] = heads[i].to(layer.w_qkv.device)
            y = K.rms_norm(h, layer.attn_norm, self.eps, out_dtype=self.dtype)
            a = K.masked_attention(y, layer.w_qkv, layer.w_o_t, cos, sin, g_idx, g_cnt, check=False, b_qkv=layer.b_qkv,
                                   q_norm=layer.q_norm, k_norm=layer.k_norm, norm_eps=self.eps, scale=self.scale,
                                   **attn_kwargs)
            if layer.attn_post_norm is None and a.dtype != h.dtype:
                # narrower projections: the norm takes them as they are and adds them to the wider
                # residual in one pass; the compensation bias joins the residual first
                if biases is not None:
                    h = h + biases[0][i].to(h.device, h.dtype)[:, None, None, :]
                y, h = K.add_rms_norm(a, h, layer.mlp_norm, self.eps, out_dtype=self.dtype)
            else:
                a = a.to(h.dtype)
                if biases is not None:  # bias compensation: o_proj's per-sample output bias
                    a = a + biases[0][i].to(a.device, a.dtype)[:, None, None, :]
                if layer.attn_post_norm is not None:
                    a = K.rms_norm(a, layer.attn_post_norm, self.eps)
                y, h = K.add_rms_norm(a, h, layer.mlp_norm, self.eps, out_dtype=self.dtype)
            mlp = K.masked_swiglu(y, layer.w_gate_up, layer.w_down_t, c_idx, c_cnt, check=False, **mlp_kwargs)
            mlp = mlp.to(h.dtype)
            if biases is not None:
                mlp = mlp + biases[1][i].to(mlp.device, mlp.dtype)[:, None, None, :]
            if layer.mlp_post_norm is not None:
                mlp = K.rms_norm(mlp, layer.mlp_post_norm, self.eps)
            h = h + mlp
        (h,) = self._on(self.final_norm.device, h)
        return K.rms_norm(h, self.final_norm, self.eps, out_dtype=self.dtype)

    def _chunks(self, S: int, tokens: int):
        per_pass = max(1, self.max_tokens_per_pass // tokens)
        return [slice(s, min(s + per_pass, S)) for s in range(0, S, per_pass)]

    @torch.no_grad()
    def losses(self, input_ids: torch.Tensor, masks: Masks, biases=None, per_window: bool = False,
               teacher: torch.Tensor | None = None) -> torch.Tensor:
        """``(S,)`` float32: mean next-token NLL of each mask over the batch ``input_ids (B, T)``;
        ``(S, B)`` (each window's mean) with ``per_window``. ``biases``: optional per-sample output
        biases of o_proj and down_proj, ``(attn (L, S, d), mlp (L, S, d))``, as
        :meth:`bpp.bias_compensation.BiasCompensation.biases` makes them (bias compensation).
        ``teacher``: ``(B, T − 1, d)`` from :meth:`teacher`; the loss is then the cross-entropy
        against the dense model's next-token distribution instead of the text's token
        (KL(dense ‖ mask) plus a constant): lse(z) − p_dense·z = NLL + (W[y] − e)·h."""
        self._check_inputs(input_ids, masks)
        input_ids = input_ids.to(self.device, torch.int64)
        groups, channels, heads = self._indices(masks)
        B, T = input_ids.shape
        targets = input_ids[:, 1:].reshape(-1)
        out = []
        for part in self._chunks(masks.S, B * T):
            h = self._hidden(input_ids, [(i[part], c[part]) for i, c in groups],
                             [(i[part], c[part]) for i, c in channels],
                             None if biases is None else (biases[0][:, part], biases[1][:, part]),
                             None if heads is None else [k[part] for k in heads])
            # one call per sample: its rows are chunked the same way whatever S is (batch invariance)
            (targets_here,) = self._on(self.lm_head.device, targets)
            (h,) = self._on(self.lm_head.device, h)
            for s in range(h.shape[0]):
                rows = h[s, :, :-1].reshape(B * (T - 1), -1)
                nll = K.linear_cross_entropy(rows, self.lm_head, targets_here)
                if teacher is not None:  # soft targets: swap the picked logit for the dense expectation
                    shift = self.lm_head[targets_here].float() - teacher.reshape(B * (T - 1), -1).to(rows.device,
                                                                                                      torch.float32)
                    nll = nll + (shift * rows.float()).sum(-1)
                loss = nll.view(1, B, T - 1).mean(2) if per_window else nll.mean().reshape(1)
                out.append(loss.to(self.device))
        return torch.cat(out)

    @torch.no_grad()
    def teacher(self, input_ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """``(B, T − 1, d)`` float32: e = Σ_v p_dense(v | context) W_v, the dense model's expected
        output embedding at each predicted position (what ``losses(teacher=...)`` needs)."""
        masks = Masks.full(self.space, 1, device=self.device)
        self._check_inputs(input_ids, masks)
        input_ids = input_ids.to(self.device, torch.int64)
        B, T = input_ids.shape
        head = self.lm_head
        if self.dtype == self.embed.dtype:
            groups, channels, _ = self._indices(masks)
            h = self._hidden(input_ids, groups, channels)[0]
        else:  # the dense model in its own dtype: the targets do not carry the engine's rounding
            head = self.model.lm_head.weight.detach()
            h = self.model.model(input_ids=input_ids).last_hidden_state
        h = h[:, :-1].reshape(B * (T - 1), -1).to(head.device)
        out = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        w = head.float()
        for start in range(0, h.shape[0], chunk):
            p = torch.softmax((h[start:start + chunk] @ head.t()).float(), dim=-1)
            out[start:start + chunk] = p @ w
        return out.view(B, T - 1, -1).to(self.device)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, masks: Masks) -> torch.Tensor:
        """``(S, B, T, V)`` logits of each mask (for checks on small inputs: holds all logits)."""
        self._check_inputs(input_ids, masks)
        input_ids = input_ids.to(self.device, torch.int64)
        groups, channels, heads = self._indices(masks)
        h = self._hidden(input_ids, groups, channels, heads=heads)
        return h.to(self.lm_head.device) @ self.lm_head.t()
