"""masked_swiglu on every backend against the reference: forward and gradients (x, both
weights, per-unit scales) on ragged, empty and full masks at odd sizes, for both gate
activations (SiLU: SwiGLU; tanh-GELU: GeGLU), pruned channels never read and given exactly zero
gradient, batch invariance, torch.compile, input errors; the C++ backend's saved gate/up
projections and its fused passes on every instruction set."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bpp_kernels import cpp, ops, reference
from tests.kernels import cases

WRT = ["x", "w_gate_up", "w_down_t", "unit_scale"]
ACTIVATIONS = [pytest.param("silu", id="silu"), pytest.param("gelu_tanh", id="gelu_tanh")]

SHAPES = [  # S, N, d, m, keep
    pytest.param(3, 5, 12, 17, 0.5, id="S3-N5-d12-m17-keep0.5"),
    pytest.param(4, 63, 60, 70, 0.3, id="S4-N63-d60-m70-keep0.3"),
    pytest.param(2, 33, 40, 100, 0.7, id="S2-N33-d40-m100-keep0.7"),
    pytest.param(2, 130, 64, 300, 0.5, id="S2-N130-d64-m300-keep0.5"),
    pytest.param(2, 7, 8, 8, 1.0, id="S2-N7-d8-m8-all-kept"),
    pytest.param(3, 9, 16, 24, 0.0, id="S3-N9-d16-m24-none-kept"),
    # GPU only: enough rows for the 128-row tiles of the GPU config, several tiles in every dim
    pytest.param(3, 300, 520, 1000, 0.6, id="S3-N300-d520-m1000-keep0.6", marks=pytest.mark.gpu),
]
GRAD_CASES = [  # S, N, d, m, keep, unit_scale
    pytest.param(3, 5, 12, 17, 0.5, False, id="S3-N5-d12-m17-keep0.5-hard-mask"),
    pytest.param(3, 5, 12, 17, 0.5, True, id="S3-N5-d12-m17-keep0.5-unit-scale"),
    pytest.param(3, 1, 16, 40, 0.6, True, id="S3-N1-d16-m40-one-token-unit-scale"),
    pytest.param(4, 37, 40, 70, 0.4, False, id="S4-N37-d40-m70-keep0.4-hard-mask"),
    pytest.param(4, 37, 40, 70, 0.4, True, id="S4-N37-d40-m70-keep0.4-unit-scale"),
    pytest.param(2, 7, 8, 8, 1.0, False, id="S2-N7-d8-m8-all-kept-hard-mask"),
    pytest.param(2, 9, 16, 24, 0.0, True, id="S2-N9-d16-m24-none-kept-unit-scale"),
    pytest.param(3, 300, 520, 1000, 0.6, True, id="S3-N300-d520-m1000-keep0.6-unit-scale", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("backend,device,dtype", cases.targets())
@pytest.mark.parametrize("S,N,d,m,keep", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_matches_reference(activation, S, N, d, m, keep, backend, device, dtype):
    kw = cases.swiglu_inputs(S, N, d, m, keep, dtype=dtype, device=device, seed=11)
    kw["activation"] = activation
    ref, tol = cases.tolerance(reference.masked_swiglu, kw, dtype)
    out = ops.masked_swiglu(**kw, backend=backend)
    assert out.dtype == dtype
    cases.assert_close(f"{backend} masked_swiglu", ref, out, tol)
    assert (out[kw["keep_count"] == 0] == 0).all(), "a sample keeping no channel must give zeros"


@pytest.mark.parametrize("backend,device,dtype", cases.targets())
@pytest.mark.parametrize("S,N,d,m,keep,scaled", GRAD_CASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_match_reference(activation, S, N, d, m, keep, scaled, backend, device, dtype):
    kw = cases.swiglu_inputs(S, N, d, m, keep, dtype=dtype, device=device, seed=12, unit_scale=scaled)
    kw["activation"] = activation
    grads = cases.assert_grads_match(f"{backend} masked_swiglu", "masked_swiglu", kw, WRT, backend, dtype)
    empty = kw["keep_count"] == 0
    assert (grads["x"][empty] == 0).all(), "a sample keeping no channel passes no gradient to x"
    if scaled:
        slots = torch.arange(m, device=device)[None, :] >= kw["keep_count"][:, None]
        assert (grads["unit_scale"][slots] == 0).all(), "scales past keep_count are never read"


def _gelu_tanh(g):
    """GELU's tanh approximation written out (Gemma's hidden_activation "gelu_pytorch_tanh")."""
    return 0.5 * g * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (g + 0.044715 * g**3)))


def _dense_geglu(x, w_gate_up, w_down_t, unit_mask):
    """Gemma's MLP, every channel computed: down(gelu_tanh(gate x) * up x), the mask (S, m) in
    channel order multiplied into the activations before W_down."""
    g, u = x @ w_gate_up[:, 0].t(), x @ w_gate_up[:, 1].t()
    return (_gelu_tanh(g) * u * unit_mask[:, None, :]) @ w_down_t


def test_written_out_gelu_tanh_is_torchs():
    g = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    torch.testing.assert_close(_gelu_tanh(g), F.gelu(g, approximate="tanh"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scaled", [False, True], ids=["hard-mask", "unit-scale"])
@pytest.mark.parametrize("S,N,d,m,keep", [(3, 5, 12, 17, 0.5), (4, 9, 60, 70, 0.3), (2, 1, 8, 8, 1.0),
                                          (2, 3, 8, 8, 0.0)])
def test_reference_gelu_tanh_equals_dense_geglu_with_mask_multiplied(S, N, d, m, keep, scaled):
    """The reference's GeGLU, output and gradients, against the dense MLP with pruned channels
    zeroed (and kept ones scaled) by a multiplicative mask, in float64."""
    kw = cases.to_float64(cases.swiglu_inputs(S, N, d, m, keep, seed=20, unit_scale=scaled))
    kw["activation"] = "gelu_tanh"
    wrt = ["x", "w_gate_up", "w_down_t"] + (["unit_scale"] if scaled else [])
    out, grads = cases.forward_backward(reference.masked_swiglu, kw, wrt)

    def dense(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale=None, activation=None):
        slots = torch.arange(m)[None, :] < keep_count[:, None]
        values = torch.ones(S, m, dtype=x.dtype) if unit_scale is None else unit_scale
        unit_mask = torch.zeros(S, m, dtype=x.dtype).scatter(1, keep_idx.long(), torch.where(slots, values, 0.0))
        return _dense_geglu(x, w_gate_up, w_down_t, unit_mask)

    dense_out, dense_grads = cases.forward_backward(dense, kw, wrt)
    torch.testing.assert_close(out, dense_out, rtol=1e-10, atol=1e-10)
    for name in wrt:
        torch.testing.assert_close(grads[name], dense_grads[name], rtol=1e-10, atol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("backend,device", [pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter)])
def test_extra_leading_dims(backend, device):
    kw = cases.swiglu_inputs(3, 2 * 7, 12, 17, 0.5, device=device, seed=13, unit_scale=True)
    kw["x"] = kw["x"].view(3, 2, 7, 12)
    grads = cases.assert_grads_match(f"{backend} masked_swiglu (S, B, T, d)", "masked_swiglu", kw, WRT, backend,
                                     torch.float32)
    assert grads["x"].shape == (3, 2, 7, 12)


@pytest.mark.parametrize("backend,device,dtype", cases.targets(reference_backend=True))
def test_pruned_channels_are_never_read_and_get_zero_gradient(backend, device, dtype):
    """NaN in the weights of channels that no sample keeps reaches neither the output nor any
    gradient, and those channels' weight gradients are exactly zero."""
    kw = cases.swiglu_inputs(3, 21, 40, 90, 0.4, dtype=dtype, device=device, seed=14, unit_scale=True)
    kw["keep_count"][1] = 60  # no sample keeps everything, so some channels are pruned everywhere
    kept_anywhere = torch.zeros(90, dtype=torch.bool, device=device)
    for s in range(3):
        kept_anywhere[kw["keep_idx"][s, :kw["keep_count"][s]].long()] = True
    assert not kept_anywhere.all()
    ref_out, ref_grads, tols = cases.grad_tolerances(reference.masked_swiglu, kw, WRT, dtype)
    kw["w_gate_up"][~kept_anywhere] = float("nan")
    kw["w_down_t"][~kept_anywhere] = float("nan")
    out, grads = cases.forward_backward(lambda **k: ops.masked_swiglu(**k, backend=backend), kw, WRT)
    cases.assert_close(f"{backend} masked_swiglu", ref_out, out, tols["out"])
    for name in WRT:
        cases.assert_close(f"{backend} masked_swiglu d{name}", ref_grads[name], grads[name], tols[name])
    for name in ("w_gate_up", "w_down_t"):
        assert (grads[name][~kept_anywhere] == 0).all(), f"d{name} of pruned channels must be exactly 0"


