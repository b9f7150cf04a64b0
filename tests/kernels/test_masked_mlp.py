"""masked_mlp (the non-gated MLP of OPT, GPT-2, Pythia) on every backend against the reference:
forward and gradients (x, w_up, w_down_t, b_up, per-unit scales) for each activation, with and
without the up bias and unit_scale, on ragged, empty and full masks at odd sizes; pruned channels
never read and given exactly zero gradient, batch invariance, torch.compile, input errors."""
import pytest
import torch

from bpp_kernels import cpp, ops, reference
from tests.kernels import cases

WRT = ["x", "w_up", "w_down_t", "b_up", "unit_scale"]
ACTIVATIONS = ["gelu", "gelu_tanh", "relu"]

SHAPES = [  # S, N, d, m, keep, activation
    pytest.param(3, 5, 12, 17, 0.5, "gelu", id="S3-N5-d12-m17-keep0.5-gelu"),
    pytest.param(4, 63, 60, 70, 0.3, "relu", id="S4-N63-d60-m70-keep0.3-relu"),
    pytest.param(2, 33, 40, 100, 0.7, "gelu_tanh", id="S2-N33-d40-m100-keep0.7-gelu_tanh"),
    pytest.param(2, 130, 64, 300, 0.5, "gelu", id="S2-N130-d64-m300-keep0.5-gelu"),
    pytest.param(2, 7, 8, 8, 1.0, "relu", id="S2-N7-d8-m8-all-kept-relu"),
    pytest.param(3, 9, 16, 24, 0.0, "gelu", id="S3-N9-d16-m24-none-kept-gelu"),
    # GPU only: enough rows for the 128-row tiles of the GPU config, several tiles in every dim
    pytest.param(3, 300, 520, 1000, 0.6, "gelu", id="S3-N300-d520-m1000-keep0.6-gelu", marks=pytest.mark.gpu),
]
# the interpreter runs the cheap ones only
INTERPRETER_SHAPES = {"S3-N5-d12-m17-keep0.5-gelu", "S2-N33-d40-m100-keep0.7-gelu_tanh", "S2-N7-d8-m8-all-kept-relu",
                      "S3-N9-d16-m24-none-kept-gelu"}
GRAD_SHAPES = [  # S, N, d, m, keep, activation
    pytest.param(3, 1, 16, 40, 0.6, "gelu_tanh", id="S3-N1-d16-m40-one-token-gelu_tanh"),
    pytest.param(4, 37, 40, 70, 0.4, "gelu", id="S4-N37-d40-m70-keep0.4-gelu"),
    pytest.param(4, 37, 40, 70, 0.4, "relu", id="S4-N37-d40-m70-keep0.4-relu"),
    pytest.param(2, 7, 8, 8, 1.0, "gelu", id="S2-N7-d8-m8-all-kept-gelu"),
    pytest.param(2, 9, 16, 24, 0.0, "relu", id="S2-N9-d16-m24-none-kept-relu"),
    pytest.param(3, 300, 520, 1000, 0.6, "gelu_tanh", id="S3-N300-d520-m1000-keep0.6-gelu_tanh",
                 marks=pytest.mark.gpu),
]
INTERPRETER_GRAD_SHAPES = {"S3-N1-d16-m40-one-token-gelu_tanh", "S2-N7-d8-m8-all-kept-gelu",
                           "S2-N9-d16-m24-none-kept-relu"}


def _cheap(names):
    return lambda case, target: not cases.interpreted(target) or case.id in names


@pytest.mark.parametrize("S,N,d,m,keep,activation,backend,device,dtype",
                         cases.cross(SHAPES, cases.targets(), _cheap(INTERPRETER_SHAPES)))
def test_forward_matches_reference(S, N, d, m, keep, activation, backend, device, dtype):
    kw = cases.mlp_inputs(S, N, d, m, keep, dtype=dtype, device=device, seed=11, unit_scale=True,
                          activation=activation)
    ref, tol = cases.tolerance(reference.masked_mlp, kw, dtype)
    out = ops.masked_mlp(**kw, backend=backend)
    assert out.dtype == dtype
    cases.assert_close(f"{backend} masked_mlp", ref, out, tol)
    assert (out[kw["keep_count"] == 0] == 0).all(), "a sample keeping no channel must give zeros"


