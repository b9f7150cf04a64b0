"""Masks per second of the batched masked forward against the baselines.

On the embedded default (SmolLM2-135M-Instruct, fp32, CPU), B×T = 4×128, S = 8 masks keeping
50% of each layer's MLP channels and 2 of its 3 KV groups (random per sample and layer):

- batched/<backend>: ``bpp.MaskedModel.losses``, all S masks in one pass, pruned work skipped
- (a) hook loop: one Hugging Face forward per mask with multiplicative hook masks (the paper's
  official way of evaluating masks)
- (b) dense masked: one batched forward over all S samples with the full weights, masks
  multiplied into head outputs and MLP channels (no work skipped)
- (d) compacted: each mask's kept weights sliced into dense matrices beforehand (not timed),
  then a plain forward per mask: the floor no masked evaluation can beat

Times: all methods in one process, interleaved round by round (so a busy machine slows them
alike), medians of --repeats rounds after a warm-up round. Memory: each method once in its own
process, its peak RSS above the RSS after loading the model (ru_maxrss).

    .venv/bin/python bench/masked_forward.py [--repeats 3] [--markdown]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import common

METHODS = ("batched/reference", "batched/cpp", "hook loop (a)", "dense masked (b)", "compacted (d)")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class DenseForward:
    """A plain Llama forward on explicit weights, used for (b) and (d)."""

    def __init__(self, model):
        self.model = model
        c = model.config
        self.eps, self.hd = c.rms_norm_eps, model.model.layers[0].self_attn.head_dim
        self.r = c.num_attention_heads // c.num_key_value_heads

    def weights(self, mask=None):
        """Per-layer weight tuples; with a mask (S = 1), only the kept rows/columns (compacted)."""
        out = []
        per_head = self.r * self.hd
        for i, layer in enumerate(self.model.model.layers):
            a, mlp = layer.self_attn, layer.mlp
            wq, wk, wv, wo = a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight
            wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            if mask is not None:
                g = mask.groups[0, i]
                q_rows = g.repeat_interleave(per_head)
                kv_rows = g.repeat_interleave(self.hd)
                ch = mask.channels[0, i]
                wq, wk, wv, wo = wq[q_rows].contiguous(), wk[kv_rows].contiguous(), wv[kv_rows].contiguous(), wo[:, q_rows].contiguous()
                wg, wu, wd = wg[ch].contiguous(), wu[ch].contiguous(), wd[:, ch].contiguous()
            out.append((layer.input_layernorm.weight, wq, wk, wv, wo, layer.post_attention_layernorm.weight, wg, wu, wd))
        return out

    def _norm(self, x, w):
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    @torch.no_grad()
    def losses(self, ids, weights, S=1, head_masks=None, channel_masks=None):
        """Mean NLL per sample; hidden (S, B, T, d). Masks (S, L, H) / (S, L, m) are multiplied in."""
        B, T = ids.shape
        m = self.model.model
        h = m.embed_tokens.weight[ids].unsqueeze(0).expand(S, B, T, -1).contiguous()
        cos, sin = m.rotary_emb(h[0], torch.arange(T).unsqueeze(0))

        def rope(x):
            half = x.shape[-1] // 2
            return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

        for i, (n1, wq, wk, wv, wo, n2, wg, wu, wd) in enumerate(weights):
            y = self._norm(h, n1)
            q = (y @ wq.t()).view(S * B, T, -1, self.hd).transpose(1, 2)
            k = (y @ wk.t()).view(S * B, T, -1, self.hd).transpose(1, 2)
            v = (y @ wv.t()).view(S * B, T, -1, self.hd).transpose(1, 2)
            if k.shape[1] > 0:
                att = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True, enable_gqa=True)
                att = att.transpose(1, 2).reshape(S, B, T, -1)
                if head_masks is not None:
                    att = (att.view(S, B, T, -1, self.hd) * head_masks[:, i].view(S, 1, 1, -1, 1)).view(S, B, T, -1)
                h = h + att @ wo.t()
            y = self._norm(h, n2)
            act = F.silu(y @ wg.t()) * (y @ wu.t())
            if channel_masks is not None:
                act = act * channel_masks[:, i].view(S, 1, 1, -1)
            h = h + act @ wd.t()
        h = self._norm(h, m.norm.weight)
        logits = h[:, :, :-1] @ self.model.lm_head.weight.t()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].repeat(S, 1).reshape(-1), reduction="none")
        return nll.view(S, -1).mean(1)


def build(method: str, model, tok, S: int, B: int, T: int, keep: float | None = None, masked=None):
    """The callable that evaluates S masks (:func:`common.random_masks` with ``keep``) with ``method``
    (and the backend it needs); the batched methods use ``masked`` (a bpp.MaskedModel of ``model``)
    where given, else pack their own."""
    import bpp
    from bpp.data import load_text, window_bos, windows
    from bpp.models.hooks import hook_losses

    space = bpp.MaskSpace.from_model(model)
    ids = windows(tok, load_text("default", "calib"), T, B, seed=0, bos=window_bos(model))
    masks = common.random_masks(space, S, keep)
    if method.startswith("batched/"):
        backend = method.split("/")[1]
        mm = masked if masked is not None else bpp.MaskedModel(model)

        def fn():
            os.environ["BPP_KERNELS_BACKEND"] = backend
            return mm.losses(ids, masks)
        return fn
    if method.startswith("hook loop"):
        return lambda: hook_losses(model, ids, masks)
    dense = DenseForward(model)
    if method.startswith("dense masked"):
        w = dense.weights()
        heads = masks.groups.repeat_interleave(dense.r, dim=2).float()
        return lambda: dense.losses(ids, w, S, heads, masks.channels.float())
    per_mask = [dense.weights(masks[s]) for s in range(S)]
    return lambda: torch.cat([dense.losses(ids, w) for w in per_mask])


def peak_memory(method: str, S: int, B: int, T: int, name: str | None = None) -> dict:
    """Run once in this (child) process: peak RSS above the RSS after loading the model."""
    import bpp

    model, tok = bpp.load_model(name)
    fn = build(method, model, tok, S, B, T)
    base = _peak_rss_mb()
    fn()
    return {"method": method, "peak_mb": _peak_rss_mb() - base}


def timings(methods, repeats: int, S: int, B: int, T: int, name: str | None = None) -> dict:
    """Median seconds per method, the methods interleaved round by round in one process so that
    a busy machine slows all of them alike; plus each method's losses."""
    import bpp

    model, tok = bpp.load_model(name)
    fns = {m: build(m, model, tok, S, B, T) for m in methods}
    losses = {m: fn() for m, fn in fns.items()}  # warm-up round
    times = {m: [] for m in methods}
    for _ in range(repeats):
        for m, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - t0)
    return {m: {"seconds": statistics.median(times[m]), "losses": losses[m].tolist()} for m in methods}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--model", default=None, help="a model bpp loads (default: the embedded SmolLM2-135M-Instruct; "
                   "gemma3-270m; a folder)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(peak_memory(a.child, a.samples, a.batch, a.seq_len, a.model)))
        return
    import bpp_kernels

    methods = a.methods.split(",")
    memory = {}
    for method in methods:
        out = subprocess.run([sys.executable, __file__, "--child", method, "--samples", str(a.samples),
                              "--batch", str(a.batch), "--seq-len", str(a.seq_len),
                              *(["--model", a.model] if a.model else [])], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{method}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        memory[method] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    timed = timings(methods, a.repeats, a.samples, a.batch, a.seq_len, a.model)
    rows = [{"method": m, "seconds": timed[m]["seconds"], "losses": timed[m]["losses"],
             "peak_mb": memory.get(m, float("nan"))} for m in methods]
    by = {r["method"]: r for r in rows}
    ref_losses = torch.tensor(by[rows[0]["method"]]["losses"])
    print(f"\nmachine: {common.machine_line()}")
    print(f"task: {a.model or 'SmolLM2-135M-Instruct'} fp32, B×T = {a.batch}×{a.seq_len}, S = {a.samples} masks, "
          f"keep 50% channels and all KV groups but one (all of a single one) per layer; cpp ops: "
          f"{sorted(op for op, v in bpp_kernels.backend_info().items() if v['cpu'] == 'cpp')}")
    hook = by.get("hook loop (a)")
    floor = by.get("compacted (d)")
    print("\n| method | s per call (S masks) | masks/s | peak RSS over model (MB) | × hook loop | per-mask time ÷ compacted | max rel. loss diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs_hook = f"{hook['seconds'] / r['seconds']:.2f}×" if hook else "-"
        vs_floor = f"{r['seconds'] / floor['seconds']:.2f}" if floor else "-"
        diff = ((torch.tensor(r["losses"]) - ref_losses).abs() / ref_losses).max().item()
        print(f"| {r['method']} | {r['seconds']:.3f} | {a.samples / r['seconds']:.2f} | {r['peak_mb']:.0f} | "
              f"{vs_hook} | {vs_floor} | {diff:.1e} |")


if __name__ == "__main__":
    main()
