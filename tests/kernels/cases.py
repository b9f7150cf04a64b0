"""Inputs, backends and tolerances shared by the per-op kernel tests.

Inputs are random tensors drawn from a fixed seed (never zeros), so a failure reproduces; masks
are random with ragged kept counts and always include an empty and a full sample when S >= 2.

Backends: every op test is parametrised over the backends that have the op by :func:`targets`:
``cpp`` (CPU; fp32, bf16, fp16), ``triton`` on CPU through the interpreter (fp32, fp16: the
interpreter gets bf16 wrong) and on CUDA (fp32, fp16, bf16; marked ``gpu``, skipped without a
device), and ``reference`` where a property (not a comparison with itself) is tested.

Tolerances: fp32 compares the relative RMS error ``||ref - out|| / ||ref||`` with 1e-5; fp16 and
bf16 use FlashAttention's rule: the fp32 reference is the truth, and a kernel may err at most
twice as much as the same reference run in the kernel's dtype (:func:`low_precision_tolerance`,
:func:`grad_tolerances` for gradients).
"""
from __future__ import annotations

import os

import pytest
import torch

from bpp_kernels import cpp, layout, ops, reference

FP32_TOL = 1e-5
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETER_DTYPES = (torch.float32, torch.float16)

# the C++ ops' GEMM libraries (BPP_CPU_GEMM): both are tested whatever this CPU's default is
CPU_GEMMS = [pytest.param("onednn", id="onednn"), pytest.param("aten", id="mm")]

needs_cpp = pytest.mark.skipif(not cpp.AVAILABLE, reason="bpp_kernels._C not built")
# CPU tensors reach Triton only through the interpreter (tests/conftest.py turns it on without a GPU)
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="CPU Triton cases run under TRITON_INTERPRET=1 only")


def targets(*, cpp_backend: bool = True, triton: bool = True, reference_backend: bool = False,
            dtypes=ALL_DTYPES) -> list:
    """``(backend, device, dtype)`` params for ``pytest.mark.parametrize("backend,device,dtype", ...)``."""
    params = []
    if reference_backend:
        params += [pytest.param("reference", "cpu", dt, id=f"reference-{DTYPE_IDS[dt]}") for dt in dtypes
                   if dt == torch.float32]
    if cpp_backend:
        params += [pytest.param("cpp", "cpu", dt, id=f"cpp-{DTYPE_IDS[dt]}", marks=needs_cpp) for dt in dtypes]
    if triton:
        params += [pytest.param("triton", "cpu", dt, id=f"triton-cpu-{DTYPE_IDS[dt]}", marks=needs_interpreter)
                   for dt in dtypes if dt in INTERPRETER_DTYPES]
        params += [pytest.param("triton", "cuda", dt, id=f"triton-cuda-{DTYPE_IDS[dt]}", marks=pytest.mark.gpu)
                   for dt in dtypes]
    return params


def random_mask(S: int, n: int, keep: float, generator: torch.Generator) -> torch.Tensor:
    """(S, n) bool with ragged counts; sample 0 keeps nothing and sample 1 keeps everything
    (when S >= 2 and keep is strictly between 0 and 1)."""
    mask = torch.rand(S, n, generator=generator) < keep
    if keep <= 0.0:
        return torch.zeros(S, n, dtype=torch.bool)
    if keep >= 1.0:
        return torch.ones(S, n, dtype=torch.bool)
    if S >= 2:
        mask[0] = False
        mask[1] = True
    return mask


def unit_scales(S: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """(S, n) fp32 in (0.05, 1]: the kept units' values of a relaxed (hard-concrete) mask."""
    return 0.05 + 0.95 * torch.rand(S, n, generator=generator)


def swiglu_inputs(S, N, d, m, keep, dtype=torch.float32, device="cpu", seed=0, unit_scale=False):
    """x (S, N, d), packed weights, keep_idx, keep_count (and unit_scale): kwargs for masked_swiglu."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, N, d, generator=g)
    w_gate, w_up = torch.randn(m, d, generator=g) / d**0.5, torch.randn(m, d, generator=g) / d**0.5
    w_down = torch.randn(d, m, generator=g) / m**0.5
    w_gate_up, w_down_t = layout.pack_swiglu(w_gate, w_up, w_down)
    keep_idx, keep_count = reference.mask_to_index(random_mask(S, m, keep, g))
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    out = dict(x=to(x), w_gate_up=to(w_gate_up), w_down_t=to(w_down_t),
               keep_idx=keep_idx.to(device), keep_count=keep_count.to(device))
    if unit_scale:
        out["unit_scale"] = unit_scales(S, m, g).to(device)
    return out


def mlp_inputs(S, N, d, m, keep, dtype=torch.float32, device="cpu", seed=0, bias=True, unit_scale=False,
               activation="gelu"):
    """kwargs for masked_mlp: x (S, N, d), w_up, w_down_t from pack_mlp (b_up when ``bias``),
    keep_idx, keep_count, activation (and unit_scale). The biases straddle zero, so ReLU and GELU
    see both signs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, N, d, generator=g)
    w_up = torch.randn(m, d, generator=g) / d**0.5
    w_down = torch.randn(d, m, generator=g) / m**0.5
    b_up = 0.5 * torch.randn(m, generator=g)
    w_up, w_down_t, b_up = layout.pack_mlp(w_up, w_down, b_up if bias else None)
    keep_idx, keep_count = reference.mask_to_index(random_mask(S, m, keep, g))
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    out = dict(x=to(x), w_up=to(w_up), w_down_t=to(w_down_t), keep_idx=keep_idx.to(device),
               keep_count=keep_count.to(device), b_up=to(b_up), activation=activation)
    if unit_scale:
        out["unit_scale"] = unit_scales(S, m, g).to(device)
    return out