@pytest.mark.parametrize("backend,device,dtype", cases.targets())
@pytest.mark.parametrize("scaled", [False, True], ids=["hard-mask", "unit-scale"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_match_reference(activation, bias, scaled, backend, device, dtype):
    """Output and every gradient, for each activation, with and without b_up and unit_scale."""
    kw = cases.mlp_inputs(3, 5, 12, 17, 0.5, dtype=dtype, device=device, seed=12, bias=bias, unit_scale=scaled,
                          activation=activation)
    grads = cases.assert_grads_match(f"{backend} masked_mlp", "masked_mlp", kw, WRT, backend, dtype)
    assert ("b_up" in grads) == bias and ("unit_scale" in grads) == scaled
    empty = kw["keep_count"] == 0
    assert (grads["x"][empty] == 0).all(), "a sample keeping no channel passes no gradient to x"
    if scaled:
        slots = torch.arange(17, device=device)[None, :] >= kw["keep_count"][:, None]
        assert (grads["unit_scale"][slots] == 0).all(), "scales past keep_count are never read"


@pytest.mark.parametrize("S,N,d,m,keep,activation,backend,device,dtype",
                         cases.cross(GRAD_SHAPES, cases.targets(), _cheap(INTERPRETER_GRAD_SHAPES)))
def test_gradients_on_ragged_shapes(S, N, d, m, keep, activation, backend, device, dtype):
    kw = cases.mlp_inputs(S, N, d, m, keep, dtype=dtype, device=device, seed=13, unit_scale=True,
                          activation=activation)
    cases.assert_grads_match(f"{backend} masked_mlp", "masked_mlp", kw, WRT, backend, dtype)


@pytest.mark.parametrize("backend,device", [pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter)])
def test_extra_leading_dims(backend, device):
    kw = cases.mlp_inputs(3, 2 * 7, 12, 17, 0.5, device=device, seed=14, unit_scale=True)
    kw["x"] = kw["x"].view(3, 2, 7, 12)
    grads = cases.assert_grads_match(f"{backend} masked_mlp (S, B, T, d)", "masked_mlp", kw, WRT, backend,
                                     torch.float32)
    assert grads["x"].shape == (3, 2, 7, 12)


@pytest.mark.parametrize("backend,device,dtype", cases.targets(reference_backend=True))
def test_pruned_channels_are_never_read_and_get_zero_gradient(backend, device, dtype):
    """NaN in the weights and biases of channels that no sample keeps reaches neither the output
    nor any gradient, and those channels' gradients are exactly zero."""
    kw = cases.mlp_inputs(3, 21, 40, 90, 0.4, dtype=dtype, device=device, seed=15, unit_scale=True,
                          activation="gelu_tanh")
    kw["keep_count"][1] = 60  # no sample keeps everything, so some channels are pruned everywhere
    kept_anywhere = torch.zeros(90, dtype=torch.bool, device=device)
    for s in range(3):
        kept_anywhere[kw["keep_idx"][s, :kw["keep_count"][s]].long()] = True
    assert not kept_anywhere.all()
    ref_out, ref_grads, tols = cases.grad_tolerances(reference.masked_mlp, kw, WRT, dtype)
    for name in ("w_up", "w_down_t", "b_up"):
        kw[name][~kept_anywhere] = float("nan")
    out, grads = cases.forward_backward(lambda **k: ops.masked_mlp(**k, backend=backend), kw, WRT)
    cases.assert_close(f"{backend} masked_mlp", ref_out, out, tols["out"])
    for name in WRT:
        cases.assert_close(f"{backend} masked_mlp d{name}", ref_grads[name], grads[name], tols[name])
    for name in ("w_up", "w_down_t", "b_up"):
        assert (grads[name][~kept_anywhere] == 0).all(), f"d{name} of pruned channels must be exactly 0"


@pytest.mark.parametrize("backend,device,dtype", cases.targets(reference_backend=True))
def test_batch_invariance(backend, device, dtype, monkeypatch):
    """Sample j's output is the same bits alone and in a batch of 8 (both GEMM libraries for C++)."""
    kw = cases.mlp_inputs(8, 21, 24, 40, 0.5, dtype=dtype, device=device, seed=16, unit_scale=True)
    for gemm in (("onednn", "aten") if backend == "cpp" else ("default",)):
        monkeypatch.setenv("BPP_CPU_GEMM", gemm if backend == "cpp" else "auto")
        together = ops.masked_mlp(**kw, backend=backend)
        for j in range(8):
            alone = ops.masked_mlp(kw["x"][j:j + 1], kw["w_up"], kw["w_down_t"], kw["keep_idx"][j:j + 1],
                                   kw["keep_count"][j:j + 1], b_up=kw["b_up"], activation=kw["activation"],
                                   unit_scale=kw["unit_scale"][j:j + 1], backend=backend)
            assert torch.equal(alone[0], together[j]), f"sample {j} differs alone and in a batch of 8 ({gemm})"


@cases.needs_cpp
@pytest.mark.parametrize("gemm", cases.CPU_GEMMS)
@pytest.mark.parametrize("dtype", cases.ALL_DTYPES, ids=lambda dt: cases.DTYPE_IDS[dt])
def test_cpp_both_gemm_libraries_match_reference(dtype, gemm, monkeypatch):
    monkeypatch.setenv("BPP_CPU_GEMM", gemm)
    kw = cases.mlp_inputs(4, 37, 40, 90, 0.4, dtype=dtype, seed=17, unit_scale=True)
    cases.assert_grads_match(f"cpp masked_mlp ({gemm})", "masked_mlp", kw, WRT, "cpp", dtype)


@pytest.mark.parametrize("backend", [pytest.param("reference"), pytest.param("cpp", marks=cases.needs_cpp),
                                     pytest.param("triton", marks=cases.needs_interpreter)])
def test_a_batch_that_keeps_nothing_has_zero_gradients(backend):
    kw = cases.mlp_inputs(2, 3, 8, 9, 0.0, seed=18, unit_scale=True)
    assert int(kw["keep_count"].sum()) == 0
    leaves = {n: kw[n].clone().requires_grad_() for n in WRT}
    out = ops.masked_mlp(**{**kw, **leaves}, backend=backend)
    assert out.grad_fn is not None and torch.equal(out, torch.zeros_like(out))
    (out * torch.randn_like(out) + 1).sum().backward()
    for n, t in leaves.items():
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t)), n


