"""Learning hard-concrete MLP-channel and attention-head masks with an L0 penalty (CoFi /
Sheared-LLaMA style) on a tiny, randomly initialised Llama-like model built from bpp_kernels ops.

Every unit (an MLP channel of a layer, a KV group of a layer) has a learned ``log_alpha``. Each
step draws S hard-concrete masks z in [0, 1] (Louizos et al., 2018: a stretched, clamped
binary-concrete sample), so many units come out exactly 0 and cost nothing: the kept units
(z > 0) become the index lists, their z the per-unit scales, and the masked ops compute only
them, forward and backward. The loss is next-token cross-entropy (averaged over the S masks)
plus λ · (expected kept fraction − target)² per unit type; the weights train with the masks.
At the end each layer keeps, per unit type, its round(expected L0) units of highest log_alpha
(CoFi's deterministic mask).

The data is a fixed random first-order Markov chain over a small vocabulary, so there is
something to learn. Run it (about ten seconds on two CPU cores)::

    .venv/bin/python examples/hard_concrete_masks.py
"""
from __future__ import annotations

import math

import torch

import bpp_kernels as K

GAMMA, ZETA, BETA = -0.1, 1.1, 2.0 / 3.0  # hard-concrete stretch and temperature (Louizos et al.)


def hard_concrete_sample(log_alpha: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
    """(samples, *log_alpha.shape) gates in [0, 1]; exact zeros and ones have positive probability."""
    u = torch.rand((samples, *log_alpha.shape), generator=generator).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def expected_keep(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate > 0) per unit: the expected L0 norm's terms."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def deterministic_mask(log_alpha: torch.Tensor) -> torch.Tensor:
    """(layers, n) bool: per layer, the round(expected L0) units of highest log_alpha."""
    counts = expected_keep(log_alpha).sum(-1).round().long()
    order = log_alpha.argsort(dim=-1, descending=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(log_alpha.shape[-1]).expand_as(order))
    return ranks < counts[:, None]


def rope(T: int, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    emb = torch.outer(torch.arange(T, dtype=torch.float32), inv).repeat(1, 2)
    return emb.cos(), emb.sin()


class TinyLlama(torch.nn.Module):
    """Embedding, ``layers`` × (RMSNorm, masked attention, RMSNorm, masked SwiGLU MLP), final norm,
    LM head: parameters in bpp_kernels' packed layouts, the forward only bpp_kernels ops."""

    def __init__(self, vocab: int, d: int, m: int, groups: int, heads_per_group: int, head_dim: int, layers: int,
                 generator: torch.Generator):
        super().__init__()
        H = groups * heads_per_group
        rnd = lambda *shape, fan_in: torch.randn(*shape, generator=generator) / fan_in**0.5  # noqa: E731
        self.embed = torch.nn.Parameter(torch.randn(vocab, d, generator=generator) * 0.5)
        self.lm_head = torch.nn.Parameter(rnd(vocab, d, fan_in=d))
        self.final_norm = torch.nn.Parameter(torch.ones(d))
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.Module()
            w_qkv, w_o_t, _ = K.pack_attention(rnd(H * head_dim, d, fan_in=d), rnd(groups * head_dim, d, fan_in=d),
                                               rnd(groups * head_dim, d, fan_in=d), rnd(d, H * head_dim, fan_in=H * head_dim),
                                               groups)
            w_gate_up, w_down_t = K.pack_swiglu(rnd(m, d, fan_in=d), rnd(m, d, fan_in=d), rnd(d, m, fan_in=m))
            for name, t in dict(w_qkv=w_qkv, w_o_t=w_o_t, w_gate_up=w_gate_up, w_down_t=w_down_t,
                                attn_norm=torch.ones(d), mlp_norm=torch.ones(d)).items():
                setattr(block, name, torch.nn.Parameter(t))
            self.blocks.append(block)
        self.groups, self.channels, self.head_dim = groups, m, head_dim

    def loss(self, tokens: torch.Tensor, group_gates: torch.Tensor, channel_gates: torch.Tensor) -> torch.Tensor:
        """Mean next-token NLL per mask: tokens (B, T); gates (S, layers, n) in [0, 1] -> (S,)."""
        S = group_gates.shape[0]
        B, T = tokens.shape
        cos, sin = rope(T, self.head_dim)
        h = self.embed[tokens].unsqueeze(0).expand(S, B, T, -1)
        for layer, block in enumerate(self.blocks):
            idx, cnt, scale = self._units(group_gates[:, layer])
            y = K.rms_norm(h, block.attn_norm, 1e-6)
            y = K.masked_attention(y, block.w_qkv, block.w_o_t, cos, sin, idx, cnt, unit_scale=scale)
            y, h = K.add_rms_norm(y, h, block.mlp_norm, 1e-6)
            idx, cnt, scale = self._units(channel_gates[:, layer])
            h = h + K.masked_swiglu(y, block.w_gate_up, block.w_down_t, idx, cnt, unit_scale=scale)
        h = K.rms_norm(h, self.final_norm, 1e-6)
        rows = h[:, :, :-1].reshape(S * B * (T - 1), -1)
        nll = K.linear_cross_entropy(rows, self.lm_head, tokens[:, 1:].reshape(-1).repeat(S))
        return nll.view(S, -1).mean(1)

    @staticmethod
    def _units(gates: torch.Tensor):
        """Gates (S, n) -> keep_idx, keep_count and the kept units' gates as per-unit scales."""
        keep_idx, keep_count = K.mask_to_index(gates > 0)
        return keep_idx, keep_count, gates.gather(1, keep_idx.long())  # aligned with keep_idx


def markov_batches(vocab: int, batch: int, T: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """(steps, batch, T) tokens of a fixed random Markov chain with 3 likely successors per token."""
    succ = torch.stack([torch.randperm(vocab, generator=generator)[:3] for _ in range(vocab)])
    tokens = torch.empty(steps, batch, T, dtype=torch.long)
    tokens[:, :, 0] = torch.randint(0, vocab, (steps, batch), generator=generator)
    for t in range(1, T):
        pick = torch.randint(0, 3, (steps, batch), generator=generator)
        tokens[:, :, t] = succ[tokens[:, :, t - 1], pick]
    return tokens


def main(steps: int = 100, samples: int = 2, target_keep: float = 0.5, layers: int = 2, d: int = 32, m: int = 64,
         groups: int = 4, heads_per_group: int = 1, head_dim: int = 8, vocab: int = 48, batch: int = 8,
         seq_len: int = 16, penalty: float = 20.0, lr: float = 1e-2, mask_lr: float = 0.1, seed: int = 0,
         log_every: int = 0) -> dict:
    """Train; returns the losses per step, the first and last ten steps' mean task loss, and per
    unit type the expected and the final deterministic kept fractions."""
    g = torch.Generator().manual_seed(seed)
    model = TinyLlama(vocab, d, m, groups, heads_per_group, head_dim, layers, g)
    # log_alpha starts where every unit is kept with probability ~0.9
    log_alpha = {"group": torch.nn.Parameter(torch.full((layers, groups), 0.5)),
                 "channel": torch.nn.Parameter(torch.full((layers, m), 0.5))}
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": lr},
                            {"params": list(log_alpha.values()), "lr": mask_lr}])
    data = markov_batches(vocab, batch, seq_len, steps, g)
    task_losses, totals = [], []
    for step in range(steps):
        gates = {t: hard_concrete_sample(a, samples, g) for t, a in log_alpha.items()}
        task = model.loss(data[step], gates["group"], gates["channel"]).mean()
        sparsity = sum((expected_keep(a).mean() - target_keep) ** 2 for a in log_alpha.values())
        loss = task + penalty * sparsity
        opt.zero_grad()
        loss.backward()
        opt.step()
        task_losses.append(task.item())
        totals.append(loss.item())
        if log_every and step % log_every == 0:
            print(f"step {step:4d}  task {task.item():.3f}  expected keep "
                  + "  ".join(f"{t} {expected_keep(a).mean().item():.2f}" for t, a in log_alpha.items()))
    with torch.no_grad():
        expected = {t: expected_keep(a).mean().item() for t, a in log_alpha.items()}
        masks = {t: deterministic_mask(a) for t, a in log_alpha.items()}
    window = max(1, min(10, steps // 4))
    return dict(task_losses=task_losses, losses=totals,
                first_loss=sum(task_losses[:window]) / window, last_loss=sum(task_losses[-window:]) / window,
                expected_keep=expected, final_keep={t: mk.float().mean().item() for t, mk in masks.items()},
                masks=masks, target_keep=target_keep)


if __name__ == "__main__":
    result = main(log_every=25)
    print(f"task loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}; target keep {result['target_keep']}; "
          f"expected {result['expected_keep']}; final masks keep {result['final_keep']}")
