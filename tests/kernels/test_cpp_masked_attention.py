"""C++ masked_attention (bpp_kernels._C) against the reference: plain, q/k/v bias, q/k norm,
MHA and GQA, ragged/empty/full group masks, odd sizes, fp32/bf16/fp16, batch invariance."""
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
        return reference.masked_attention(**kw), 1e-5
    return cases.low_precision_tolerance(reference.masked_attention, kw, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,qk_norm", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain", "qkv-bias", "qk-norm", "bias-and-norm"])
@pytest.mark.parametrize("S,B,T,d,G,r,hd,keep", [(3, 2, 7, 24, 3, 2, 8, 0.5), (2, 1, 63, 20, 2, 3, 10, 0.6),
                                                  (4, 2, 5, 24, 4, 1, 6, 1.0), (2, 2, 9, 16, 2, 2, 8, 0.0)],
                         ids=["G3-r2", "T63-d20-hd10", "MHA-all-kept", "none-kept"])
def test_matches_reference(S, B, T, d, G, r, hd, keep, bias, qk_norm, dtype):
    kw = cases.attention_inputs(S, B, T, d, G, r, hd, keep, dtype=dtype, seed=fresh_seed(), bias=bias,
                                qk_norm=qk_norm)
    ref, tol = _reference(kw, dtype)
    out = ops.masked_attention(**kw, backend="cpp")
    assert out.dtype == dtype
    cases.assert_close("cpp masked_attention", ref, out, tol)
    empty = kw["keep_count"] == 0
    assert (out[empty] == 0).all(), "a sample keeping no group must give zeros"


def test_explicit_scale():
    kw = cases.attention_inputs(3, 2, 11, 24, 3, 2, 8, 0.6, seed=fresh_seed())
    cases.assert_close("cpp masked_attention scale=0.3", reference.masked_attention(**kw, scale=0.3),
                       ops.masked_attention(**kw, scale=0.3, backend="cpp"), 1e-5)


@pytest.mark.parametrize("gemm", cases.CPU_GEMMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batch_invariance(dtype, gemm, monkeypatch):
    monkeypatch.setenv("BPP_CPU_GEMM", gemm)
    kw = cases.attention_inputs(8, 2, 11, 24, 3, 2, 8, 0.6, dtype=dtype, seed=fresh_seed(), bias=True,
                                qk_norm=True)
    together = ops.masked_attention(**kw, backend="cpp")
    for j in range(8):
        one = {k: (v[j:j + 1] if k in ("x", "keep_idx", "keep_count") else v) for k, v in kw.items()}
        assert torch.equal(ops.masked_attention(**one, backend="cpp")[0], together[j]), \
            f"sample {j} differs alone and in a batch of 8"


def test_traces_under_torch_compile():
    kw = cases.attention_inputs(2, 1, 5, 16, 2, 2, 8, 0.5, seed=fresh_seed(), bias=True)
    compiled = torch.compile(lambda **k: ops.masked_attention(**k, backend="cpp") + 1, backend="eager",
                             fullgraph=True)
    assert torch.equal(compiled(**kw), ops.masked_attention(**kw, backend="cpp") + 1)


def test_bad_inputs_say_what_is_wrong():
    kw = cases.attention_inputs(2, 1, 5, 16, 2, 2, 8, 0.5)
    bad = kw["keep_idx"].clone()
    bad[1, 0] = 5
    with pytest.raises(RuntimeError, match=r"keep_idx\[1, 0\] = 5 is outside"):
        cpp.masked_attention(**{**kw, "keep_idx": bad})
    with pytest.raises(RuntimeError, match="must be even"):
        cpp.masked_attention(**{**kw, "cos": kw["cos"][:, :7], "sin": kw["sin"][:, :7]})


@pytest.mark.parametrize("gemm", cases.CPU_GEMMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_both_gemm_libraries_match_reference(dtype, gemm, monkeypatch):
    monkeypatch.setenv("BPP_CPU_GEMM", gemm)
    kw = cases.attention_inputs(4, 2, 13, 24, 3, 2, 8, 0.6, dtype=dtype, seed=fresh_seed(), bias=True,
                                qk_norm=True)
    ref, tol = _reference(kw, dtype)
    cases.assert_close(f"cpp masked_attention ({gemm})", ref, ops.masked_attention(**kw, backend="cpp"), tol)