@pytest.mark.parametrize("backend,device", [pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_forward_and_backward_compile_without_graph_break(backend, device):
    """mask -> index lists -> masked_mlp -> loss, and its backward, in one torch.compile graph
    (fullgraph=True raises on any graph break); the same values as eager."""
    kw = cases.mlp_inputs(3, 5, 12, 17, 0.5, device=device, seed=19, unit_scale=True, activation="gelu_tanh")
    mask = cases.random_mask(3, 17, 0.5, torch.Generator().manual_seed(20)).to(device)

    def loss_fn(x, w_up, w_down_t, b_up, unit_scale, mask):
        keep_idx, keep_count = ops.mask_to_index(mask, backend=backend)
        y = ops.masked_mlp(x, w_up, w_down_t, keep_idx, keep_count, b_up=b_up, activation="gelu_tanh",
                           unit_scale=unit_scale, backend=backend)
        return (y * y).mean()

    args = {k: kw[k].detach().clone().requires_grad_() for k in ("x", "w_up", "w_down_t", "b_up", "unit_scale")}
    eager = loss_fn(**args, mask=mask)
    eager_grads = torch.autograd.grad(eager, list(args.values()))
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    got = compiled(**args, mask=mask)
    got_grads = torch.autograd.grad(got, list(args.values()))
    assert torch.equal(got, eager)
    for name, a, b in zip(args, got_grads, eager_grads):
        assert torch.equal(a, b), f"d{name} differs compiled and eager"


def test_float64_runs_on_the_reference_in_float64():
    kw = cases.to_float64(cases.mlp_inputs(3, 4, 6, 7, 0.5, seed=21, unit_scale=True))
    assert ops.masked_mlp(**kw).dtype == torch.float64
    if cpp.AVAILABLE:
        with pytest.raises(ValueError, match="computes in float32 at most"):
            ops.masked_mlp(**kw, backend="cpp")


def _bad(kw, **changes):
    return {**kw, **changes}


BAD_ARGUMENTS = [  # (change to the kwargs, message)
    (lambda kw: _bad(kw, activation="silu"), r"masked_mlp: activation='silu' is not one of gelu, gelu_tanh, relu"),
    (lambda kw: _bad(kw, x=kw["x"][0, 0]), r"masked_mlp: x must be \(S, ..., d\), got \(12,\)"),
    (lambda kw: _bad(kw, x=kw["x"][..., :-1]), r"masked_mlp: x's last dim 11 != hidden size 12"),
    (lambda kw: _bad(kw, w_up=kw["w_up"][:-1]), r"masked_mlp: w_up must be \(17, 12\), got \(16, 12\)"),
    (lambda kw: _bad(kw, w_up=kw["w_up"].t()), r"masked_mlp: w_up must be \(17, 12\), got \(12, 17\)"),
    (lambda kw: _bad(kw, w_down_t=kw["w_down_t"][0]), r"masked_mlp: w_down_t must be \(m, d\), got \(12,\)"),
    (lambda kw: _bad(kw, b_up=kw["b_up"][:-1]), r"masked_mlp: b_up must be \(17,\) or None, got \(16,\)"),
    (lambda kw: _bad(kw, b_up=kw["b_up"].double()), r"masked_mlp: x, w_up, w_down_t and b_up must share a dtype"),
    (lambda kw: _bad(kw, w_down_t=kw["w_down_t"].half()), r"must share a dtype"),
    (lambda kw: _bad(kw, b_up=kw["b_up"].to("meta")), r"masked_mlp: w_up, w_down_t and b_up must be on x's device"),
    (lambda kw: _bad(kw, keep_idx=kw["keep_idx"].long()), r"masked_mlp: keep_idx and keep_count must be int32"),
    (lambda kw: _bad(kw, keep_idx=kw["keep_idx"][:, :-1]), r"masked_mlp: keep_idx must be \(S=2, n=17\)"),
    (lambda kw: _bad(kw, keep_count=kw["keep_count"][:1]), r"masked_mlp: keep_count must be \(S=2,\)"),
    (lambda kw: _bad(kw, unit_scale=torch.ones(2, 16)), r"masked_mlp: unit_scale must be a floating \(S=2, n=17\)"),
    (lambda kw: _bad(kw, unit_scale=torch.ones(2, 17, dtype=torch.int32)), r"unit_scale must be a floating"),
]


@pytest.mark.parametrize("case", range(len(BAD_ARGUMENTS)))
def test_bad_arguments_are_one_line_value_errors(case):
    change, message = BAD_ARGUMENTS[case]
    kw = change(cases.mlp_inputs(2, 5, 12, 17, 0.5))
    with pytest.raises(ValueError, match=message) as info:
        ops.masked_mlp(**kw, backend="reference")
    assert "\n" not in str(info.value)


@cases.needs_cpp
def test_cpp_op_refuses_bad_inputs_itself():
    kw = cases.mlp_inputs(2, 5, 12, 17, 0.5)
    args = [kw["x"], kw["w_up"], kw["w_down_t"], kw["keep_idx"], kw["keep_count"], kw["b_up"], None]
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.bpp.masked_mlp(*args[:3], kw["keep_idx"].long(), *args[4:], "gelu")
    bad = kw["keep_idx"].clone()
    bad[1, 0] = 17
    with pytest.raises(RuntimeError, match=r"keep_idx\[1, 0\] = 17 is outside"):
        torch.ops.bpp.masked_mlp(*args[:3], bad, *args[4:], "gelu")
    with pytest.raises(RuntimeError, match="keep_count"):
        torch.ops.bpp.masked_mlp(*args[:4], torch.tensor([3, 18], dtype=torch.int32), *args[5:], "gelu")
    with pytest.raises(RuntimeError, match="activation='swish' is not one of"):
        torch.ops.bpp.masked_mlp(*args, "swish")
    with pytest.raises(RuntimeError, match="b_up must be"):
        cpp.masked_mlp(*args[:5], b_up=kw["b_up"][:4])
    with pytest.raises(RuntimeError, match="unit_scale must be a floating"):
        cpp.masked_mlp(*args[:5], unit_scale=torch.ones(2, 16))


@pytest.mark.gpu
def test_no_host_sync():
    """Counts stay on the device: neither direction waits for the GPU."""
    kw = cases.mlp_inputs(4, 64, 64, 200, 0.5, dtype=torch.bfloat16, device="cuda", seed=22, unit_scale=True)
    x = kw.pop("x").requires_grad_()
    ops.masked_mlp(x, **kw, backend="triton").sum().backward()  # compile first: the first launch may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.masked_mlp(x, **kw, backend="triton").sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
