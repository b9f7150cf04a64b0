import pytest
import torch

from bpp_kernels import ops, reference
from tests.kernels import cases
from tests.kernels.triton_util import device_dtypes, fresh_seed, tolerance

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs go through the interpreter

SHAPES = [  # S, N, d, m, keep
    pytest.param(3, 5, 12, 17, 0.5, id="S3-N5-d12-m17-keep0.5"),
    pytest.param(4, 63, 60, 70, 0.3, id="S4-N63-d60-m70-keep0.3"),
    pytest.param(2, 33, 40, 100, 0.7, id="S2-N33-d40-m100-keep0.7"),
    pytest.param(2, 7, 8, 8, 1.0, id="S2-N7-d8-m8-all-kept"),
    pytest.param(3, 9, 16, 24, 0.0, id="S3-N9-d16-m24-none-kept"),
    # GPU only: enough rows for the 128-row tiles of the GPU config, several tiles in every dim
    pytest.param(3, 300, 520, 1000, 0.6, id="S3-N300-d520-m1000-keep0.6", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("S,N,d,m,keep", SHAPES)
def test_masked_swiglu_matches_reference(S, N, d, m, keep, device, dtype):
    kw = cases.swiglu_inputs(S, N, d, m, keep, dtype=dtype, device=device, seed=fresh_seed())
    ref, tol = tolerance(reference.masked_swiglu, kw, dtype)
    out = ops.masked_swiglu(**kw, backend="triton")
    assert out.dtype == dtype
    cases.assert_close("masked_swiglu", ref, out, tol)
    empty = (kw["keep_count"] == 0).nonzero().flatten()
    assert (out[empty] == 0).all()


def test_masked_swiglu_keeps_leading_dims():
    kw = cases.swiglu_inputs(2, 12, 16, 20, 0.5, device=DEVICE, seed=fresh_seed())
    kw["x"] = kw["x"].view(2, 3, 4, 16)
    out = ops.masked_swiglu(**kw, backend="triton")
    cases.assert_close("masked_swiglu 4-D", reference.masked_swiglu(**kw), out, 1e-5)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_pruned_channels_are_never_read(device, dtype):
    """NaN in the weights of channels that no sample keeps must not reach the output."""
    kw = cases.swiglu_inputs(3, 21, 40, 90, 0.4, dtype=dtype, device=device, seed=fresh_seed())
    kw["keep_count"][1] = 60  # no sample keeps everything, so some channels are pruned everywhere
    kept_anywhere = torch.zeros(90, dtype=torch.bool, device=device)
    for s in range(3):
        kept_anywhere[kw["keep_idx"][s, :kw["keep_count"][s]].long()] = True
    assert not kept_anywhere.all()
    ref, tol = tolerance(reference.masked_swiglu, kw, dtype)
    kw["w_gate_up"][~kept_anywhere] = float("nan")
    kw["w_down_t"][~kept_anywhere] = float("nan")
    out = ops.masked_swiglu(**kw, backend="triton")
    assert torch.isfinite(out).all()
    cases.assert_close("masked_swiglu", ref, out, tol)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_batch_invariance(device, dtype):
    kw = cases.swiglu_inputs(8, 37, 24, 50, 0.5, dtype=dtype, device=device, seed=fresh_seed())
    together = ops.masked_swiglu(**kw, backend="triton")
    for j in (0, 3, 7):
        alone = ops.masked_swiglu(kw["x"][j:j + 1], kw["w_gate_up"], kw["w_down_t"], kw["keep_idx"][j:j + 1],
                                  kw["keep_count"][j:j + 1], backend="triton")
        assert torch.equal(alone[0], together[j])


@pytest.mark.gpu
def test_no_host_sync():
    """Counts stay on the device: the op must not wait for the GPU (DESIGN: one sync per PG step)."""
    kw = cases.swiglu_inputs(4, 64, 64, 200, 0.5, dtype=torch.bfloat16, device="cuda", seed=fresh_seed())
    ops.masked_swiglu(**kw, backend="triton")  # compile first: the first launch may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.masked_swiglu(**kw, backend="triton")
        ops.mask_to_index(torch.rand(4, 200, device="cuda") < 0.5, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
