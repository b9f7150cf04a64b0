"""C++ masked_swiglu (bpp_kernels._C) against the reference: ragged/empty/full masks, odd sizes,
fp32/bf16/fp16, batch invariance, torch.compile tracing, input errors."""
import pytest
import torch

from bpp_kernels import cpp, ops, reference
from tests.kernels import cases
from tests.kernels.triton_util import fresh_seed

pytestmark = pytest.mark.skipif(not cpp.AVAILABLE, reason="bpp_kernels._C not built")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]


def _reference(kw, dtype):
    if dtype == torch.float32:
        return reference.masked_swiglu(**kw), 1e-5
    return cases.low_precision_tolerance(reference.masked_swiglu, kw, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,N,d,m,keep", [(3, 5, 12, 17, 0.5), (4, 63, 60, 70, 0.3), (2, 7, 8, 8, 1.0),
                                          (3, 9, 16, 24, 0.0), (2, 130, 64, 300, 0.5)],
                         ids=["S3-N5-d12-m17", "S4-N63-d60-m70", "all-kept", "none-kept", "S2-N130-d64-m300"])
def test_matches_reference(S, N, d, m, keep, dtype):
    kw = cases.swiglu_inputs(S, N, d, m, keep, dtype=dtype, seed=fresh_seed())
    ref, tol = _reference(kw, dtype)
    out = ops.masked_swiglu(**kw, backend="cpp")
    assert out.dtype == dtype
    cases.assert_close("cpp masked_swiglu", ref, out, tol)
    empty = kw["keep_count"] == 0
    assert (out[empty] == 0).all(), "a sample keeping no channel must give zeros"


def test_extra_leading_dims():
    kw = cases.swiglu_inputs(3, 2 * 7, 12, 17, 0.5, seed=fresh_seed())
    kw["x"] = kw["x"].view(3, 2, 7, 12)
    cases.assert_close("cpp masked_swiglu (S, B, T, d)", reference.masked_swiglu(**kw),
                       ops.masked_swiglu(**kw, backend="cpp"), 1e-5)


@pytest.mark.parametrize("gemm", cases.CPU_GEMMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batch_invariance(dtype, gemm, monkeypatch):
    monkeypatch.setenv("BPP_CPU_GEMM", gemm)
    kw = cases.swiglu_inputs(8, 21, 24, 40, 0.5, dtype=dtype, seed=fresh_seed())
    together = ops.masked_swiglu(**kw, backend="cpp")
    for j in range(8):
        alone = ops.masked_swiglu(kw["x"][j:j + 1], kw["w_gate_up"], kw["w_down_t"], kw["keep_idx"][j:j + 1],
                                  kw["keep_count"][j:j + 1], backend="cpp")
        assert torch.equal(alone[0], together[j]), f"sample {j} differs alone and in a batch of 8"


def test_traces_under_torch_compile():
    kw = cases.swiglu_inputs(2, 5, 12, 17, 0.5, seed=fresh_seed())

    def f(x, w_gate_up, w_down_t, mask):
        idx, cnt = torch.ops.bpp.mask_to_index(mask)
        return torch.ops.bpp.masked_swiglu(x, w_gate_up, w_down_t, idx, cnt) * 2

    mask = torch.rand(2, 17) < 0.5
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    args = (kw["x"], kw["w_gate_up"], kw["w_down_t"], mask)
    assert torch.equal(compiled(*args), f(*args))


def test_bad_inputs_say_what_is_wrong():
    kw = cases.swiglu_inputs(2, 5, 12, 17, 0.5)
    args = [kw["x"], kw["w_gate_up"], kw["w_down_t"], kw["keep_idx"], kw["keep_count"]]
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.bpp.masked_swiglu(*args[:3], kw["keep_idx"].long(), kw["keep_count"])
    bad = kw["keep_idx"].clone()
    bad[1, 0] = 17
    with pytest.raises(RuntimeError, match=r"keep_idx\[1, 0\] = 17 is outside"):
        torch.ops.bpp.masked_swiglu(*args[:3], bad, kw["keep_count"])
    with pytest.raises(RuntimeError, match="keep_count"):
        torch.ops.bpp.masked_swiglu(*args[:4], torch.tensor([3, 18], dtype=torch.int32))


@pytest.mark.parametrize("gemm", cases.CPU_GEMMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_both_gemm_libraries_match_reference(dtype, gemm, monkeypatch):
    monkeypatch.setenv("BPP_CPU_GEMM", gemm)
    kw = cases.swiglu_inputs(4, 37, 40, 90, 0.4, dtype=dtype, seed=fresh_seed())
    ref, tol = _reference(kw, dtype)
    cases.assert_close(f"cpp masked_swiglu ({gemm})", ref, ops.masked_swiglu(**kw, backend="cpp"), tol)
