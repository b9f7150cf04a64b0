"""Training one shared SwiGLU MLP under S sampled channel masks per batch (a weight-sharing
supernet, Minitron / Flextron style), with bpp_kernels' masked_swiglu.

Every step draws S sub-networks: a width per sample from ``widths`` (the fraction of channels it
keeps), keeping the first ``width * m`` channels, so sub-networks are nested (the smaller ones
inside the larger ones, as in Flextron's elastic MLP). The S masks run in ONE call of the masked op on
the same batch (``x`` repeated S times, no copy of the weights): each sample computes and
back-propagates only through its kept channels, and the shared weights receive the sum of the S
sub-networks' gradients. The task is regression onto a fixed random teacher MLP.

At the end each width is evaluated alone on held-out inputs. Run it (a few seconds)::

    .venv/bin/python examples/supernet_mlp.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import bpp_kernels as K


def nested_masks(widths: list[float], m: int) -> torch.Tensor:
    """(len(widths), m) bool: sample i keeps the first round(widths[i] * m) channels."""
    counts = torch.tensor([max(1, round(w * m)) for w in widths])
    return torch.arange(m)[None, :] < counts[:, None]


def main(steps: int = 200, samples: int = 4, widths: tuple = (0.25, 0.5, 0.75, 1.0), d: int = 32, m: int = 128,
         batch: int = 64, lr: float = 3e-3, seed: int = 0, log_every: int = 0) -> dict:
    """Train; returns the losses per step, the first and last ten steps' mean loss, and the held-out
    loss of every width before and after training (each width evaluated alone)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, fan_in: torch.randn(*shape, generator=g) / fan_in**0.5  # noqa: E731
    teacher = [rnd(2 * m, d, fan_in=d), rnd(d, 2 * m, fan_in=2 * m)]  # a wider dense MLP: not exactly learnable
    w_gate_up, w_down_t = K.pack_swiglu(rnd(m, d, fan_in=d), rnd(m, d, fan_in=d), rnd(d, m, fan_in=m) * 0.1)
    w_gate_up, w_down_t = torch.nn.Parameter(w_gate_up), torch.nn.Parameter(w_down_t)
    opt = torch.optim.Adam([w_gate_up, w_down_t], lr=lr)

    def target(x):
        return F.gelu(x @ teacher[0].t()) @ teacher[1].t()

    def loss_per_sample(x, keep_idx, keep_count):
        """x (B, d) shared by the S samples -> (S,) mean squared error of each sub-network."""
        S = keep_idx.shape[0]
        y = K.masked_swiglu(x.expand(S, -1, -1), w_gate_up, w_down_t, keep_idx, keep_count)
        return (y - target(x)).pow(2).mean((1, 2))

    held_out = torch.randn(512, d, generator=g)
    every_width = K.mask_to_index(nested_masks(list(widths), m))

    def evaluate() -> dict:
        with torch.no_grad():
            return dict(zip(widths, loss_per_sample(held_out, *every_width).tolist()))

    before = evaluate()
    losses = []
    for step in range(steps):
        picks = torch.randint(0, len(widths), (samples,), generator=g)
        keep_idx, keep_count = K.mask_to_index(nested_masks([widths[i] for i in picks], m))
        x = torch.randn(batch, d, generator=g)
        loss = loss_per_sample(x, keep_idx, keep_count).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    window = max(1, min(10, steps // 4))
    return dict(losses=losses, first_loss=sum(losses[:window]) / window, last_loss=sum(losses[-window:]) / window,
                held_out_before=before, held_out_after=evaluate())


if __name__ == "__main__":
    result = main(log_every=50)
    print(f"train loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}")
    for w in result["held_out_after"]:
        print(f"width {w:.2f}: held-out loss {result['held_out_before'][w]:.4f} -> {result['held_out_after'][w]:.4f}")
