"""masked_attention on every backend against the reference: forward and gradients (x, w_qkv,
w_o_t, q/k/v bias, q/k norms, per-group scales) for MHA and GQA, ragged/empty/full group masks,
T = 1 and odd T; pruned groups never read and given exactly zero gradient; batch invariance;
torch.compile; input errors."""
import pytest
import torch

from bpp_kernels import cpp, ops, reference
from tests.kernels import cases

WRT = ["x", "w_qkv", "w_o_t", "b_qkv", "q_norm", "k_norm", "unit_scale"]

SHAPES = [  # S, B, T, d, G, r, hd, keep
    pytest.param(3, 2, 7, 24, 3, 2, 8, 0.5, id="S3-B2-T7-G3-r2-hd8"),
    pytest.param(2, 1, 63, 20, 2, 3, 10, 0.6, id="S2-B1-T63-G2-r3-hd10"),
    pytest.param(4, 2, 5, 24, 4, 1, 6, 0.4, id="S4-B2-T5-MHA-hd6"),
    pytest.param(4, 2, 5, 24, 4, 1, 6, 1.0, id="S4-B2-T5-MHA-all-kept"),
    pytest.param(2, 1, 33, 16, 2, 2, 16, 1.0, id="S2-B1-T33-all-kept"),
    pytest.param(2, 2, 9, 16, 2, 2, 8, 0.0, id="S2-B2-T9-none-kept"),
    pytest.param(2, 1, 40, 36, 2, 2, 64, 0.5, id="S2-B1-T40-d36-hd64"),
    # GPU only: the GPU tile config (128-row tiles, 64-wide flash tiles) at hd 128, T not a multiple of 64
    pytest.param(3, 2, 200, 264, 4, 2, 128, 0.5, id="S3-B2-T200-d264-hd128", marks=pytest.mark.gpu),
]
VARIANTS = [pytest.param(False, False, id="plain"), pytest.param(True, False, id="qkv-bias"),
            pytest.param(False, True, id="qk-norm"), pytest.param(True, True, id="bias-and-norm")]
PLAIN, FULL = (False, False, False), (True, True, True)  # (bias, qk_norm, unit_scale)
GRAD_CASES = [  # S, B, T, d, G, r, hd, keep, (bias, qk_norm, unit_scale)
    pytest.param(3, 2, 7, 24, 3, 2, 8, 0.5, PLAIN, id="S3-B2-T7-G3-r2-hd8-plain"),
    pytest.param(3, 2, 7, 24, 3, 2, 8, 0.5, FULL, id="S3-B2-T7-G3-r2-hd8-bias-norm-unit-scale"),
    pytest.param(3, 1, 1, 16, 2, 3, 8, 0.6, FULL, id="S3-B1-T1-G2-r3-one-token-bias-norm-unit-scale"),
    pytest.param(4, 1, 37, 20, 3, 1, 10, 0.5, PLAIN, id="S4-B1-T37-MHA-hd10-plain"),
    pytest.param(2, 1, 9, 16, 2, 2, 8, 1.0, FULL, id="S2-B1-T9-all-kept-bias-norm-unit-scale"),
    pytest.param(2, 1, 9, 16, 2, 2, 8, 0.0, PLAIN, id="S2-B1-T9-none-kept-plain"),
    pytest.param(3, 2, 200, 264, 4, 2, 128, 0.5, FULL, id="S3-B2-T200-d264-hd128-bias-norm-unit-scale",
                 marks=pytest.mark.gpu),
]


FORWARD_CASES = [pytest.param(*shape.values, *variant.values, id=f"{shape.id}-{variant.id}", marks=shape.marks)
                 for shape in SHAPES for variant in VARIANTS]


def _cheap_enough(case, target) -> bool:
    """The interpreter skips the combined bias-and-norm variant and the all-kept MHA shape in the
    forward test (the gradient tests run both, output included), and runs fp16 gradients on
    three of the six gradient cases."""
    if not cases.interpreted(target):
        return True
    if case.id.endswith("bias-and-norm") or "MHA-all-kept" in case.id:
        return False
    return not (target.id.endswith("fp16") and case.id in FP32_ONLY_ON_INTERPRETER)


FP32_ONLY_ON_INTERPRETER = {"S3-B2-T7-G3-r2-hd8-plain", "S3-B1-T1-G2-r3-one-token-bias-norm-unit-scale",
                            "S2-B1-T9-none-kept-plain"}


@pytest.mark.parametrize("S,B,T,d,G,r,hd,keep,bias,qk_norm,backend,device,dtype",
                         cases.cross(FORWARD_CASES, cases.targets(), _cheap_enough))
