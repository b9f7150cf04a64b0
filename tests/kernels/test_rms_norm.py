"""rms_norm and add_rms_norm on every backend (reference, C++, Triton) against the reference:
forward, gradients of x, residual and weight, out_dtype and mixed x / residual dtypes, dtype
promotion, rows independent of their batch, C++ weight gradients independent of the thread count,
torch.compile, input errors."""
import pytest
import torch

import bpp_kernels
from bpp_kernels import cpp, ops, reference
from tests.kernels import cases

WRT = ["x", "residual", "weight"]
SHAPES = [pytest.param((3, 5, 60), id="3x5x60"), pytest.param((7, 13), id="7x13"),
          pytest.param((2, 1, 1, 576), id="2-rows-576"), pytest.param((1, 96), id="1-row-96"),
          pytest.param((37, 40), id="37-rows-3-blocks"), pytest.param((300, 72), id="300-rows-10-blocks"),
          pytest.param((70, 3), id="70-rows-d3")]
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def _add_rms_norm_sum(x, residual, weight, eps, backend=None, out_dtype=None):
    """One output from both of add_rms_norm's, so one upstream gradient reaches both."""
    normed, summed = ops.add_rms_norm(x, residual, weight, eps, out_dtype=out_dtype, backend=backend)
    return normed + 0.5 * summed


def _add_rms_norm_sum_reference(x, residual, weight, eps):
    normed, summed = reference.add_rms_norm(x, residual, weight, eps)
    return normed + 0.5 * summed


@pytest.mark.parametrize("backend,device,dtype", cases.targets(reference_backend=True))
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape, backend, device, dtype):
    x, res, w = cases.norm_inputs(shape, dtype, device, seed=41)
    ref, tol = cases.tolerance(reference.rms_norm, dict(x=x, weight=w, eps=1e-5), dtype)
    out = ops.rms_norm(x, w, 1e-5, backend=backend)
    assert out.dtype == dtype and out.shape == shape
    cases.assert_close("rms_norm", ref, out, tol)
    normed, summed = ops.add_rms_norm(x, res, w, 1e-5, backend=backend)
    assert normed.dtype == summed.dtype == dtype
    assert torch.equal(summed, x + res)
    ref2, tol2 = cases.tolerance(reference.rms_norm, dict(x=x + res, weight=w, eps=1e-5), dtype)
    cases.assert_close("add_rms_norm", ref2, normed, tol2)


@pytest.mark.parametrize("backend,device,dtype", cases.targets(reference_backend=True))
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_reference(shape, backend, device, dtype):
    x, res, w = cases.norm_inputs(shape, dtype, device, seed=42)
    cases.assert_grads_match(f"{backend} rms_norm", "rms_norm", dict(x=x, weight=w, eps=1e-5), ["x", "weight"],
                             backend, dtype)
    kw = dict(x=x, residual=res, weight=w, eps=1e-5)
    ref_out, ref_grads, tols = cases.grad_tolerances(_add_rms_norm_sum_reference, kw, WRT, dtype)
    out, grads = cases.forward_backward(lambda **k: _add_rms_norm_sum(**k, backend=backend), kw, WRT)
    cases.assert_close("add_rms_norm", ref_out, out, tols["out"])
    for k in WRT:
        assert grads[k].dtype == kw[k].dtype
        cases.assert_close(f"add_rms_norm d{k}", ref_grads[k], grads[k], tols[k])


# --- out_dtype and mixed dtypes --------------------------------------------------------------------

def _mixed_targets(pairs):
    """(backend, device, *pair) params: every backend for each pair, the Triton interpreter only
    for pairs without bf16 (it gets bf16 wrong)."""
    params = []
    for a, b in pairs:
        name = f"{cases.DTYPE_IDS[a]}-{cases.DTYPE_IDS[b]}"
        params += [pytest.param("reference", "cpu", a, b, id=f"reference-{name}"),
                   pytest.param("cpp", "cpu", a, b, id=f"cpp-{name}", marks=cases.needs_cpp),
                   pytest.param("triton", "cuda", a, b, id=f"triton-cuda-{name}", marks=pytest.mark.gpu)]
        if BF16 not in (a, b):
            params.append(pytest.param("triton", "cpu", a, b, id=f"triton-cpu-{name}", marks=cases.needs_interpreter))
    return params