def rope(T, hd, base=10000.0, dtype=torch.float32, device="cpu"):
    inv = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def attention_inputs(S, B, T, d, G, r, hd, keep, dtype=torch.float32, device="cpu", seed=0,
                     bias=False, qk_norm=False, unit_scale=False):
    """kwargs for masked_attention: x (S, B, T, d), packed q/k/v/o for G groups of r query heads."""
    g = torch.Generator().manual_seed(seed)
    H = G * r
    x = torch.randn(S, B, T, d, generator=g)
    w_q = torch.randn(H * hd, d, generator=g) / d**0.5
    w_k = torch.randn(G * hd, d, generator=g) / d**0.5
    w_v = torch.randn(G * hd, d, generator=g) / d**0.5
    w_o = torch.randn(d, H * hd, generator=g) / (H * hd) ** 0.5
    biases = [0.1 * torch.randn(n, generator=g) for n in (H * hd, G * hd, G * hd)] if bias else [None] * 3
    w_qkv, w_o_t, b_qkv = layout.pack_attention(w_q, w_k, w_v, w_o, G, *biases)
    keep_idx, keep_count = reference.mask_to_index(random_mask(S, G, keep, g))
    cos, sin = rope(T, hd, dtype=dtype, device=device)
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    out = dict(x=to(x), w_qkv=to(w_qkv), w_o_t=to(w_o_t), cos=cos, sin=sin,
               keep_idx=keep_idx.to(device), keep_count=keep_count.to(device), b_qkv=to(b_qkv))
    if qk_norm:
        out["q_norm"] = to(1.0 + 0.2 * torch.randn(hd, generator=g))
        out["k_norm"] = to(1.0 + 0.2 * torch.randn(hd, generator=g))
    if unit_scale:
        out["unit_scale"] = unit_scales(S, G, g).to(device)
    return out


def cross_entropy_inputs(N, d, V, dtype=torch.float32, device="cpu", seed=0, n_ignored=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g)
    w = torch.randn(V, d, generator=g) / d**0.5
    target = torch.randint(0, V, (N,), generator=g)
    if n_ignored:
        target[torch.randperm(N, generator=g)[:n_ignored]] = -100
    return dict(h=h.to(device, dtype), weight=w.to(device, dtype), target=target.to(device))