def test_forward_matches_reference(S, B, T, d, G, r, hd, keep, bias, qk_norm, backend, device, dtype):
    kw = cases.attention_inputs(S, B, T, d, G, r, hd, keep, dtype=dtype, device=device, seed=21, bias=bias,
                                qk_norm=qk_norm)
    ref, tol = cases.tolerance(reference.masked_attention, kw, dtype)
    out = ops.masked_attention(**kw, backend=backend)
    assert out.dtype == dtype
    cases.assert_close(f"{backend} masked_attention", ref, out, tol)
    assert (out[kw["keep_count"] == 0] == 0).all(), "a sample keeping no group must give zeros"


@pytest.mark.parametrize("S,B,T,d,G,r,hd,keep,variant,backend,device,dtype",
                         cases.cross(GRAD_CASES, cases.targets(), _cheap_enough))
def test_gradients_match_reference(S, B, T, d, G, r, hd, keep, variant, backend, device, dtype):
    bias, qk_norm, scaled = variant
    kw = cases.attention_inputs(S, B, T, d, G, r, hd, keep, dtype=dtype, device=device, seed=22, bias=bias,
                                qk_norm=qk_norm, unit_scale=scaled)
    grads = cases.assert_grads_match(f"{backend} masked_attention", "masked_attention", kw, WRT, backend, dtype)
    assert (grads["x"][kw["keep_count"] == 0] == 0).all(), "a sample keeping no group passes no gradient to x"


@pytest.mark.parametrize("backend,device,dtype", cases.targets(dtypes=(torch.float32, torch.float16)))
def test_custom_scale_eps_with_bias_and_qk_norm(backend, device, dtype):
    kw = cases.attention_inputs(3, 1, 11, 16, 2, 2, 8, 0.5, dtype=dtype, device=device, seed=23, bias=True,
                                qk_norm=True, unit_scale=True)
    kw["scale"], kw["norm_eps"] = 0.3, 1e-5
    cases.assert_grads_match(f"{backend} masked_attention scale=0.3", "masked_attention", kw, WRT, backend, dtype)


@pytest.mark.parametrize("backend,device,dtype", cases.targets(reference_backend=True))
def test_pruned_groups_are_never_read_and_get_zero_gradient(backend, device, dtype):
    """NaN in the weights and biases of groups that no sample keeps reaches neither the output nor
    any gradient, and those groups' weight and bias gradients are exactly zero."""
    kw = cases.attention_inputs(3, 2, 13, 24, 4, 2, 8, 0.5, dtype=dtype, device=device, seed=24, bias=True,
                                qk_norm=True, unit_scale=True)
    mask = cases.random_mask(3, 4, 0.5, torch.Generator().manual_seed(25))
    mask[:, 3] = False  # group 3 is pruned in every sample
    keep_idx, keep_count = reference.mask_to_index(mask)
    kw["keep_idx"], kw["keep_count"] = keep_idx.to(device), keep_count.to(device)
    pruned = ~mask.any(0).to(device)
    ref_out, ref_grads, tols = cases.grad_tolerances(reference.masked_attention, kw, WRT, dtype)
    for name in ("w_qkv", "w_o_t", "b_qkv"):
        kw[name][pruned] = float("nan")
    out, grads = cases.forward_backward(lambda **k: ops.masked_attention(**k, backend=backend), kw, WRT)
    cases.assert_close(f"{backend} masked_attention", ref_out, out, tols["out"])
    for name in WRT:
        cases.assert_close(f"{backend} masked_attention d{name}", ref_grads[name], grads[name], tols[name])
    for name in ("w_qkv", "w_o_t", "b_qkv"):
        assert (grads[name][pruned] == 0).all(), f"d{name} of pruned groups must be exactly 0"


@pytest.mark.parametrize("backend,device,dtype", [p for p in cases.targets(reference_backend=True) if p.id != "cpp-fp16"])
def test_batch_invariance(backend, device, dtype, monkeypatch):
    """Sample j's output is the same bits alone and in a batch of 8 (both GEMM libraries for C++)."""
    kw = cases.attention_inputs(8, 2, 11, 24, 3, 2, 8, 0.6, dtype=dtype, device=device, seed=26, bias=True,
                                qk_norm=True, unit_scale=True)
    for gemm in (("onednn", "aten") if backend == "cpp" else ("default",)):
        monkeypatch.setenv("BPP_CPU_GEMM", gemm if backend == "cpp" else "auto")
        together = ops.masked_attention(**kw, backend=backend)
        for j in ((1, 5) if device == "cpu" and backend == "triton" else range(8)):  # the interpreter is slow
            one = {k: (v[j:j + 1] if k in ("x", "keep_idx", "keep_count", "unit_scale") else v) for k, v in kw.items()}
            assert torch.equal(ops.masked_attention(**one, backend=backend)[0], together[j]), \
                f"sample {j} differs alone and in a batch of 8 ({gemm})"


