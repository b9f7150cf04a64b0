"""C++ linear_cross_entropy (bpp_kernels._C) against the reference: row counts and vocabularies
that do not fill its 128-row x 1024-word tiles, ignored rows, fp32/bf16/fp16, both GEMM paths
(oneDNN and ATen's mm), row independence, torch.compile tracing, input errors."""
import pytest
import torch
import torch.nn.functional as F

from bpp_kernels import cpp, ops, reference
from tests.kernels import cases
from tests.kernels.triton_util import fresh_seed, tolerance

pytestmark = pytest.mark.skipif(not cpp.AVAILABLE, reason="bpp_kernels._C not built")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
GEMMS = cases.CPU_GEMMS


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,V", [(17, 12, 50), (130, 24, 1025), (5, 40, 2500), (257, 8, 1024)],
                         ids=["N17-V50", "N130-V1025-two-tiles", "N5-V2500", "N257-V1024-exact-vocab"])
def test_matches_reference(N, d, V, dtype, gemm, monkeypatch):
    monkeypatch.setenv("BPP_CPU_GEMM", gemm)
    kw = cases.cross_entropy_inputs(N, d, V, dtype=dtype, seed=fresh_seed(), n_ignored=2)
    ref, tol = tolerance(reference.linear_cross_entropy, kw, dtype)
    out = ops.linear_cross_entropy(**kw, backend="cpp")
    assert out.dtype == torch.float32 and out.shape == (N,)
    cases.assert_close("cpp linear_cross_entropy", ref, out, tol)
    assert (out[kw["target"] == -100] == 0).all(), "ignored rows must give 0"
    assert (out[kw["target"] != -100] > 0).all()


def test_matches_torch_cross_entropy():
    kw = cases.cross_entropy_inputs(140, 24, 1100, seed=fresh_seed())
    out = ops.linear_cross_entropy(**kw, backend="cpp")
    want = F.cross_entropy(kw["h"] @ kw["weight"].t(), kw["target"], reduction="none")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_large_logits_do_not_overflow():
    kw = cases.cross_entropy_inputs(9, 16, 2100, seed=fresh_seed())
    kw["h"] = kw["h"] * 300.0  # logits in the thousands: exp() of them overflows fp32
    out = ops.linear_cross_entropy(**kw, backend="cpp")
    want = F.cross_entropy((kw["h"] @ kw["weight"].t()).double(), kw["target"], reduction="none").float()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-2)


def test_custom_ignore_index_and_all_ignored_and_empty():
    kw = cases.cross_entropy_inputs(11, 8, 30, seed=fresh_seed())
    kw["target"][::3] = 7
    out = ops.linear_cross_entropy(**kw, ignore_index=7, backend="cpp")
    cases.assert_close("ignore_index=7", reference.linear_cross_entropy(**kw, ignore_index=7), out, 1e-5)
    assert (out[::3] == 0).all()
    kw["target"][:] = -100
    assert torch.equal(ops.linear_cross_entropy(**kw, backend="cpp"), torch.zeros(11))
    empty = ops.linear_cross_entropy(kw["h"][:0], kw["weight"], kw["target"][:0], backend="cpp")
    assert empty.shape == (0,) and empty.dtype == torch.float32


@pytest.mark.parametrize("gemm", GEMMS)
def test_rows_are_independent(gemm, monkeypatch):
    """A row's loss is the same bits whatever rows share the call (the engine's batch invariance)."""
    monkeypatch.setenv("BPP_CPU_GEMM", gemm)
    kw = cases.cross_entropy_inputs(300, 32, 1500, seed=fresh_seed())
    whole = ops.linear_cross_entropy(**kw, backend="cpp")
    for rows in (slice(0, 16), slice(120, 140), slice(250, 300)):
        part = ops.linear_cross_entropy(kw["h"][rows], kw["weight"], kw["target"][rows], backend="cpp")
        assert torch.equal(part, whole[rows]), f"rows {rows} differ alone and in the whole call"
    assert torch.equal(ops.linear_cross_entropy(**kw, backend="cpp"), whole), "two runs differ"


def test_traces_under_torch_compile():
    kw = cases.cross_entropy_inputs(6, 8, 40, seed=fresh_seed())

    def f(h, weight, target):
        return torch.ops.bpp.linear_cross_entropy(h, weight, target, -100, 4096).mean()

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(**kw), f(**kw))


def test_bad_inputs_say_what_is_wrong():
    kw = cases.cross_entropy_inputs(4, 8, 30)
    h, w, t = kw["h"], kw["weight"], kw["target"]
    bad = t.clone()
    bad[2] = 30
    with pytest.raises(RuntimeError, match=r"target\[2\] = 30 is outside \[0, V=30\)"):
        torch.ops.bpp.linear_cross_entropy(h, w, bad, -100, 4096)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.bpp.linear_cross_entropy(h, w, t.int(), -100, 4096)
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.bpp.linear_cross_entropy(h, w.double(), t, -100, 4096)
    with pytest.raises(RuntimeError, match=r"weight \(V, d\)"):
        torch.ops.bpp.linear_cross_entropy(h, w[:, :5], t, -100, 4096)