@pytest.mark.parametrize("backend,device,dtype", [p for p in cases.targets(reference_backend=True) if p.id != "cpp-fp16"])
def test_batch_invariance(backend, device, dtype, monkeypatch):
    """Sample j's output is the same bits alone and in a batch of 8 (both GEMM libraries for C++)."""
    kw = cases.swiglu_inputs(8, 21, 24, 40, 0.5, dtype=dtype, device=device, seed=15, unit_scale=True)
    for gemm in (("onednn", "aten") if backend == "cpp" else ("default",)):
        monkeypatch.setenv("BPP_CPU_GEMM", gemm if backend == "cpp" else "auto")
        for activation in ("silu", "gelu_tanh"):
            together = ops.masked_swiglu(**kw, activation=activation, backend=backend)
            for j in range(8):
                alone = ops.masked_swiglu(kw["x"][j:j + 1], kw["w_gate_up"], kw["w_down_t"], kw["keep_idx"][j:j + 1],
                                          kw["keep_count"][j:j + 1], unit_scale=kw["unit_scale"][j:j + 1],
                                          activation=activation, backend=backend)
                assert torch.equal(alone[0], together[j]), \
                    f"sample {j} differs alone and in a batch of 8 ({gemm}, {activation})"


@cases.needs_cpp
@pytest.mark.parametrize("gemm", cases.CPU_GEMMS)
@pytest.mark.parametrize("dtype", cases.ALL_DTYPES, ids=lambda dt: cases.DTYPE_IDS[dt])
def test_cpp_both_gemm_libraries_match_reference(dtype, gemm, monkeypatch):
    monkeypatch.setenv("BPP_CPU_GEMM", gemm)
    kw = cases.swiglu_inputs(4, 37, 40, 90, 0.4, dtype=dtype, seed=16, unit_scale=True)
    cases.assert_grads_match(f"cpp masked_swiglu ({gemm})", "masked_swiglu", kw, WRT, "cpp", dtype)