def _assert_matches_in_split_precision(name, op_fn, ref_fn, kw, wrt, out_dtype):
    """op_fn(**kw, out_dtype=out_dtype) and its gradients against the reference ref_fn, by
    FlashAttention's rule: the truth is the reference with every input upcast to fp32 and no
    out_dtype; the error allowed is twice that of the reference run in the inputs' own dtypes with
    out_dtype. Returns op_fn's output."""
    truth, truth_grads = cases.forward_backward(lambda **k: ref_fn(**k, out_dtype=None), cases.upcast(kw), wrt)
    same, same_grads = cases.forward_backward(lambda **k: ref_fn(**k, out_dtype=out_dtype), kw, wrt)
    out, grads = cases.forward_backward(lambda **k: op_fn(**k, out_dtype=out_dtype), kw, wrt)
    assert out.dtype == same.dtype, f"{name}: output dtype {out.dtype} != the reference's {same.dtype}"
    cases.assert_close(f"{name} output", truth, out, max(2 * cases.rel_err(truth, same), 1e-6))
    for k in wrt:
        assert grads[k].dtype == kw[k].dtype, f"{name} d{k}: dtype {grads[k].dtype} != input's {kw[k].dtype}"
        cases.assert_close(f"{name} d{k}", truth_grads[k], grads[k],
                           max(2 * cases.rel_err(truth_grads[k], same_grads[k]), 1e-6))
    return out


def _add_rms_norm_sum_of(add_rms_norm):
    def fn(x, residual, weight, eps, out_dtype):
        normed, summed = add_rms_norm(x, residual, weight, eps, out_dtype=out_dtype)
        return normed + 0.5 * summed
    return fn


@pytest.mark.parametrize("backend,device,x_dtype,out_dtype", _mixed_targets([(BF16, BF16), (BF16, FP16),
                                                                              (FP16, FP16), (FP16, BF16)]))
@pytest.mark.parametrize("shape", [pytest.param((3, 5, 60), id="3x5x60"), pytest.param((300, 72), id="300x72")])
def test_half_input_on_an_fp32_residual_stream(shape, backend, device, x_dtype, out_dtype):
    """``y16, h32 = add_rms_norm(a16, h32, w32, eps, out_dtype=...)``: h = x.to(fp32) + residual
    exactly, y in out_dtype, every gradient in its input's dtype."""
    x, res, w = cases.norm_inputs(shape, FP32, device, seed=60)
    x = x.to(x_dtype)
    normed, summed = ops.add_rms_norm(x, res, w, 1e-5, out_dtype=out_dtype, backend=backend)
    assert normed.dtype == out_dtype and summed.dtype == FP32
    assert torch.equal(summed, x.float() + res)
    kw = dict(x=x, residual=res, weight=w, eps=1e-5)
    _assert_matches_in_split_precision(
        "add_rms_norm y", lambda **k: ops.add_rms_norm(**k, backend=backend)[0],
        lambda **k: reference.add_rms_norm(**k)[0], kw, [], out_dtype)
    _assert_matches_in_split_precision(
        "add_rms_norm y + h/2", _add_rms_norm_sum_of(lambda *a, **k: ops.add_rms_norm(*a, **k, backend=backend)),
        _add_rms_norm_sum_of(reference.add_rms_norm), kw, WRT, out_dtype)


@pytest.mark.parametrize("backend,device,x_dtype,out_dtype", _mixed_targets([(FP32, BF16), (FP32, FP16), (BF16, FP32),
                                                                              (FP16, FP32), (FP16, BF16)]))
def test_rms_norm_out_dtype(backend, device, x_dtype, out_dtype):
    x, _, w = cases.norm_inputs((4, 7, 48), x_dtype, device, seed=61)
    _assert_matches_in_split_precision("rms_norm", lambda **k: ops.rms_norm(**k, backend=backend),
                                       reference.rms_norm, dict(x=x, weight=w, eps=1e-5), ["x", "weight"],
                                       out_dtype)


