import pytest
import torch

from bpp_kernels import ops, reference
from tests.kernels.triton_util import device_dtypes, fresh_seed, tolerance
from tests.kernels import cases


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("shape", [(3, 5, 60), (7, 13), (2, 1, 1, 576)], ids=["3x5x60", "7x13", "1-row-576"])
def test_rms_norm_and_add_rms_norm(shape, device, dtype):
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(*shape, generator=g).to(device, dtype)
    res = torch.randn(*shape, generator=g).to(device, dtype)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(device, dtype)
    ref, tol = tolerance(reference.rms_norm, dict(x=x, weight=w, eps=1e-5), dtype)
    cases.assert_close("rms_norm", ref, ops.rms_norm(x, w, 1e-5, backend="triton"), tol)
    normed, summed = ops.add_rms_norm(x, res, w, 1e-5, backend="triton")
    assert torch.equal(summed, x + res)
    ref2, tol2 = tolerance(reference.rms_norm, dict(x=x + res, weight=w, eps=1e-5), dtype)
    cases.assert_close("add_rms_norm", ref2, normed, tol2)
