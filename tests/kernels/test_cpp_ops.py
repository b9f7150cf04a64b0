"""The C++ CPU ops (bpp_kernels._C) against the reference, and traceable by torch.compile."""
import pytest
import torch

from bpp_kernels import cpp, ops, reference
from tests.kernels import cases
from tests.kernels.triton_util import fresh_seed

pytestmark = pytest.mark.skipif(not cpp.AVAILABLE, reason="bpp_kernels._C not built")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]


def _tolerance(fn, kw, dtype):
    if dtype == torch.float32:
        return fn(**kw), 1e-5
    return cases.low_precision_tolerance(fn, kw, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,N,d,m,keep", [(3, 5, 12, 17, 0.5), (4, 63, 60, 70, 0.3), (2, 7, 8, 8, 1.0),
                                          (3, 9, 16, 24, 0.0)],
                         ids=["S3-N5-m17", "S4-N63-d60-m70", "all-kept", "none-kept"])
def test_masked_swiglu(S, N, d, m, keep, dtype):
    kw = cases.swiglu_inputs(S, N, d, m, keep, dtype=dtype, seed=fresh_seed())
    ref, tol = _tolerance(reference.masked_swiglu, kw, dtype)
    out = ops.masked_swiglu(**kw, backend="cpp")
    cases.assert_close("cpp masked_swiglu", ref, out, tol)
    if dtype == torch.float32:  # the same GEMMs and epilogue as the reference: bit for bit
        assert torch.equal(out, reference.masked_swiglu(**kw))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,qk_norm", [(False, False), (True, False), (False, True)],
                         ids=["plain", "qkv-bias", "qk-norm"])
@pytest.mark.parametrize("S,B,T,d,G,r,hd,keep", [(3, 2, 7, 24, 3, 2, 8, 0.5), (2, 1, 63, 20, 2, 3, 10, 0.6),
                                                  (4, 2, 5, 24, 4, 1, 6, 1.0), (2, 2, 9, 16, 2, 2, 8, 0.0)],
                         ids=["G3-r2", "T63-hd10", "MHA-all-kept", "none-kept"])
def test_masked_attention(S, B, T, d, G, r, hd, keep, bias, qk_norm, dtype):
    kw = cases.attention_inputs(S, B, T, d, G, r, hd, keep, dtype=dtype, seed=fresh_seed(), bias=bias,
                                qk_norm=qk_norm)
    ref, tol = _tolerance(reference.masked_attention, kw, dtype)
    cases.assert_close("cpp masked_attention", ref, ops.masked_attention(**kw, backend="cpp"), tol)


def test_batch_invariance():
    kw = cases.swiglu_inputs(8, 21, 24, 40, 0.5, seed=fresh_seed())
    together = ops.masked_swiglu(**kw, backend="cpp")
    ka = cases.attention_inputs(8, 2, 11, 24, 3, 2, 8, 0.6, seed=fresh_seed(), bias=True)
    att = ops.masked_attention(**ka, backend="cpp")
    for j in (0, 2, 7):
        alone = ops.masked_swiglu(kw["x"][j:j + 1], kw["w_gate_up"], kw["w_down_t"], kw["keep_idx"][j:j + 1],
                                  kw["keep_count"][j:j + 1], backend="cpp")
        assert torch.equal(alone[0], together[j])
        one = {k: (v[j:j + 1] if k in ("x", "keep_idx", "keep_count") else v) for k, v in ka.items()}
        assert torch.equal(ops.masked_attention(**one, backend="cpp")[0], att[j])


def test_mask_to_index():
    mask = torch.rand(9, 101) < 0.3
    mask[0] = False
    mask[1] = True
    got = ops.mask_to_index(mask, backend="cpp")
    want = reference.mask_to_index(mask)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_ops_trace_under_torch_compile():
    kw = cases.swiglu_inputs(2, 5, 12, 17, 0.5, seed=fresh_seed())

    def f(x, w_gate_up, w_down_t, keep_idx, keep_count):
        idx, cnt = torch.ops.bpp.mask_to_index(keep_idx > 3)
        return torch.ops.bpp.masked_swiglu(x, w_gate_up, w_down_t, keep_idx, keep_count) * 2, idx, cnt

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    out = compiled(**kw)
    assert torch.equal(out[0], f(**kw)[0])


def test_bad_input_message():
    kw = cases.swiglu_inputs(2, 5, 12, 17, 0.5)
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.bpp.masked_swiglu(kw["x"], kw["w_gate_up"], kw["w_down_t"], kw["keep_idx"].long(),
                                    kw["keep_count"])