@pytest.mark.parametrize("dtype", cases.ALL_DTYPES, ids=list(cases.DTYPE_IDS.values()))
def test_reference_without_out_dtype_is_unchanged_bit_for_bit(dtype):
    """The reference's formulas before out_dtype existed, forward and gradients, against today's
    reference with out_dtype=None and with out_dtype equal to the dtype it returns anyway."""

    def old_rms_norm(x, weight, eps):
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    def old_add_rms_norm(x, residual, weight, eps):
        h = x + residual
        return old_rms_norm(h, weight, eps), h

    x, res, w = cases.norm_inputs((5, 9, 40), dtype, seed=62)
    for out_dtype in (None, dtype):
        for new, old, args in ((lambda *a: ops.rms_norm(*a, out_dtype=out_dtype, backend="reference"),
                                old_rms_norm, (x, w)),
                               (lambda *a: torch.cat(ops.add_rms_norm(*a, out_dtype=out_dtype, backend="reference"),
                                                     -1),
                                lambda *a: torch.cat(old_add_rms_norm(*a), -1), (x, res, w))):
            leaves_new = [t.clone().requires_grad_() for t in args]
            leaves_old = [t.clone().requires_grad_() for t in args]
            got, want = new(*leaves_new, 1e-5), old(*leaves_old, 1e-5)
            assert got.dtype == want.dtype and torch.equal(got, want)
            g = torch.randn(got.shape, generator=torch.Generator().manual_seed(63)).to(dtype)
            for a, b in zip(torch.autograd.grad(got, leaves_new, g), torch.autograd.grad(want, leaves_old, g)):
                assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", [pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_fp32_weight_on_half_input_promotes_like_torch(backend, device):
    x, _, w = cases.norm_inputs((6, 40), torch.float16, device, seed=43)
    w = w.float().requires_grad_()
    x = x.requires_grad_()
    out = ops.rms_norm(x, w, 1e-6, backend=backend)
    ref = reference.rms_norm(x, w, 1e-6)
    assert out.dtype == ref.dtype == torch.float32
    cases.assert_close("rms_norm fp32 weight", ref, out, 1e-6)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(44)).to(device)
    dx, dw = torch.autograd.grad(out, (x, w), g)
    rdx, rdw = torch.autograd.grad(ref, (x, w), g)
    assert dx.dtype == torch.float16 and dw.dtype == torch.float32
    cases.assert_close("rms_norm fp32 weight dx", rdx, dx, 2e-3)
    cases.assert_close("rms_norm fp32 weight dw", rdw, dw, 1e-5)


# --- batch and thread invariance ---------------------------------------------------------------------

@pytest.mark.parametrize("backend,device,dtype", cases.targets(reference_backend=True, dtypes=(torch.float32,)))
def test_rows_are_independent(backend, device, dtype):
    x, res, w = cases.norm_inputs((9, 33), dtype, device, seed=45)
    normed, summed = ops.add_rms_norm(x, res, w, 1e-6, backend=backend)
    normed2, summed2 = ops.add_rms_norm(x[2:3], res[2:3], w, 1e-6, backend=backend)
    assert torch.equal(normed2[0], normed[2]) and torch.equal(summed2[0], summed[2])
    alone = ops.rms_norm(x[4:5], w, 1e-6, backend=backend)
    assert torch.equal(alone[0], ops.rms_norm(x, w, 1e-6, backend=backend)[4])


@cases.needs_cpp
@pytest.mark.parametrize("dtype", cases.ALL_DTYPES, ids=list(cases.DTYPE_IDS.values()))
def test_cpp_gradients_do_not_depend_on_the_thread_count(dtype):
    x, res, w = cases.norm_inputs((1500, 80), dtype, seed=57)  # 47 blocks of rows: several tasks on 2 threads
    kw = dict(x=x, residual=res, weight=w, eps=1e-5)
    threads = torch.get_num_threads()
    try:
        grads = []
        for n in (1, 2):
            torch.set_num_threads(n)
            grads.append(cases.forward_backward(lambda **k: _add_rms_norm_sum(**k, backend="cpp"), kw, WRT)[1])
            grads.append(cases.forward_backward(lambda **k: ops.rms_norm(**k, backend="cpp"),
                                                dict(x=x, weight=w, eps=1e-5), ["x", "weight"])[1])
    finally:
        torch.set_num_threads(threads)
    for k in WRT:
        assert torch.equal(grads[0][k], grads[2][k]), k
    for k in ("x", "weight"):
        assert torch.equal(grads[1][k], grads[3][k]), k