@pytest.mark.parametrize("backend,device", [pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_and_backward_compile_without_graph_break(backend, device, activation):
    """mask -> index lists -> masked_swiglu -> loss, and its backward, in one torch.compile graph
    (fullgraph=True raises on any graph break); the same values as eager."""
    kw = cases.swiglu_inputs(3, 5, 12, 17, 0.5, device=device, seed=17, unit_scale=True)
    mask = cases.random_mask(3, 17, 0.5, torch.Generator().manual_seed(18)).to(device)

    def loss_fn(x, w_gate_up, w_down_t, unit_scale, mask):
        keep_idx, keep_count = ops.mask_to_index(mask, backend=backend)
        y = ops.masked_swiglu(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale=unit_scale,
                              activation=activation, backend=backend)
        return (y * y).mean()

    args = {k: kw[k].detach().clone().requires_grad_() for k in ("x", "w_gate_up", "w_down_t", "unit_scale")}
    eager = loss_fn(**args, mask=mask)
    eager_grads = torch.autograd.grad(eager, list(args.values()))
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    got = compiled(**args, mask=mask)
    got_grads = torch.autograd.grad(got, list(args.values()))
    assert torch.equal(got, eager)
    for name, a, b in zip(args, got_grads, eager_grads):
        assert torch.equal(a, b), f"d{name} differs compiled and eager"


@cases.needs_cpp
def test_bad_inputs_say_what_is_wrong():
    kw = cases.swiglu_inputs(2, 5, 12, 17, 0.5)
    args = [kw["x"], kw["w_gate_up"], kw["w_down_t"], kw["keep_idx"], kw["keep_count"]]
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.bpp.masked_swiglu(*args[:3], kw["keep_idx"].long(), kw["keep_count"], None)
    bad = kw["keep_idx"].clone()
    bad[1, 0] = 17
    with pytest.raises(RuntimeError, match=r"keep_idx\[1, 0\] = 17 is outside"):
        torch.ops.bpp.masked_swiglu(*args[:3], bad, kw["keep_count"], None)
    with pytest.raises(RuntimeError, match="keep_count"):
        torch.ops.bpp.masked_swiglu(*args[:4], torch.tensor([3, 18], dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match="unit_scale must be a floating"):
        cpp.masked_swiglu(*args, unit_scale=torch.ones(2, 16))
    with pytest.raises(ValueError, match=r"unit_scale must be a floating \(S=2, n=17\)"):
        ops.masked_swiglu(*args, unit_scale=torch.ones(2, 17, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=cases.needs_cpp),
                                     pytest.param("triton", marks=cases.needs_interpreter)])
def test_unknown_activation_is_a_value_error(backend):
    kw = cases.swiglu_inputs(2, 5, 12, 17, 0.5)
    message = r"^masked_swiglu: activation must be 'silu' or 'gelu_tanh', got 'relu'$"
    with pytest.raises(ValueError, match=message):
        ops.masked_swiglu(**kw, activation="relu", backend=backend)
    impl = ops._impl("masked_swiglu", backend)  # the backend's own function, past ops' check
    with pytest.raises(ValueError, match=message):
        impl(**kw, activation="relu")


@cases.needs_cpp
def test_cpp_ops_reject_an_unknown_activation():
    kw = cases.swiglu_inputs(2, 5, 12, 17, 0.5)
    args = [kw["x"], kw["w_gate_up"], kw["w_down_t"], kw["keep_idx"], kw["keep_count"], None]
    with pytest.raises(ValueError, match="activation must be 'silu' or 'gelu_tanh', got 'gelu'"):
        torch.ops.bpp.masked_swiglu(*args, "gelu")
    with pytest.raises(ValueError, match="activation must be 'silu' or 'gelu_tanh', got 'relu'"):
        torch.ops.bpp.masked_swiglu_with_gate_up(*args, "relu")
    with pytest.raises(ValueError, match="activation must be 'silu' or 'gelu_tanh', got 'tanh'"):
        torch.ops.bpp.masked_swiglu_backward(kw["x"], *args, None, "tanh", [True, True, True, False])


class _RecordOps(TorchDispatchMode):
    """The names of the operators that run below autograd."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@cases.needs_cpp
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpp_saves_the_kept_gate_up_projections_when_a_gradient_is_wanted(activation):
    """With a gradient wanted the C++ forward also returns, and autograd saves, every sample's
    (N, 2c) gate/up projections (memory proportional to the kept channels) for the backward to
    read; the output bits are those of the inference op, and the gradients those of the backward
    that recomputes the projections (after the plain op). Without a gradient nothing is saved."""
    S, N, d, m = 4, 13, 24, 50
    kw = cases.swiglu_inputs(S, N, d, m, 0.4, seed=22, unit_scale=True)
    kw["activation"] = activation
    leaves = {k: kw[k].clone().requires_grad_() for k in WRT}
    inputs = {t.untyped_storage().data_ptr() for t in leaves.values()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), _RecordOps() as rec:
        y = ops.masked_swiglu(**{**kw, **leaves}, backend="cpp")
    assert "bpp::masked_swiglu_with_gate_up" in rec.names
    extra = [t for t in saved if t is not None and t.is_floating_point()
             and t.untyped_storage().data_ptr() not in inputs]
    assert [t.numel() for t in extra] == [N * 2 * int(kw["keep_count"].sum())]
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(23))
    grads = torch.autograd.grad(y, list(leaves.values()), g)

    args = [leaves["x"], leaves["w_gate_up"], leaves["w_down_t"], kw["keep_idx"], kw["keep_count"],
            leaves["unit_scale"], activation]
    y_plain = torch.ops.bpp.masked_swiglu(*args)  # its backward recomputes the projections
    recomputed = torch.autograd.grad(y_plain, list(leaves.values()), g)
    assert torch.equal(y, y_plain)
    for name, a, b in zip(WRT, grads, recomputed):
        cases.assert_close(f"d{name} (saved vs recomputed projections)", b, a, cases.FP32_TOL)

    with torch.no_grad(), _RecordOps() as rec:
        y_inference = ops.masked_swiglu(**{**kw, **leaves}, backend="cpp")
    assert "bpp::masked_swiglu" in rec.names and "bpp::masked_swiglu_with_gate_up" not in rec.names
    assert torch.equal(y_inference, y)


@cases.needs_cpp
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpp_backward_over_several_channel_blocks(activation, dtype):
    """More kept channels than one backward block (1,024 in masked_swiglu_cpu.cpp): dX summed over
    the blocks, each block's projections read at its offset (or recomputed), against the reference."""
    kw = cases.swiglu_inputs(3, 5, 8, 2600, 0.6, dtype=dtype, seed=25, unit_scale=True)
    assert int(kw["keep_count"].max()) > 2048  # sample 1 keeps everything: three blocks
    kw["activation"] = activation
    grads = cases.assert_grads_match(f"cpp masked_swiglu ({activation})", "masked_swiglu", kw, WRT, "cpp", dtype)
    leaves = {k: kw[k].clone().requires_grad_() for k in WRT}
    y_plain = torch.ops.bpp.masked_swiglu(leaves["x"], leaves["w_gate_up"], leaves["w_down_t"], kw["keep_idx"],
                                          kw["keep_count"], leaves["unit_scale"], activation)
    g = torch.randn(y_plain.shape, generator=torch.Generator().manual_seed(1)).to(dtype)  # forward_backward's
    recomputed = torch.autograd.grad(y_plain, list(leaves.values()), g)
    for name, b in zip(WRT, recomputed):
        cases.assert_close(f"d{name} (recomputed projections)", grads[name].float(), b.float(),
                           1e-5 if dtype == torch.float32 else 1e-2)


@cases.needs_cpp
def test_cpp_backward_rejects_projections_of_other_inputs():
    kw = cases.swiglu_inputs(2, 5, 12, 17, 0.5)
    args = [kw["x"], kw["w_gate_up"], kw["w_down_t"], kw["keep_idx"], kw["keep_count"], None]
    _, gate_up = torch.ops.bpp.masked_swiglu_with_gate_up(*args)
    with pytest.raises(RuntimeError, match="gate_up must be the second output of masked_swiglu_with_gate_up"):
        torch.ops.bpp.masked_swiglu_backward(kw["x"], *args, gate_up[1:], "silu", [True, True, True, False])


@cases.needs_cpp
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_cpp_fused_passes_on_narrower_instruction_sets(isa):
    """The C++ activation passes (csrc/ops/cpu/glu.h) are compiled for AVX-512, AVX2 and the
    build's baseline, and a CPU runs the widest it has: the narrower ones (BPP_GLU_ISA, read once
    per process, so in a subprocess) against the reference, both activations, with and without
    per-unit scales."""
    script = textwrap.dedent("""
        import torch
        from tests.kernels import cases
        for activation in ("silu", "gelu_tanh"):
            for scaled in (False, True):
                kw = cases.swiglu_inputs(4, 37, 40, 70, 0.4, seed=24, unit_scale=scaled)
                kw["activation"] = activation
                cases.assert_grads_match(f"cpp masked_swiglu ({activation})", "masked_swiglu", kw,
                                         ["x", "w_gate_up", "w_down_t", "unit_scale"], "cpp", torch.float32)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "BPP_GLU_ISA": isa},
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.gpu
def test_no_host_sync():
    """Counts stay on the device: neither direction waits for the GPU (DESIGN: one sync per PG step)."""
    kw = cases.swiglu_inputs(4, 64, 64, 200, 0.5, dtype=torch.bfloat16, device="cuda", seed=19, unit_scale=True)
    x = kw.pop("x").requires_grad_()
    ops.masked_swiglu(x, **kw, backend="triton").sum().backward()  # compile first: the first launch may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.masked_swiglu(x, **kw, backend="triton").sum().backward()
        ops.mask_to_index(torch.rand(4, 200, device="cuda") < 0.5, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
