"""layer_norm on every backend against the reference and torch.nn.functional.layer_norm: forward,
gradients of x, weight and bias (with and without bias), rows independent of their batch, an
empty input, torch.compile, input errors."""
import pytest
import torch
import torch.nn.functional as F

from bpp_kernels import cpp, ops, reference
from tests.kernels import cases

WRT = ["x", "weight", "bias"]
SHAPES = [pytest.param((3, 5, 60), id="3x5x60"), pytest.param((7, 13), id="7x13"),
          pytest.param((2, 1, 1, 576), id="1-row-576"), pytest.param((37, 40), id="37-rows-3-blocks"),
          pytest.param((70, 3), id="70-rows-d3")]


@pytest.mark.parametrize("backend,device,dtype", cases.targets())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape, bias, backend, device, dtype):
    kw = cases.layer_norm_inputs(shape, dtype, device, seed=51, bias=bias)
    ref, tol = cases.tolerance(reference.layer_norm, kw, dtype)
    out = ops.layer_norm(**kw, backend=backend)
    assert out.dtype == dtype and out.shape == shape
    cases.assert_close(f"{backend} layer_norm", ref, out, tol)


@pytest.mark.parametrize("backend,device,dtype", cases.targets())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_reference(shape, bias, backend, device, dtype):
    kw = cases.layer_norm_inputs(shape, dtype, device, seed=52, bias=bias)
    grads = cases.assert_grads_match(f"{backend} layer_norm", "layer_norm", kw, WRT, backend, dtype)
    assert ("bias" in grads) == bias


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu"),
                                            pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_equals_torch_layer_norm(backend, device):
    """Forward and all three gradients against torch.nn.functional.layer_norm (fp32)."""
    kw = cases.layer_norm_inputs((4, 9, 48), device=device, seed=53)
    x, w, b = (kw[k].clone().requires_grad_() for k in WRT)
    xt, wt, bt = (kw[k].clone().requires_grad_() for k in WRT)
    out = ops.layer_norm(x, w, b, 1e-5, backend=backend)
    want = F.layer_norm(xt, (48,), wt, bt, 1e-5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(54)).to(device)
    for got, expected in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(want, (xt, wt, bt), g)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device,dtype", cases.targets(reference_backend=True))
def test_rows_are_independent(backend, device, dtype):
    """A row's output is the same bits alone and among 9 rows."""
    kw = cases.layer_norm_inputs((9, 33), dtype, device, seed=55)
    together = ops.layer_norm(**kw, backend=backend)
    for j in range(9):
        alone = ops.layer_norm(kw["x"][j:j + 1], kw["weight"], kw["bias"], kw["eps"], backend=backend)
        assert torch.equal(alone[0], together[j]), f"row {j} differs alone and among 9"


@pytest.mark.parametrize("backend", [pytest.param("reference"), pytest.param("cpp", marks=cases.needs_cpp),
                                     pytest.param("triton", marks=cases.needs_interpreter)])
def test_no_rows_gives_zero_weight_gradients(backend):
    kw = cases.layer_norm_inputs((0, 16), seed=56)
    leaves = {k: kw[k].clone().requires_grad_() for k in WRT}
    out = ops.layer_norm(**{**kw, **leaves}, backend=backend)
    assert out.shape == (0, 16)
    (out.sum() + 1).backward()
    for k in ("weight", "bias"):
        assert leaves[k].grad is not None and torch.equal(leaves[k].grad, torch.zeros(16)), k


@cases.needs_cpp
def test_cpp_weight_gradient_does_not_depend_on_the_thread_count():
    kw = cases.layer_norm_inputs((300, 64), seed=57)
    threads = torch.get_num_threads()
    try:
        grads = []
        for n in (1, 2):
            torch.set_num_threads(n)
            grads.append(cases.forward_backward(lambda **k: ops.layer_norm(**k, backend="cpp"), kw, WRT)[1])
    finally:
        torch.set_num_threads(threads)
    for k in WRT:
        assert torch.equal(grads[0][k], grads[1][k]), k


@pytest.mark.parametrize("backend,device", [pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_forward_and_backward_compile_without_graph_break(backend, device):
    kw = cases.layer_norm_inputs((3, 5, 24), device=device, seed=58)

    def loss_fn(x, weight, bias):
        y = ops.layer_norm(x, weight, bias, 1e-5, backend=backend)
        return (ops.layer_norm(y, weight, None, 1e-5, backend=backend) * y).mean()

    args = [kw[k].clone().requires_grad_() for k in WRT]
    eager = loss_fn(*args)
    eager_grads = torch.autograd.grad(eager, args)
    got = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(*args)
    got_grads = torch.autograd.grad(got, args)
    assert torch.equal(got, eager)
    for a, b in zip(got_grads, eager_grads):
        assert torch.equal(a, b)


def test_float64_runs_on_the_reference_in_float64():
    kw = cases.to_float64(cases.layer_norm_inputs((3, 8), seed=59))
    assert ops.layer_norm(**kw).dtype == torch.float64
    if cpp.AVAILABLE:
        with pytest.raises(ValueError, match="computes in float32 at most"):
            ops.layer_norm(**kw, backend="cpp")


BAD_ARGUMENTS = [  # (change to the kwargs, message)
    (lambda kw: {**kw, "weight": kw["weight"][:-1]}, r"layer_norm: weight must be \(16,\), got \(15,\)"),
    (lambda kw: {**kw, "bias": kw["bias"][None]}, r"layer_norm: bias must be \(16,\) or None, got \(1, 16\)"),
    (lambda kw: {**kw, "weight": kw["weight"].half()}, r"layer_norm: weight and bias must be in x's dtype"),
    (lambda kw: {**kw, "bias": kw["bias"].double()}, r"layer_norm: weight and bias must be in x's dtype"),
    (lambda kw: {**kw, "x": kw["x"].int()}, r"layer_norm: x must be floating"),
    (lambda kw: {**kw, "bias": kw["bias"].to("meta")}, r"layer_norm: weight and bias must be on x's device"),
    (lambda kw: {**kw, "eps": -1.0}, r"layer_norm: eps must be >= 0"),
    (lambda kw: {**kw, "x": kw["x"][0, 0, 0]}, r"layer_norm: x must be \(\.\.\., d\)"),
]


@pytest.mark.parametrize("case", range(len(BAD_ARGUMENTS)))
def test_bad_arguments_are_one_line_value_errors(case):
    change, message = BAD_ARGUMENTS[case]
    kw = change(cases.layer_norm_inputs((2, 3, 16)))
    with pytest.raises(ValueError, match=message) as info:
        ops.layer_norm(**kw, backend="reference")
    assert "\n" not in str(info.value)


@cases.needs_cpp
def test_cpp_op_refuses_bad_inputs_itself():
    kw = cases.layer_norm_inputs((2, 3, 16))
    with pytest.raises(RuntimeError, match="layer_norm: weight must be"):
        torch.ops.bpp.layer_norm(kw["x"], kw["weight"][:3], kw["bias"], 1e-5)
    with pytest.raises(RuntimeError, match="must share a dtype"):
        torch.ops.bpp.layer_norm(kw["x"], kw["weight"].double(), kw["bias"], 1e-5)
