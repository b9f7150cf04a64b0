"""Triton kernels on a GPU: time per op and for the whole masked forward, against the baselines.

    python bench/triton_speed.py                       # on a CUDA machine: every table
    python bench/triton_speed.py --append bench/RESULTS.md
    TRITON_INTERPRET=1 python bench/triton_speed.py --cpu-smoke   # logic check at tiny shapes, no GPU

Shapes: LLaMA-2-7B (d 4096, m 11008, 32 heads, MHA) and Llama-3-8B (d 4096, m 14336, 32 heads in
8 KV groups), hd 128, bf16, S = 8 masks, B×T = 8×128, keep 50% and 70% of channels / groups.
Providers, side by side in one run:
- triton: bpp_kernels ops with backend="triton" (pruned work skipped)
- (a) dense: all weights, masks multiplied in (no work skipped)
- (b) reference: bpp_kernels.reference (per-sample gathered GEMMs from Python)
- (c) copy+GEMM: gather each mask's kept weights (timed), then one GEMM per sample
- (d) compacted: the kept weights gathered beforehand (not timed), one GEMM per sample: the floor
Also: achieved TFLOP/s of the useful (kept) work against a measured bf16 matmul peak, and for
the whole masked forward (random weights, --layers decoder layers) masks per GPU-hour against a
loop of Hugging Face forwards with hook masks.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import bpp_kernels as K
from bpp_kernels import reference

SHAPES = {
    "LLaMA-2-7B": dict(d=4096, m=11008, G=32, r=1, hd=128),
    "Llama-3-8B": dict(d=4096, m=14336, G=8, r=4, hd=128),
}
SMOKE = {"tiny-MHA": dict(d=64, m=96, G=4, r=1, hd=16), "tiny-GQA": dict(d=64, m=96, G=2, r=2, hd=16)}


def bench(fn, smoke: bool) -> float:
    """Median milliseconds."""
    if smoke:
        import time

        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]


def check(what: str, rel_err: float, dtype: torch.dtype) -> None:
    """Stop when a provider's result is off: a fast wrong answer is not a benchmark result."""
    limit = 1e-4 if dtype == torch.float32 else 3e-2
    if not rel_err <= limit:
        sys.exit(f"bench/triton_speed.py: {what} differs from the floor by relative RMS {rel_err:.1e} > {limit:.0e}")


def masks_for(S, n, keep, device):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(S, n, dtype=torch.bool)
    k = max(1, round(keep * n))
    for s in range(S):
        mask[s, torch.randperm(n, generator=g)[:k]] = True
    return mask.to(device)


def mlp_providers(x, w_gate, w_up, w_down, mask):
    """Callables for every provider of the masked SwiGLU MLP."""
    w_gate_up, w_down_t = K.pack_swiglu(w_gate, w_up, w_down)
    keep_idx, keep_count = K.mask_to_index(mask)
    S = x.shape[0]
    kept = [mask[s].nonzero().flatten() for s in range(S)]
    compacted = [(w_gate[k].contiguous(), w_up[k].contiguous(), w_down_t[k].contiguous()) for k in kept]

    def dense():
        act = F.silu(x @ w_gate.t()) * (x @ w_up.t()) * mask[:, None, :].to(x.dtype)
        return act @ w_down.t()

    def copy_gemm():
        return torch.stack([(F.silu(x[s] @ w_gate[k].t()) * (x[s] @ w_up[k].t())) @ w_down_t[k]
                            for s, k in enumerate(kept)])

    def floor():
        return torch.stack([(F.silu(x[s] @ g.t()) * (x[s] @ u.t())) @ dt for s, (g, u, dt) in enumerate(compacted)])

    return {
        "triton": lambda: K.masked_swiglu(x, w_gate_up, w_down_t, keep_idx, keep_count, backend="triton"),
        "(a) dense": dense,
        "(b) reference": lambda: reference.masked_swiglu(x, w_gate_up, w_down_t, keep_idx, keep_count),
        "(c) copy+GEMM": copy_gemm,
        "(d) compacted": floor,
    }


