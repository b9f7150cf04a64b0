"""linear_cross_entropy on every backend against the reference: row counts and vocabularies that
do not fill the C++ 128-row x 1024-word tiles or the interpreter's 128-word Triton slices, ignored
rows, fp32/bf16/fp16 (both GEMM libraries for C++), gradients of h and weight (Triton's backward
over several row chunks), row independence, overflow, torch.compile, input errors."""
import pytest
import torch
import torch.nn.functional as F

from bpp_kernels import ops, reference
from tests.kernels import cases

WRT = ["h", "weight"]
SHAPES = [  # N, d, V
    pytest.param(17, 12, 50, id="N17-V50"),
    pytest.param(33, 60, 301, id="N33-V301"),
    pytest.param(5, 40, 1000, id="N5-V1000"),
    pytest.param(130, 24, 1025, id="N130-V1025-two-tiles"),
    pytest.param(5, 40, 2500, id="N5-V2500"),
    pytest.param(257, 8, 1024, id="N257-V1024-exact-vocab"),
    pytest.param(300, 264, 9000, id="N300-d264-V9000-three-slices", marks=pytest.mark.gpu),
]
# the interpreter's Triton slices are 128 words: these three cross them at a fraction of the cost
INTERPRETER_SHAPES = {"N17-V50", "N33-V301", "N5-V1000", "N17-V50-chunk4096", "N33-V301-chunks-of-8",
                      "N1-V2100"}


def _cheap_enough(case, target) -> bool:
    return not cases.interpreted(target) or case.id in INTERPRETER_SHAPES


@pytest.mark.parametrize("N,d,V,backend,device,dtype", cases.cross(SHAPES, cases.targets(), _cheap_enough))
def test_forward_matches_reference(N, d, V, backend, device, dtype, monkeypatch):
    kw = cases.cross_entropy_inputs(N, d, V, dtype=dtype, device=device, seed=31, n_ignored=2)
    ref, tol = cases.tolerance(reference.linear_cross_entropy, kw, dtype)
    for gemm in (("onednn", "aten") if backend == "cpp" else ("auto",)):
        monkeypatch.setenv("BPP_CPU_GEMM", gemm)
        out = ops.linear_cross_entropy(**kw, backend=backend)
        assert out.dtype == torch.float32 and out.shape == (N,)
        cases.assert_close(f"{backend} linear_cross_entropy ({gemm})", ref, out, tol)
        assert (out[kw["target"] == -100] == 0).all(), "ignored rows must give 0"
        assert (out[kw["target"] != -100] > 0).all()