def norm_inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    """x, residual (shape) and weight (shape[-1],) for rms_norm / add_rms_norm."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(device, dtype)
    res = torch.randn(*shape, generator=g).to(device, dtype)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(device, dtype)
    return x, res, w


def layer_norm_inputs(shape, dtype=torch.float32, device="cpu", seed=0, bias=True):
    """kwargs for layer_norm: x (shape) with a non-zero mean per row, weight and bias (shape[-1],)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) + 0.5 * torch.randn(*shape[:-1], 1, generator=g)
    w = 1 + 0.2 * torch.randn(shape[-1], generator=g)
    b = 0.1 * torch.randn(shape[-1], generator=g)
    return dict(x=x.to(device, dtype), weight=w.to(device, dtype), bias=b.to(device, dtype) if bias else None,
                eps=1e-5)


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Relative RMS error ||ref - out|| / ||ref|| in fp32 (0 when both are zero)."""
    ref, out = ref.float(), out.float()
    denom = ref.norm().item()
    diff = (ref - out).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite values"
    err = rel_err(ref.cpu(), out.cpu())
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e}"


def to_float64(kwargs: dict) -> dict:
    return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}


def upcast(kwargs: dict) -> dict:
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}


def low_precision_tolerance(ref_fn, kwargs: dict, dtype: torch.dtype, floor: float = 1e-6) -> tuple[torch.Tensor, float]:
    """FlashAttention's rule: the fp32 reference output and 2x the error of the same reference
    run in ``dtype`` (the error a PyTorch implementation in that precision already makes)."""
    ref32 = ref_fn(**upcast(kwargs))
    ref_lp = ref_fn(**kwargs)
    return ref32, max(2.0 * rel_err(ref32, ref_lp), floor)


def tolerance(ref_fn, kwargs: dict, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """(reference output, tolerance): fp32 tight, fp16/bf16 by :func:`low_precision_tolerance`."""
    if dtype == torch.float32:
        return ref_fn(**upcast(kwargs)), FP32_TOL
    return low_precision_tolerance(ref_fn, kwargs, dtype)


def forward_backward(fn, kwargs: dict, wrt: list[str], grad_seed: int = 1) -> tuple[torch.Tensor, dict]:
    """fn(**kwargs) and the gradients of ``sum(out * g)`` (g a fixed random tensor) w.r.t. the
    kwargs named in ``wrt`` that are present; fresh leaf copies, the inputs are left alone."""
    leaves = {k: kwargs[k].detach().clone().requires_grad_() for k in wrt if kwargs.get(k) is not None}
    out = fn(**{**kwargs, **leaves})
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    if not out.requires_grad:  # the reference when every sample prunes everything: a constant output
        return out, {k: torch.zeros_like(v) for k, v in leaves.items()}
    grads = torch.autograd.grad(out, list(leaves.values()), g, allow_unused=True, materialize_grads=True)
    return out.detach(), dict(zip(leaves, grads))


def grad_tolerances(ref_fn, kwargs: dict, wrt: list[str], dtype: torch.dtype):
    """(reference output, reference gradients, {name: tolerance}) with the output under "out":
    fp32 inputs -> the float64 reference, FP32_TOL each or twice the fp32 reference's own error
    where that is more; fp16/bf16 -> FlashAttention's rule per tensor, the fp32 reference against
    the same reference run in ``dtype``. A gradient that is zero in exact arithmetic (float64 norm
    below 1e-9 of the largest gradient's, e.g. the q/k norms' with one token) is compared with zero:
    it may be the dtype's rounding (machine epsilon) times the largest gradient's norm."""
    out32, grads32 = forward_backward(ref_fn, upcast(kwargs), wrt)
    out64, grads64 = forward_backward(ref_fn, to_float64(kwargs), wrt)
    if dtype == torch.float32:
        ref_out, ref_grads = out64, dict(grads64)
        tols = {"out": max(FP32_TOL, 2.0 * rel_err(out64, out32))}
        tols.update({k: max(FP32_TOL, 2.0 * rel_err(grads64[k], grads32[k])) for k in grads64})
    else:
        out_lp, grads_lp = forward_backward(ref_fn, kwargs, wrt)
        ref_out, ref_grads = out32, dict(grads32)
        tols = {"out": max(2.0 * rel_err(out32, out_lp), 1e-6)}
        tols.update({k: max(2.0 * rel_err(grads32[k], grads_lp[k]), 1e-6) for k in grads32})
    scale = max((float(g.norm()) for g in grads64.values()), default=0.0)
    for k, g in grads64.items():
        if float(g.norm()) <= 1e-9 * scale:
            ref_grads[k] = torch.zeros_like(grads32[k])  # rel_err against zeros is the absolute norm
            tols[k] = torch.finfo(dtype).eps * scale
    return ref_out, ref_grads, tols


def assert_grads_match(name: str, op, kwargs: dict, wrt: list[str], backend: str, dtype: torch.dtype) -> dict:
    """The backend's output and gradients against the reference's (see :func:`grad_tolerances`);
    returns the backend's gradients."""
    ref_fn = getattr(reference, op)
    ref_out, ref_grads, tols = grad_tolerances(ref_fn, kwargs, wrt, dtype)
    out, grads = forward_backward(lambda **k: getattr(ops, op)(**k, backend=backend), kwargs, wrt)
    assert_close(f"{name} output", ref_out, out, tols["out"])
    for k, g in grads.items():
        assert g.dtype == kwargs[k].dtype, f"{name} d{k}: dtype {g.dtype} != input's {kwargs[k].dtype}"
        assert_close(f"{name} d{k}", ref_grads[k], g, tols[k])
    return grads


def assert_compiled_matches_eager(fn, kwargs: dict, wrt: list[str]) -> None:
    """The loss ``fn(**kwargs).square().mean()`` compiled with ``fullgraph=True`` (aot_eager: no graph
    break allowed) gives the eager loss and gradients, w.r.t. the kwargs named in ``wrt`` that are
    present, bit for bit."""
    fixed = {k: v for k, v in kwargs.items() if k not in wrt}

    def loss_fn(**k):
        return fn(**k, **fixed).square().mean()

    args = {k: kwargs[k].detach().clone().requires_grad_() for k in wrt if kwargs.get(k) is not None}
    eager = loss_fn(**args)
    eager_grads = torch.autograd.grad(eager, list(args.values()))
    got = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(**args)
    got_grads = torch.autograd.grad(got, list(args.values()))
    assert torch.equal(got, eager)
    for name, a, b in zip(args, got_grads, eager_grads):
        assert torch.equal(a, b), f"d{name} differs compiled and eager"


def interpreted(target) -> bool:
    """Whether a :func:`targets` param runs Triton through the (slow) CPU interpreter."""
    return target.id.startswith("triton-cpu")


def cross(cases_, targets_, keep=lambda case, target: True) -> list:
    """The product of two param lists (case values first, then the target's), both ids and marks
    joined, keeping the pairs ``keep`` accepts: cheaper case lists for the interpreter."""
    return [pytest.param(*c.values, *t.values, id=f"{c.id}-{t.id}", marks=[*c.marks, *t.marks])
            for c in cases_ for t in targets_ if keep(c, t)]