def attention_providers(x4, wq, wk, wv, wo, G, r, hd, mask, cos, sin):
    w_qkv, w_o_t, _ = K.pack_attention(wq, wk, wv, wo, G)
    keep_idx, keep_count = K.mask_to_index(mask)
    S, B, T, d = x4.shape
    heads = mask.repeat_interleave(r, dim=1)

    def rope(t):
        half = t.shape[-1] // 2
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

    def attend(x, q_w, k_w, v_w, o_w, n_kv):
        q = (x @ q_w.t()).view(B, T, -1, hd).transpose(1, 2)
        k = (x @ k_w.t()).view(B, T, n_kv, hd).transpose(1, 2)
        v = (x @ v_w.t()).view(B, T, n_kv, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True, enable_gqa=True)
        return a, o_w

    def dense():  # every head of every sample computed in one batch of S*B sequences, then masked
        xs = x4.reshape(S * B, T, d)
        q = (xs @ wq.t()).view(S * B, T, G * r, hd).transpose(1, 2)
        k = (xs @ wk.t()).view(S * B, T, G, hd).transpose(1, 2)
        v = (xs @ wv.t()).view(S * B, T, G, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True, enable_gqa=True)
        a = a.view(S, B, G * r, T, hd) * heads.view(S, 1, G * r, 1, 1).to(a.dtype)
        return a.transpose(2, 3).reshape(S, B, T, G * r * hd) @ wo.t()

    def per_sample(weights):
        out = []
        for s, (q_w, k_w, v_w, o_w, n) in enumerate(weights):
            a, _ = attend(x4[s], q_w, k_w, v_w, o_w, n)
            out.append(a.transpose(1, 2).reshape(B, T, -1) @ o_w.t())
        return torch.stack(out)

    def gather(s):
        g = mask[s]
        rows_q = g.repeat_interleave(r * hd)
        rows_kv = g.repeat_interleave(hd)
        return wq[rows_q], wk[rows_kv], wv[rows_kv], wo[:, rows_q], int(g.sum())

    compacted = [tuple(t.contiguous() if torch.is_tensor(t) else t for t in gather(s)) for s in range(S)]
    return {
        "triton": lambda: K.masked_attention(x4, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, backend="triton"),
        "(a) dense": dense,
        "(b) reference": lambda: reference.masked_attention(x4, w_qkv, w_o_t, cos, sin, keep_idx, keep_count),
        "(c) copy+GEMM": lambda: per_sample([gather(s) for s in range(S)]),
        "(d) compacted": lambda: per_sample(compacted),
    }


def op_tables(shapes, S, B, T, keeps, device, dtype, smoke, peak):
    lines = []
    for name, sh in shapes.items():
        d, m, G, r, hd = sh["d"], sh["m"], sh["G"], sh["r"], sh["hd"]
        g = torch.Generator(device="cpu").manual_seed(0)
        rnd = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(device, dtype)  # noqa: E731
        x = torch.randn(S, B * T, d, generator=g).to(device, dtype)
        w_gate, w_up, w_down = rnd(m, d), rnd(m, d), rnd(d, m)
        wq, wk, wv, wo = rnd(G * r * hd, d), rnd(G * hd, d), rnd(G * hd, d), rnd(d, G * r * hd)
        inv = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        emb = torch.outer(torch.arange(T, dtype=torch.float32), inv).repeat(1, 2)
        cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
        for keep in keeps:
            for op, providers, flops in (
                ("masked MLP", mlp_providers(x, w_gate, w_up, w_down, masks_for(S, m, keep, device)),
                 S * B * T * 6 * d * round(keep * m)),
                ("masked attention", attention_providers(x.view(S, B, T, d), wq, wk, wv, wo, G, r, hd,
                                                         masks_for(S, G, keep, device), cos, sin),
                 S * B * T * 2 * d * round(keep * G) * (2 * r + 2) * hd + S * B * 2 * T * T * round(keep * G) * r * hd),
            ):
                ref = providers["(d) compacted"]().float()
                errs = {p: ((fn().float() - ref).norm() / ref.norm()).item() for p, fn in providers.items()}
                for p, e in errs.items():  # every provider computes the same thing, or its time means nothing
                    check(f"{name} {op} keep {keep:.0%} {p}", e, dtype)
                err = errs["triton"]
                times = {p: bench(fn, smoke) for p, fn in providers.items()}
                t = times["triton"]
                lines.append(
                    f"| {name} | {op} | {keep:.0%} | " + " | ".join(f"{times[p]:.3f}" for p in providers)
                    + f" | {times['(a) dense'] / t:.2f}× | {times['(d) compacted'] / t:.0%} | "
                    + f"{flops / t / 1e9:.1f} ({flops / t / 1e9 / peak:.0%}) | {err:.1e} |")
    head = ("| shape | op | keep | " + " | ".join(["triton", "(a) dense", "(b) reference", "(c) copy+GEMM",
                                                  "(d) compacted"])
            + " (ms) | speed-up vs (a) | % of floor (d) | TFLOP/s (of peak) | rel. err vs (d) |")
    return [head, "|" + "---|" * 12] + lines


