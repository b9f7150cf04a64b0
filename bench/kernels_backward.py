"""Forward + backward of the masked MLP and attention against dense-with-mask autograd.

S masks, each keeping 50% of the units (chosen at random per mask, so the masks differ), over a
B×T batch of one layer. MLP: SmolLM2-135M's d=576, m=1536 channels. Attention: d=576 with 8
query heads in 4 KV groups of head_dim 64 (SmolLM2 has 3 groups, where 50% is not a count), so
each mask keeps 2 groups. ``attention_heads`` prunes query heads inside the groups instead
(``head_keep``): every group kept, each mask keeping its own random half of the 8 query heads
(so a group keeps 0, 1 or 2 of its heads); beside the fast op it times ``cpp (all heads)`` (or
``triton (all heads)``), the same call keeping every head (head_keep=None), the work that pruning
half the heads saves from.
Every provider computes the same loss, ``sum(y * g)`` for a fixed
random ``g``, and its gradients with respect to x and the weights (and the per-unit scales with
``--soft``), from the same inputs. A third op, ``cross_entropy``, is the LM head and loss as the
engine calls it: one sample's B×(T-1) rows against SmolLM2's 49,152-word head (no mask):

- ``dense+mask``: every unit computed, the mask multiplied into the activations (MLP channels
  before W_down, attention head outputs before W_o), plain autograd: what users do without the
  kernels (all pruned work done and stored for the backward); for cross_entropy ``dense``: the
  full (N, V) logits and ``F.cross_entropy`` under autograd;
- ``reference``: :mod:`bpp_kernels.reference` under autograd (kept units only, one sample at a time);
- the fast backend of the device: ``cpp`` on CPU, ``triton`` on CUDA.

Columns: median wall time of forward + backward over ``--repeats`` interleaved runs (after a
warm-up), its ratio to dense+mask (> 1: faster), the median time of the forward alone (under
``torch.no_grad``), the peak memory above the inputs while it runs
(CPU: the process's peak RSS above its RSS before the call, each provider in a fresh subprocess; CUDA:
``torch.cuda.max_memory_allocated``), the bytes autograd saved for the backward beyond the inputs,
and the largest relative RMS error of the output and gradients against dense+mask (a wrong fast
kernel shows here; none for the ``(all heads)`` row, which computes another function). Wall-clock numbers only mean something on an otherwise idle machine.

    .venv/bin/python bench/kernels_backward.py [--device cpu|cuda] [--dtype fp32|bf16|fp16]
        [--S 8] [--B 4] [--T 128] [--repeats 5] [--threads N] [--soft] [--ops mlp attention ...]
        [--markdown] [--json FILE]

The research shape of the kernels' speed targets (one thread, S = 8, B×T = 256):

    OMP_NUM_THREADS=1 .venv/bin/python bench/kernels_backward.py --threads 1 --B 2 --T 128 --ops mlp attention

Query heads pruned inside groups, at the same shape:

    OMP_NUM_THREADS=1 .venv/bin/python bench/kernels_backward.py --threads 1 --B 2 --T 128 --ops attention_heads
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import bpp_kernels
import common
from bpp_kernels import layout, ops, reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
D, M = 576, 1536
HEADS, GROUPS, HEAD_DIM = 8, 4, 64
VOCAB = 49152
OPS_BENCHED = ("mlp", "attention", "attention_heads", "cross_entropy")
ALL_HEADS = " (all heads)"  # attention_heads only: "cpp (all heads)" / "triton (all heads)" keep every head


def _masks(S: int, n: int, g: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(S, n, dtype=torch.bool)
    for s in range(S):
        mask[s, torch.randperm(n, generator=g)[: n // 2]] = True
    return mask


def make_inputs(op: str, S: int, B: int, T: int, dtype, device, soft: bool, seed: int = 0) -> dict:
    """Leaf tensors (requires_grad where they get a gradient) and the mask of one op."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale)  # noqa: E731
    if op == "cross_entropy":
        N = B * (T - 1)
        return dict(h=rnd(N, D).to(device, dtype).requires_grad_(),
                    weight=rnd(VOCAB, D, scale=D**-0.5).to(device, dtype).requires_grad_(),
                    target=torch.randint(0, VOCAB, (N,), generator=g).to(device), grad=rnd(N).to(device))
    n = M if op == "mlp" else GROUPS
    mask = torch.ones(S, n, dtype=torch.bool) if op == "attention_heads" else _masks(S, n, g)
    scale = (0.05 + 0.95 * torch.rand(S, n, generator=g)) if soft else None
    x = rnd(S, B, T, D)
    if op == "mlp":
        w_gate_up, w_down_t = layout.pack_swiglu(rnd(M, D, scale=D**-0.5), rnd(M, D, scale=D**-0.5),
                                                 rnd(D, M, scale=M**-0.5))
        weights = dict(w_gate_up=w_gate_up, w_down_t=w_down_t)
    else:
        w_qkv, w_o_t, _ = layout.pack_attention(rnd(HEADS * HEAD_DIM, D, scale=D**-0.5),
                                                rnd(GROUPS * HEAD_DIM, D, scale=D**-0.5),
                                                rnd(GROUPS * HEAD_DIM, D, scale=D**-0.5),
                                                rnd(D, HEADS * HEAD_DIM, scale=(HEADS * HEAD_DIM) ** -0.5), GROUPS)
        inv = 1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
        emb = torch.outer(torch.arange(T, dtype=torch.float32), inv).repeat(1, 2)
        weights = dict(w_qkv=w_qkv, w_o_t=w_o_t)
    out = {k: v.to(device, dtype).requires_grad_() for k, v in dict(x=x, **weights).items()}
    if op != "mlp":
        out["cos"], out["sin"] = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
    if op == "attention_heads":  # each mask its own random half of the query heads
        out["head_keep"] = _masks(S, HEADS, g).view(S, GROUPS, HEADS // GROUPS).to(device)
    keep_idx, keep_count = reference.mask_to_index(mask)
    out.update(keep_idx=keep_idx.to(device), keep_count=keep_count.to(device), unit_mask=mask.to(device, dtype))
    if scale is not None:  # aligned with keep_idx: slot j holds the scale of unit keep_idx[s, j]
        out["unit_scale"] = scale.to(device).requires_grad_()
    out["grad"] = rnd(S, B, T, D).to(device, dtype)
    return out


def dense_mlp(x, w_gate_up, w_down_t, unit_mask):
    act = F.silu(x @ w_gate_up[:, 0].t()) * (x @ w_gate_up[:, 1].t())
    return (act * unit_mask[:, None, None, :]) @ w_down_t


def dense_attention(x, w_qkv, w_o_t, cos, sin, head_mask):
    S, B, T, d = x.shape
    G, rows, _ = w_qkv.shape
    hd = cos.shape[-1]
    r = rows // hd - 2
    y = (x @ w_qkv.reshape(-1, d).t()).view(S, B, T, G, r + 2, hd)
    q = y[..., :r, :].reshape(S, B, T, G * r, hd).transpose(2, 3)
    k, v = y[..., r, :].transpose(2, 3), y[..., r + 1, :].transpose(2, 3)
    q, k = reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin)
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    att = att * head_mask[:, None, :, None, None]  # (S, H): every head computed, the mask multiplied in
    return att.transpose(2, 3).reshape(S, B, T, G * r * hd) @ w_o_t.reshape(-1, d)