@cases.needs_cpp
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_cpp_dtype_conversions_are_atens(dtype):
    """h = x.to(dtype) + 0 over 2^20 random fp32 bit patterns and the corner cases (NaN, ±inf, ±0,
    subnormals of both formats, overflow, ties): the C++ op's own lane-wise conversions round like
    ATen's, bit for bit, and every value of ``dtype`` widens back to the same fp32."""
    g = torch.Generator().manual_seed(64)
    bits = torch.randint(-2**31, 2**31, (2**20,), generator=g, dtype=torch.int64).to(torch.int32)
    corners = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65519.0, 65520.0,
                            -65520.0, 2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-25, 2.0**-26, 1e-40, -1e-45,
                            1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.0e38, -3.4e38,
                            65536.0, -1.5 * 2.0**-14])
    x = torch.cat([bits.view(torch.float32), corners]).reshape(-1, 4)  # d = 4: no padded lanes
    h = ops.add_rms_norm(x, torch.zeros(x.shape, dtype=dtype), torch.ones(4, dtype=dtype), 1e-6, backend="cpp")[1]
    want = x.to(dtype) + 0
    assert torch.equal(h.isnan(), want.isnan())
    same = torch.where(want.isnan(), torch.zeros_like(want), want)
    assert torch.equal(torch.where(h.isnan(), torch.zeros_like(h), h).view(torch.int16), same.view(torch.int16))
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 8)
    widened = ops.add_rms_norm(every, torch.zeros(every.shape), torch.ones(8), 1e-6, backend="cpp")[1]
    torch.testing.assert_close(widened, every.float(), rtol=0, atol=0, equal_nan=True)


_CPP_RESULTS = """
import sys, torch
from bpp_kernels import ops
out = []
for x, r, w, out_dtype in torch.load(sys.argv[1]):
    x, r, w = x.requires_grad_(), r.requires_grad_(), w.requires_grad_()
    y, h = ops.add_rms_norm(x, r, w, 1e-5, out_dtype=out_dtype, backend="cpp")
    z = ops.rms_norm(h, w, 1e-5, backend="cpp")
    grads = torch.autograd.grad((y.float().sum() + (z.float() * h.float()).sum()), (x, r, w))
    out += [y, h, z, *grads]
torch.save([t.detach() for t in out], sys.argv[2])
"""


@cases.needs_cpp
def test_cpp_baseline_and_avx2_loops_give_the_same_bits(tmp_path):
    """The C++ norms compile their loops for the baseline ISA and for AVX2 + F16C; ATen's
    ATEN_CPU_CAPABILITY=default selects the baseline copy. Both must give the same bits (on the
    same inputs: torch.randn itself differs between the two)."""
    import os
    import subprocess
    import sys

    inputs = []
    for shape, x_dtype, h_dtype, out_dtype in (((13, 37), BF16, FP32, BF16), ((9, 64), FP16, FP16, None),
                                               ((5, 3), FP32, FP32, None), ((40, 20), BF16, BF16, FP16)):
        x, r, w = cases.norm_inputs(shape, seed=65)
        inputs.append((x.to(x_dtype), r.to(h_dtype), w.to(h_dtype), out_dtype))
    torch.save(inputs, tmp_path / "inputs.pt")
    runs = {}
    for name, capability in (("baseline", "default"), ("native", None)):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        path = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", _CPP_RESULTS, str(tmp_path / "inputs.pt"), str(path)], check=True,
                       env=env)
        runs[name] = torch.load(path)
    for i, (a, b) in enumerate(zip(runs["baseline"], runs["native"])):
        assert a.dtype == b.dtype and torch.equal(a, b), i