def small_op_tables(shapes, S, B, T, device, dtype, smoke):
    """rms_norm, add_rms_norm and the fused LM head + cross-entropy: triton vs plain PyTorch."""
    lines = ["| shape | op | triton (ms) | (b) reference (ms) | (a) dense (ms) | speed-up vs (b) | speed-up vs (a) "
             "| rel. err vs (b) |", "|" + "---|" * 8]
    vocab = {"LLaMA-2-7B": 32000, "Llama-3-8B": 128256}
    for name, sh in shapes.items():
        d, V = sh["d"], vocab.get(name, 500)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(S, B, T, d, generator=g).to(device, dtype)
        res = torch.randn(S, B, T, d, generator=g).to(device, dtype)
        w = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype)
        h = torch.randn(S * B * T, d, generator=g).to(device, dtype)
        lm_head = (torch.randn(V, d, generator=g) / d**0.5).to(device, dtype)
        target = torch.randint(0, V, (S * B * T,), generator=g).to(device)
        cases = {
            "rms_norm": (lambda: K.rms_norm(x, w, 1e-5, backend="triton"), lambda: reference.rms_norm(x, w, 1e-5),
                         None),
            "add_rms_norm": (lambda: K.add_rms_norm(x, res, w, 1e-5, backend="triton")[0],
                             lambda: reference.add_rms_norm(x, res, w, 1e-5)[0], None),
            f"linear_cross_entropy V={V}": (
                lambda: K.linear_cross_entropy(h, lm_head, target, backend="triton"),
                lambda: reference.linear_cross_entropy(h, lm_head, target),
                lambda: F.cross_entropy((h @ lm_head.t()).float(), target, reduction="none")),  # full logits
        }
        for op, (fast, ref_fn, dense) in cases.items():
            ref = ref_fn().float()
            err = ((fast().float() - ref).norm() / ref.norm()).item()
            t, t_ref = bench(fast, smoke), bench(ref_fn, smoke)
            dense_ms, dense_ratio = "—", "—"  # norms have no dense variant
            if dense is not None:
                t_dense = bench(dense, smoke)
                dense_ms, dense_ratio = f"{t_dense:.3f}", f"{t_dense / t:.2f}×"
            check(f"{name} {op} triton", err, dtype)
            lines.append(f"| {name} | {op} | {t:.3f} | {t_ref:.3f} | {dense_ms} | {t_ref / t:.2f}× | {dense_ratio} "
                         f"| {err:.1e} |")
    return lines


def whole_forward(S, B, T, keep, layers, device, dtype, smoke):
    from transformers import LlamaConfig, LlamaForCausalLM

    from bpp import MaskedModel, Masks, MaskSpace
    from bpp.models.hooks import hook_losses

    label = "tiny-GQA" if smoke else "LLaMA-2-7B"
    sh = SMOKE[label] if smoke else SHAPES[label]
    config = LlamaConfig(hidden_size=sh["d"], intermediate_size=sh["m"], num_attention_heads=sh["G"] * sh["r"],
                         num_key_value_heads=sh["G"], head_dim=sh["hd"], num_hidden_layers=layers,
                         vocab_size=32000 if not smoke else 500)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    space = MaskSpace.from_model(model)
    g = torch.Generator().manual_seed(0)
    masks = Masks(torch.rand(S, layers, space.n_channels, generator=g) < keep,
                  torch.rand(S, layers, space.n_groups, generator=g) < keep, torch.ones(S, layers, dtype=torch.bool))
    ids = torch.randint(0, config.vocab_size, (B, T), generator=g).to(device)
    os.environ["BPP_KERNELS_BACKEND"] = "triton"
    mm = MaskedModel(model)
    t_batched = bench(lambda: mm.losses(ids, masks), smoke)
    t_hooks = bench(lambda: hook_losses(model, ids, masks), smoke)
    per_mask = t_batched / S / 1e3
    return [f"| {label} shapes, {layers} layers | {keep:.0%} | {t_batched:.1f} | {t_hooks:.1f} | "
            f"{t_hooks / t_batched:.2f}× | {3600 / per_mask:,.0f} |"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the whole-forward model")
    p.add_argument("--append", help="append the tables as Markdown to this file")
    a = p.parse_args()
    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("bench/triton_speed.py needs a CUDA GPU (or --cpu-smoke with TRITON_INTERPRET=1 for a logic check)")
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--cpu-smoke needs TRITON_INTERPRET=1 in the environment")
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    S, B, T = (2, 1, 16) if smoke else (8, 8, 128)
    if smoke:
        peak = 1.0
    else:
        n = 8192
        A = torch.randn(n, n, device=device, dtype=dtype)
        peak = 2 * n**3 / bench(lambda: A @ A, False) / 1e9  # TFLOP/s
    import triton

    gpu = torch.cuda.get_device_name() if not smoke else "CPU (interpreter smoke run, times meaningless)"
    out = [f"### bpp_kernels Triton benchmark — {gpu}", "",
           f"torch {torch.__version__}, triton {triton.__version__}, {str(dtype)[6:]}, S={S}, B×T={B}×{T}; "
           f"measured matmul peak {peak:.0f} TFLOP/s. Command: `python bench/triton_speed.py`", ""]
    out += op_tables(SMOKE if smoke else SHAPES, S, B, T, (0.5, 0.7), device, dtype, smoke, peak)
    out += [""] + small_op_tables(SMOKE if smoke else SHAPES, S, B, T, device, dtype, smoke)
    out += ["", "| whole masked forward | keep | batched triton (ms, S masks) | HF hook loop (ms) | speed-up | masks per GPU-hour |",
            "|---|---|---|---|---|---|"]
    for keep in (0.5, 0.7):
        out += whole_forward(S, B, T, keep, 2 if smoke else a.layers, device, dtype, smoke)
    text = "\n".join(out) + "\n"
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