GRAD_SHAPES = [  # N, d, V, chunk_size (Triton's backward chunk)
    pytest.param(17, 12, 50, 4096, id="N17-V50-chunk4096"),
    pytest.param(33, 20, 301, 8, id="N33-V301-chunks-of-8"),
    pytest.param(130, 24, 1025, 64, id="N130-V1025-two-tiles"),
    pytest.param(1, 16, 2100, 4096, id="N1-V2100"),
    pytest.param(300, 264, 9000, 128, id="N300-d264-V9000", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("N,d,V,chunk,backend,device,dtype", cases.cross(GRAD_SHAPES, cases.targets(), _cheap_enough))
def test_gradients_match_reference(N, d, V, chunk, backend, device, dtype):
    kw = cases.cross_entropy_inputs(N, d, V, dtype=dtype, device=device, seed=32, n_ignored=min(2, N - 1))
    kw["chunk_size"] = chunk
    grads = cases.assert_grads_match(f"{backend} linear_cross_entropy", "linear_cross_entropy", kw, WRT, backend,
                                     dtype)
    assert (grads["h"][kw["target"] == -100] == 0).all(), "ignored rows get no gradient"


@pytest.mark.parametrize("backend,device", [pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_matches_torch_cross_entropy(backend, device):
    kw = cases.cross_entropy_inputs(140, 24, 1100, device=device, seed=33)
    h = kw["h"].clone().requires_grad_()
    out = ops.linear_cross_entropy(h, kw["weight"], kw["target"], backend=backend)
    want = F.cross_entropy(kw["h"] @ kw["weight"].t(), kw["target"], reduction="none")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    h_ref = kw["h"].clone().requires_grad_()
    F.cross_entropy(h_ref @ kw["weight"].t(), kw["target"]).backward()
    out.mean().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend,device", [pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_large_logits_do_not_overflow(backend, device):
    kw = cases.cross_entropy_inputs(9, 16, 2100, device=device, seed=34)
    kw["h"] = kw["h"] * 300.0  # logits in the thousands: exp() of them overflows fp32
    h = kw["h"].clone().requires_grad_()
    out = ops.linear_cross_entropy(h, kw["weight"], kw["target"], backend=backend)
    h64 = kw["h"].double().requires_grad_()
    want = F.cross_entropy(h64 @ kw["weight"].double().t(), kw["target"], reduction="none")
    torch.testing.assert_close(out, want.float(), rtol=1e-4, atol=1e-2)
    out.sum().backward()
    want.sum().backward()
    assert torch.isfinite(h.grad).all()
    torch.testing.assert_close(h.grad, h64.grad.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu"),
                                            pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_custom_ignore_index_and_all_ignored_and_empty(backend, device):
    kw = cases.cross_entropy_inputs(11, 8, 30, device=device, seed=35)
    kw["target"][::3] = 7
    out = ops.linear_cross_entropy(**kw, ignore_index=7, backend=backend)
    cases.assert_close("ignore_index=7", reference.linear_cross_entropy(**kw, ignore_index=7), out, 1e-5)
    assert (out[::3] == 0).all()
    kw["target"][:] = -100
    h = kw["h"].clone().requires_grad_()
    out = ops.linear_cross_entropy(h, kw["weight"], kw["target"], backend=backend)
    assert torch.equal(out, torch.zeros(11, device=device))
    out.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)), "all rows ignored: no gradient"
    empty = ops.linear_cross_entropy(kw["h"][:0], kw["weight"], kw["target"][:0], backend=backend)
    assert empty.shape == (0,) and empty.dtype == torch.float32


@pytest.mark.parametrize("backend,device,dtype", cases.targets(reference_backend=True))
def test_rows_are_independent(backend, device, dtype, monkeypatch):
    """A row's loss is the same bits whatever rows share the call (the engine's batch invariance)."""
    small = backend == "triton" and device == "cpu"  # the interpreter: fewer rows and words, same checks
    N, d, V = (40, 16, 120) if small else (300, 32, 1500)
    kw = cases.cross_entropy_inputs(N, d, V, dtype=dtype, device=device, seed=36)
    for gemm in (("onednn", "aten") if backend == "cpp" else ("auto",)):
        monkeypatch.setenv("BPP_CPU_GEMM", gemm)
        whole = ops.linear_cross_entropy(**kw, backend=backend)
        # the interpreter's tl.dot is NumPy's matmul, whose bits for a row can depend on the other rows of
        # its 16-row tile on some CPUs (AVX2 BLAS): there the rows checked are whole tiles and the last
        # partial one; compiled (GPU, C++) any rows
        for rows in ((slice(0, 16), slice(16, 32), slice(32, 40)) if small else
                     (slice(0, 16), slice(120, 140), slice(250, 300))):
            part = ops.linear_cross_entropy(kw["h"][rows], kw["weight"], kw["target"][rows], backend=backend)
            assert torch.equal(part, whole[rows]), f"rows {rows} differ alone and in the whole call ({gemm})"
        assert torch.equal(ops.linear_cross_entropy(**kw, backend=backend), whole), "two runs differ"


@pytest.mark.parametrize("backend,device", [pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_forward_and_backward_compile_without_graph_break(backend, device):
    kw = cases.cross_entropy_inputs(6, 8, 40, device=device, seed=37, n_ignored=1)

    def loss_fn(h, weight, target):
        return ops.linear_cross_entropy(h, weight, target, backend=backend).mean()

    args = [kw["h"].clone().requires_grad_(), kw["weight"].clone().requires_grad_()]
    eager = loss_fn(*args, kw["target"])
    eager_grads = torch.autograd.grad(eager, args)
    got = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(*args, kw["target"])
    got_grads = torch.autograd.grad(got, args)
    assert torch.equal(got, eager)
    for a, b in zip(got_grads, eager_grads):
        assert torch.equal(a, b)


@cases.needs_cpp
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
    with pytest.raises(ValueError, match="target must be int64"):
        ops.linear_cross_entropy(h, w, t.int())