@cases.needs_cpp
@pytest.mark.parametrize("gemm", cases.CPU_GEMMS)
@pytest.mark.parametrize("dtype", cases.ALL_DTYPES, ids=lambda dt: cases.DTYPE_IDS[dt])
def test_cpp_both_gemm_libraries_match_reference(dtype, gemm, monkeypatch):
    monkeypatch.setenv("BPP_CPU_GEMM", gemm)
    kw = cases.attention_inputs(4, 2, 13, 24, 3, 2, 8, 0.6, dtype=dtype, seed=27, bias=True, qk_norm=True,
                                unit_scale=True)
    cases.assert_grads_match(f"cpp masked_attention ({gemm})", "masked_attention", kw, WRT, "cpp", dtype)


@pytest.mark.parametrize("backend,device", [pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_forward_and_backward_compile_without_graph_break(backend, device):
    kw = cases.attention_inputs(2, 1, 5, 16, 2, 2, 8, 0.5, device=device, seed=28, bias=True, qk_norm=True,
                                unit_scale=True)
    cases.assert_compiled_matches_eager(lambda **k: ops.masked_attention(**k, backend=backend), kw, WRT)


@cases.needs_cpp
def test_bad_inputs_say_what_is_wrong():
    kw = cases.attention_inputs(2, 1, 5, 16, 2, 2, 8, 0.5)
    bad = kw["keep_idx"].clone()
    bad[1, 0] = 5
    with pytest.raises(RuntimeError, match=r"keep_idx\[1, 0\] = 5 is outside"):
        cpp.masked_attention(**{**kw, "keep_idx": bad})
    with pytest.raises(RuntimeError, match="must be even"):
        cpp.masked_attention(**{**kw, "cos": kw["cos"][:, :7], "sin": kw["sin"][:, :7]})
    with pytest.raises(RuntimeError, match="unit_scale must be a floating"):
        cpp.masked_attention(**kw, unit_scale=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"unit_scale must be a floating \(S=2, n=2\)"):
        ops.masked_attention(**kw, unit_scale=torch.ones(2, 3))
    with pytest.raises(ValueError, match="cos and sin are RoPE constants"):
        ops.masked_attention(**{**kw, "cos": kw["cos"].clone().requires_grad_()})


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=cases.needs_interpreter),
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_triton_refuses_odd_head_dim(device):
    kw = cases.attention_inputs(1, 1, 4, 12, 1, 1, 5, 1.0, device=device, seed=29)
    kw["cos"], kw["sin"] = torch.ones(4, 5, device=device), torch.zeros(4, 5, device=device)  # cases.rope cannot make an odd head_dim
    with pytest.raises(ValueError, match="even head_dim"):
        ops.masked_attention(**kw, backend="triton")


@pytest.mark.gpu
def test_no_host_sync():
    """Counts stay on the device: neither direction waits for the GPU (DESIGN: one sync per PG step)."""
    kw = cases.attention_inputs(4, 2, 64, 64, 4, 2, 16, 0.5, dtype=torch.bfloat16, device="cuda", seed=30,
                                bias=True, qk_norm=True, unit_scale=True)
    x = kw.pop("x").requires_grad_()
    ops.masked_attention(x, **kw, backend="triton").sum().backward()  # compile first: the first launch may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.masked_attention(x, **kw, backend="triton").sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cases.needs_cpp
def test_attention_and_mlp_compile_with_inductor():
    """Masked attention and MLP with per-unit scales on the C++ backend, forward and backward,
    compiled by inductor (gcc) with fullgraph=True: the eager loss and gradients. (The other
    compile tests use aot_eager; this one is kept small because inductor compiles C++ code.)"""
    S, B, T, d, m = 2, 1, 5, 16, 24
    att = cases.attention_inputs(S, B, T, d, 2, 2, 8, 0.5, seed=38, unit_scale=True)
    mlp = cases.swiglu_inputs(S, B * T, d, m, 0.5, seed=39, unit_scale=True)
    params = dict(x=att["x"], w_qkv=att["w_qkv"], w_o_t=att["w_o_t"], group_scale=att["unit_scale"],
                  w_gate_up=mlp["w_gate_up"], w_down_t=mlp["w_down_t"], channel_scale=mlp["unit_scale"])

    def loss_fn(p):
        h = p["x"] + ops.masked_attention(p["x"], p["w_qkv"], p["w_o_t"], att["cos"], att["sin"], att["keep_idx"],
                                          att["keep_count"], unit_scale=p["group_scale"], backend="cpp")
        h = h + ops.masked_swiglu(h, p["w_gate_up"], p["w_down_t"], mlp["keep_idx"], mlp["keep_count"],
                                  unit_scale=p["channel_scale"], backend="cpp")
        return h.square().mean()

    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    eager = loss_fn(leaves)
    eager_grads = torch.autograd.grad(eager, list(leaves.values()))
    got = torch.compile(loss_fn, fullgraph=True)(leaves)
    got_grads = torch.autograd.grad(got, list(leaves.values()))
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(leaves, got_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"d{name}: {m}")
