import os

import pytest
import torch

from bpp_kernels import ops, reference
from tests.kernels.triton_util import device_dtypes, fresh_seed, tolerance
from tests.kernels import cases

# triton takes CPU tensors only in the interpreter (conftest switches it on when there is no GPU)
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                        reason="CPU tensors need TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.gpu)]


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


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_weight_on_half_input_promotes_like_torch(device):
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(6, 40, generator=g).to(device, torch.float16)
    w = (1 + 0.2 * torch.randn(40, generator=g)).to(device)
    out = ops.rms_norm(x, w, 1e-6, backend="triton")
    ref = reference.rms_norm(x, w, 1e-6)
    assert out.dtype == ref.dtype == torch.float32
    cases.assert_close("rms_norm fp32 weight", ref, out, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_are_independent(device):
    g = torch.Generator().manual_seed(fresh_seed())
    x, res, w = (torch.randn(*shape, generator=g).to(device) for shape in ((9, 33), (9, 33), (33,)))
    normed, summed = ops.add_rms_norm(x, res, w, 1e-6, backend="triton")
    normed2, summed2 = ops.add_rms_norm(x[2:3], res[2:3], w, 1e-6, backend="triton")
    assert torch.equal(normed2[0], normed[2]) and torch.equal(summed2[0], summed[2])