def _grad_names(inp: dict) -> list[str]:
    return [k for k, v in inp.items() if torch.is_tensor(v) and v.requires_grad]


def run(op: str, provider: str, inp: dict, forward_only: bool = False):
    """One forward + backward; returns (output, {name: gradient}) with the mask's scales' gradient
    mapped to unit_scale's slot layout for dense+mask. ``forward_only``: the forward alone, without
    autograd (returns the output)."""
    names = _grad_names(inp)
    if op == "cross_entropy":
        if provider == "dense+mask":
            y = F.cross_entropy((inp["h"] @ inp["weight"].t()).float(), inp["target"], reduction="none")
        else:
            y = ops.linear_cross_entropy(inp["h"], inp["weight"], inp["target"], backend=provider)
    elif provider == "dense+mask":
        unit_mask = inp["unit_mask"]
        if "unit_scale" in inp:  # the same soft mask, differentiable through the scales
            n = unit_mask.shape[1]
            slots = torch.arange(n, device=unit_mask.device) < inp["keep_count"][:, None]
            unit_mask = torch.zeros_like(unit_mask).scatter(
                1, inp["keep_idx"].long(), torch.where(slots, inp["unit_scale"].to(unit_mask.dtype), 0.0))
        if op == "mlp":
            y = dense_mlp(inp["x"], inp["w_gate_up"], inp["w_down_t"], unit_mask)
        else:
            head_mask = unit_mask.repeat_interleave(HEADS // GROUPS, dim=1)
            if op == "attention_heads":
                head_mask = head_mask * inp["head_keep"].reshape(head_mask.shape).to(head_mask.dtype)
            y = dense_attention(inp["x"], inp["w_qkv"], inp["w_o_t"], inp["cos"], inp["sin"], head_mask)
    else:
        all_heads = provider.endswith(ALL_HEADS)
        backend = provider.removesuffix(ALL_HEADS)
        kw = {k: inp[k] for k in names}
        kw.update(keep_idx=inp["keep_idx"], keep_count=inp["keep_count"])
        if op == "attention_heads" and not all_heads:
            kw["head_keep"] = inp["head_keep"]
        if op == "mlp":
            y = ops.masked_swiglu(**kw, backend=backend)
        else:
            y = ops.masked_attention(**kw, cos=inp["cos"], sin=inp["sin"], backend=backend)
    if forward_only:
        return y
    grads = torch.autograd.grad(y, [inp[k] for k in names], inp["grad"])
    return y.detach(), dict(zip(names, grads))


def saved_bytes(op: str, provider: str, inp: dict) -> int:
    """Bytes autograd keeps for the backward beyond the inputs (distinct storages)."""
    input_ptrs = {v.untyped_storage().data_ptr() for v in inp.values() if torch.is_tensor(v)}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_ptrs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(op, provider, inp)
    return sum(seen.values())


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_extra_bytes(op: str, provider: str, args) -> int:
    """Peak memory above the inputs during one forward + backward."""
    if args.device == "cuda":
        inp = make_inputs(op, args.S, args.B, args.T, DTYPES[args.dtype], "cuda", args.soft)
        run(op, provider, inp)  # warm-up (kernel compilation) outside the measurement
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(op, provider, inp)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    child = [sys.executable, os.path.abspath(__file__), "--child-peak", op, provider, "--dtype", args.dtype,
             "--S", str(args.S), "--B", str(args.B), "--T", str(args.T)] + (["--soft"] if args.soft else []) \
        + ([f"--threads={args.threads}"] if args.threads else [])
    return int(subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def _child_peak(op: str, provider: str, args) -> None:
    # a tiny warm-up first, so one-time initialisation (thread pools, kernel libraries) is not counted
    run(op, provider, make_inputs(op, 1, 1, 4, DTYPES[args.dtype], "cpu", args.soft))
    inp = make_inputs(op, args.S, args.B, args.T, DTYPES[args.dtype], "cpu", args.soft)
    before = common.reset_peak_rss()
    run(op, provider, inp)
    print((common.status_kib("VmHWM") - before) * 1024)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{common.cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--S", type=int, default=8)
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--soft", action="store_true", help="per-unit scales (a relaxed mask), gradients for them too")
    p.add_argument("--ops", nargs="+", choices=OPS_BENCHED, default=list(OPS_BENCHED), help="the ops to time")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--child-peak", nargs=2, metavar=("OP", "PROVIDER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_peak:
        _child_peak(*args.child_peak, args)
        return []
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    fast = "triton" if args.device == "cuda" else "cpp"
    dtype = DTYPES[args.dtype]
    rows = []
    for op in args.ops:
        providers = ["dense+mask", "reference", fast]
        if op == "attention_heads":
            providers.insert(2, fast + ALL_HEADS)
        inp = make_inputs(op, args.S, args.B, args.T, dtype, args.device, args.soft)
        results = {pr: run(op, pr, inp) for pr in providers}  # warm-up, and the values compared
        times = {pr: [] for pr in providers}
        fwd_times = {pr: [] for pr in providers}
        for _ in range(args.repeats):
            for pr in providers:  # interleaved: a busy machine slows every provider alike
                _sync(args.device)
                t0 = time.perf_counter()
                run(op, pr, inp)
                _sync(args.device)
                times[pr].append(time.perf_counter() - t0)
                with torch.no_grad():
                    t0 = time.perf_counter()
                    run(op, pr, inp, forward_only=True)
                    _sync(args.device)
                    fwd_times[pr].append(time.perf_counter() - t0)
        dense_out, dense_grads = results["dense+mask"]
        for pr in providers:
            out, grads = results[pr]
            err = float("nan") if pr.endswith(ALL_HEADS) else \
                max([_rel(out, dense_out)] + [_rel(grads[k], dense_grads[k]) for k in grads])
            rows.append(dict(op=op, provider=pr, ms=1000 * statistics.median(times[pr]),
                             fwd_ms=1000 * statistics.median(fwd_times[pr]),
                             saved_mib=saved_bytes(op, pr, inp) / 2**20,
                             peak_mib=peak_extra_bytes(op, pr, args) / 2**20, max_rel_err=err))
        dense_ms = next(r["ms"] for r in rows if r["op"] == op and r["provider"] == "dense+mask")
        for r in rows:
            if r["op"] == op:
                r["speedup"] = dense_ms / r["ms"]
    print(f"# {_machine(args.device)}; torch {torch.__version__}, bpp_kernels {bpp_kernels.__version__}; "
          f"{args.dtype}, S={args.S} masks at 50% keep (of groups; attention_heads: of query heads), "
          f"B×T={args.B}×{args.T}, "
          f"{'per-unit scales' if args.soft else 'hard masks'}, median of {args.repeats}")
    header = ["op", "provider", "fwd+bwd ms", "vs dense+mask", "fwd ms", "peak MiB above inputs", "saved for bwd MiB",
              "max rel err vs dense"]
    label = lambda r: "dense" if r["op"] == "cross_entropy" and r["provider"] == "dense+mask" else r["provider"]  # noqa: E731
    lines = [[r["op"], label(r), f"{r['ms']:.1f}", f"{r['speedup']:.2f}x", f"{r['fwd_ms']:.1f}", f"{r['peak_mib']:.0f}",
              f"{r['saved_mib']:.0f}", "-" if math.isnan(r["max_rel_err"]) else f"{r['max_rel_err']:.1e}"]
             for r in rows]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for line in lines:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=_machine(args.device), args=vars(args), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
