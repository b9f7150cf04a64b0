"""Dtype corners of the masked ops on every backend: float64 is computed in float64 (the
reference; naming another backend is an error), float32 RoPE tables work with fp16/bf16 inputs
and give what tables in x's dtype give, and a batch that keeps no unit has zero gradients, never
None or an output without a graph."""
import pytest
import torch

from bpp_kernels import ops
from tests.kernels import cases

BACKENDS = [pytest.param("reference", id="reference"), pytest.param("cpp", id="cpp", marks=cases.needs_cpp),
            pytest.param("triton", id="triton-cpu", marks=cases.needs_interpreter)]


def test_float64_is_computed_in_float64_and_passes_gradcheck():
    att = cases.to_float64(cases.attention_inputs(3, 1, 5, 8, 3, 2, 4, 0.6, seed=2, unit_scale=True))
    att["unit_scale"] = att["unit_scale"].double()
    x = att.pop("x").requires_grad_()
    w = att.pop("w_o_t").requires_grad_()
    f = lambda x, w: ops.masked_attention(x, att["w_qkv"], w, **{k: v for k, v in att.items() if k != "w_qkv"})  # noqa: E731
    assert f(x, w).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (x, w))
    mlp = cases.to_float64(cases.swiglu_inputs(3, 4, 6, 7, 0.5, seed=3))
    x = mlp.pop("x").requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.masked_swiglu(x, **mlp), (x,))


@cases.needs_cpp
def test_float64_on_a_float32_backend_is_refused():
    kw = cases.to_float64(cases.swiglu_inputs(2, 3, 6, 7, 0.5))
    with pytest.raises(ValueError, match="computes in float32 at most"):
        ops.masked_swiglu(**kw, backend="cpp")
    att = cases.to_float64(cases.attention_inputs(2, 1, 4, 8, 2, 2, 4, 0.5))
    with pytest.raises(ValueError, match="float64 inputs run on backend='reference'"):
        ops.masked_attention(**att, backend="cpp")


# every backend with fp16; bf16 where it is right (the Triton interpreter gets bf16 wrong: cases.py)
HALF_CASES = [pytest.param(b.values[0], dt, id=f"{b.id}-{name}", marks=b.marks) for b in BACKENDS
              for dt, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"))
              if not (b.values[0] == "triton" and dt == torch.bfloat16)]


@pytest.mark.parametrize("backend, dtype", HALF_CASES)
def test_float32_rope_tables_with_half_inputs(backend, dtype):
    kw = cases.attention_inputs(3, 2, 6, 16, 2, 2, 8, 0.5, dtype=dtype, seed=4)
    same = ops.masked_attention(**kw, backend=backend)
    wide = ops.masked_attention(**{**kw, "cos": kw["cos"].float(), "sin": kw["sin"].float()}, backend=backend)
    assert wide.dtype == dtype
    cos32, _ = cases.rope(6, 8)
    assert torch.equal(cos32.to(dtype), kw["cos"])  # the tables differ only by their dtype
    assert torch.equal(wide, same)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_that_keeps_nothing_has_zero_gradients(backend):
    mlp = cases.swiglu_inputs(2, 3, 8, 9, 0.0, seed=5)
    att = cases.attention_inputs(2, 1, 4, 8, 2, 2, 4, 0.0, seed=6)
    plain = cases.mlp_inputs(2, 3, 8, 9, 0.0, seed=7)
    for op, kw, names in ((ops.masked_swiglu, mlp, ("x", "w_gate_up", "w_down_t")),
                          (ops.masked_attention, att, ("x", "w_qkv", "w_o_t")),
                          (ops.masked_mlp, plain, ("x", "w_up", "w_down_t", "b_up"))):
        assert int(kw["keep_count"].sum()) == 0
        leaves = {n: kw[n].clone().requires_grad_() for n in names}
        out = op(**{**kw, **leaves}, backend=backend)
        assert out.grad_fn is not None and torch.equal(out, torch.zeros_like(out))
        (out * torch.randn_like(out) + 1).sum().backward()
        for n, t in leaves.items():
            assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t)), n