def test_backend_info_names_cpp_for_both_norms_on_cpu():
    info = bpp_kernels.backend_info()
    expected = "cpp" if cpp.AVAILABLE else "reference"
    assert info["rms_norm"]["cpu"] == info["add_rms_norm"]["cpu"] == expected


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu"),
                                            pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_no_rows_gives_zero_weight_gradients(backend, device):
    x, res, w = (t.requires_grad_() for t in cases.norm_inputs((0, 16), device=device, seed=47))
    y, h = ops.add_rms_norm(x, res, w, 1e-6, backend=backend)
    assert y.shape == h.shape == (0, 16)
    (y.sum() + h.sum() + ops.rms_norm(x, w, 1e-6, backend=backend).sum() + 1).backward()
    assert w.grad is not None and torch.equal(w.grad, torch.zeros(16, device=device))


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu"),
                                            pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_forward_and_backward_compile_without_graph_break(backend, device):
    x, res, w = cases.norm_inputs((3, 5, 24), torch.float32, device, seed=46)

    def loss_fn(x, res, w):
        y, h = ops.add_rms_norm(x, res, w, 1e-6, backend=backend)
        y16, h32 = ops.add_rms_norm(y.half(), h, w, 1e-6, out_dtype=torch.float16, backend=backend)
        return (ops.rms_norm(h32, w, 1e-6, backend=backend) * y * y16).mean()

    args = [t.clone().requires_grad_() for t in (x, res, w)]
    eager = loss_fn(*args)
    eager_grads = torch.autograd.grad(eager, args)
    got = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(*args)
    got_grads = torch.autograd.grad(got, args)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    for a, b in zip(got_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --- errors ----------------------------------------------------------------------------------------------

def test_float64_runs_on_the_reference_in_float64():
    x, res, w = cases.norm_inputs((3, 8), seed=48)
    assert ops.rms_norm(x.double(), w.double(), 1e-6).dtype == torch.float64
    assert ops.rms_norm(x, w, 1e-6, out_dtype=torch.float64).dtype == torch.float64
    y, h = ops.add_rms_norm(x, res.double(), w, 1e-6)
    assert y.dtype == h.dtype == torch.float64
    if cpp.AVAILABLE:
        with pytest.raises(ValueError, match="computes in float32 at most"):
            ops.add_rms_norm(x, res, w, 1e-6, out_dtype=torch.float64, backend="cpp")
        with pytest.raises(ValueError, match="computes in float32 at most"):
            ops.rms_norm(x, w.double(), 1e-6, backend="cpp")


BAD_ARGUMENTS = [  # (op, change to (x, residual, weight, out_dtype), message)
    ("rms_norm", lambda x, r, w, o: (x, r, w[:-1], o), r"rms_norm: weight must be \(16,\), got \(15,\)"),
    ("add_rms_norm", lambda x, r, w, o: (x, r, w[None], o), r"add_rms_norm: weight must be \(16,\), got \(1, 16\)"),
    ("rms_norm", lambda x, r, w, o: (x, r, w, torch.int32),
     r"rms_norm: out_dtype must be a floating torch.dtype or None, got torch.int32"),
    ("add_rms_norm", lambda x, r, w, o: (x, r, w, torch.bool),
     r"add_rms_norm: out_dtype must be a floating torch.dtype or None, got torch.bool"),
    ("add_rms_norm", lambda x, r, w, o: (x, r, w, "bf16"),
     r"add_rms_norm: out_dtype must be a floating torch.dtype or None, got 'bf16'"),
    ("add_rms_norm", lambda x, r, w, o: (x, r[:, :1], w, o), r"add_rms_norm: x \(2, 3, 16\) and residual \(2, 1, 16\)"),
    ("add_rms_norm", lambda x, r, w, o: (x, r.int(), w, o),
     r"add_rms_norm: residual must be floating, got torch.int32"),
    ("rms_norm", lambda x, r, w, o: (x.long(), r, w, o), r"rms_norm: x must be floating, got torch.int64"),
    ("rms_norm", lambda x, r, w, o: (x, r, w.to("meta"), o), r"rms_norm: weight is on meta, x on cpu"),
    ("rms_norm", lambda x, r, w, o: (x[0, 0, 0], r, w, o), r"rms_norm: x must be \(\.\.\., d\)"),
]


@pytest.mark.parametrize("backend", [pytest.param("reference"), pytest.param("cpp", marks=cases.needs_cpp)])
@pytest.mark.parametrize("case", range(len(BAD_ARGUMENTS)))
def test_bad_arguments_are_one_line_value_errors(case, backend):
    op, change, message = BAD_ARGUMENTS[case]
    x, r, w, out_dtype = change(*cases.norm_inputs((2, 3, 16), seed=49), None)
    args = (x, w) if op == "rms_norm" else (x, r, w)
    with pytest.raises(ValueError, match=message) as info:
        getattr(ops, op)(*args, 1e-6, out_dtype=out_dtype, backend=backend)
    assert "\n" not in str(info.value)


@cases.needs_cpp
def test_cpp_ops_refuse_bad_inputs_themselves():
    x, r, w = cases.norm_inputs((2, 3, 16), seed=50)
    with pytest.raises(RuntimeError, match=r"rms_norm: weight must be \(16,\)"):
        torch.ops.bpp.rms_norm(x, w[:3], 1e-6)
    with pytest.raises(RuntimeError, match="add_rms_norm: x .* and residual .* differ"):
        torch.ops.bpp.add_rms_norm(x, r[0], w, 1e-6)
    with pytest.raises(RuntimeError, match="float64 runs on the reference"):
        torch.ops.bpp.rms_norm(x.double(), w, 1e-6)
    with pytest.raises(RuntimeError, match="out_dtype must be float32, float16 or bfloat16"):
        torch.ops.bpp.add_rms_norm(x, r, w, 1e-6, torch.float64)
