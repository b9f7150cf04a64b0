"""Perplexity (the standard protocol), and later zero-shot evaluation and reports."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import tokenize
from .errors import BppError


@torch.no_grad()
def perplexity(model, tokenizer, text: str | torch.Tensor, seq_len: int = 128, batch_size: int = 8,
               progress: bool = False, max_windows: int | None = None) -> float:
    """Perplexity by the standard protocol: tokenize the joined text once, cut it into
    non-overlapping windows of ``seq_len`` tokens (the tail shorter than a window is dropped),
    average the next-token NLL over all predicted tokens of all windows, exponentiate."""
    ids = tokenize(tokenizer, text) if isinstance(text, str) else text
    if seq_len < 2:
        raise BppError(f"seq_len must be at least 2, got {seq_len}")
    n = ids.numel() // seq_len
    if n == 0:
        raise BppError(f"the text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    device = next(model.parameters()).device
    data = ids[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc=f"perplexity (seq_len {seq_len})", disable=not progress,
                      unit="batch"):
        batch = data[start : start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
