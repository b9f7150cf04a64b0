"""rms_norm and add_rms_norm on every backend that has them (Triton; the CPU path is the
reference's autograd) against the reference: forward, gradients of x, residual and weight, dtype
promotion, row independence, torch.compile."""
import pytest
import torch

from bpp_kernels import ops, reference
from tests.kernels import cases

SHAPES = [pytest.param((3, 5, 60), id="3x5x60"), pytest.param((7, 13), id="7x13"),
          pytest.param((2, 1, 1, 576), id="1-row-576"), pytest.param((37, 40), id="37-rows-3-blocks")]


def _add_rms_norm_sum(x, residual, weight, eps, backend=None):
    """One output from both of add_rms_norm's, so one upstream gradient reaches both."""
    normed, summed = ops.add_rms_norm(x, residual, weight, eps, backend=backend)
    return normed + 0.5 * summed


def _add_rms_norm_sum_reference(x, residual, weight, eps):
    normed, summed = reference.add_rms_norm(x, residual, weight, eps)
    return normed + 0.5 * summed


@pytest.mark.parametrize("backend,device,dtype", cases.targets(cpp_backend=False))
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_and_add_rms_norm(shape, backend, device, dtype):
    x, res, w = cases.norm_inputs(shape, dtype, device, seed=41)
    ref, tol = cases.tolerance(reference.rms_norm, dict(x=x, weight=w, eps=1e-5), dtype)
    cases.assert_close("rms_norm", ref, ops.rms_norm(x, w, 1e-5, backend=backend), tol)
    normed, summed = ops.add_rms_norm(x, res, w, 1e-5, backend=backend)
    assert torch.equal(summed, x + res)
    ref2, tol2 = cases.tolerance(reference.rms_norm, dict(x=x + res, weight=w, eps=1e-5), dtype)
    cases.assert_close("add_rms_norm", ref2, normed, tol2)


@pytest.mark.parametrize("backend,device,dtype", cases.targets(cpp_backend=False))
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_reference(shape, backend, device, dtype):
    x, res, w = cases.norm_inputs(shape, dtype, device, seed=42)
    kw = dict(x=x, weight=w, eps=1e-5)
    ref_out, ref_grads, tols = cases.grad_tolerances(reference.rms_norm, kw, ["x", "weight"], dtype)
    out, grads = cases.forward_backward(lambda **k: ops.rms_norm(**k, backend=backend), kw, ["x", "weight"])
    cases.assert_close("rms_norm", ref_out, out, tols["out"])
    for k in grads:
        cases.assert_close(f"rms_norm d{k}", ref_grads[k], grads[k], tols[k])
    kw = dict(x=x, residual=res, weight=w, eps=1e-5)
    wrt = ["x", "residual", "weight"]
    ref_out, ref_grads, tols = cases.grad_tolerances(_add_rms_norm_sum_reference, kw, wrt, dtype)
    out, grads = cases.forward_backward(lambda **k: _add_rms_norm_sum(**k, backend=backend), kw, wrt)
    cases.assert_close("add_rms_norm", ref_out, out, tols["out"])
    for k in wrt:
        assert grads[k].dtype == kw[k].dtype
        cases.assert_close(f"add_rms_norm d{k}", ref_grads[k], grads[k], tols[k])


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=cases.needs_interpreter),
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp32_weight_on_half_input_promotes_like_torch(device):
    x, _, w = cases.norm_inputs((6, 40), torch.float16, device, seed=43)
    w = w.float().requires_grad_()
    x = x.requires_grad_()
    out = ops.rms_norm(x, w, 1e-6, backend="triton")
    ref = reference.rms_norm(x, w, 1e-6)
    assert out.dtype == ref.dtype == torch.float32
    cases.assert_close("rms_norm fp32 weight", ref, out, 1e-6)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(44)).to(device)
    dx, dw = torch.autograd.grad(out, (x, w), g)
    rdx, rdw = torch.autograd.grad(ref, (x, w), g)
    assert dx.dtype == torch.float16 and dw.dtype == torch.float32
    cases.assert_close("rms_norm fp32 weight dx", rdx, dx, 2e-3)
    cases.assert_close("rms_norm fp32 weight dw", rdw, dw, 1e-5)


@pytest.mark.parametrize("backend,device,dtype", cases.targets(cpp_backend=False, reference_backend=True,
                                                               dtypes=(torch.float32,)))
def test_rows_are_independent(backend, device, dtype):
    x, res, w = cases.norm_inputs((9, 33), dtype, device, seed=45)
    normed, summed = ops.add_rms_norm(x, res, w, 1e-6, backend=backend)
    normed2, summed2 = ops.add_rms_norm(x[2:3], res[2:3], w, 1e-6, backend=backend)
    assert torch.equal(normed2[0], normed[2]) and torch.equal(summed2[0], summed[2])


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu"),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_forward_and_backward_compile_without_graph_break(backend, device):
    x, res, w = cases.norm_inputs((3, 5, 24), torch.float32, device, seed=46)

    def loss_fn(x, res, w):
        y, h = ops.add_rms_norm(x, res, w, 1e-6, backend=backend)
        return (ops.rms_norm(h, w, 1e-6, backend=backend) * y).mean()

    args = [t.clone().requires_grad_() for t in (x, res, w)]
    eager = loss_fn(*args)
    eager_grads = torch.autograd.grad(eager, args)
    got = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(*args)
    got_grads = torch.autograd.grad(got, args)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    for a, b in zip(got_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
