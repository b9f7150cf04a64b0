import pytest
import torch
import torch.nn.functional as F

from bpp_kernels import ops, reference
from tests.kernels import cases
from tests.kernels.triton_util import device_dtypes, fresh_seed, tolerance

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs go through the interpreter


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("N,d,V", [(17, 12, 50), (33, 60, 301), (5, 40, 1000),
                                     pytest.param(300, 264, 9000, marks=pytest.mark.gpu)],
                         ids=["N17-V50", "N33-V301", "N5-V1000", "N300-d264-V9000-three-slices"])
def test_linear_cross_entropy_matches_reference(N, d, V, device, dtype):
    kw = cases.cross_entropy_inputs(N, d, V, dtype=dtype, device=device, seed=fresh_seed(), n_ignored=2)
    ref, tol = tolerance(reference.linear_cross_entropy, kw, dtype)
    out = ops.linear_cross_entropy(**kw, backend="triton")
    assert out.dtype == torch.float32 and out.shape == (N,)
    cases.assert_close("linear_cross_entropy", ref, out, tol)
    assert (out[kw["target"] == -100] == 0).all()


def test_matches_torch_cross_entropy():
    kw = cases.cross_entropy_inputs(29, 24, 97, device=DEVICE, seed=fresh_seed())
    out = ops.linear_cross_entropy(**kw, backend="triton")
    torch.testing.assert_close(out, F.cross_entropy(kw["h"] @ kw["weight"].t(), kw["target"], reduction="none"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_rows_are_independent(device, dtype):
    """A row's loss does not depend on how many rows share its launch (batch invariance)."""
    kw = cases.cross_entropy_inputs(40, 16, 120, dtype=dtype, device=device, seed=fresh_seed())
    whole = ops.linear_cross_entropy(**kw, backend="triton")
    part = ops.linear_cross_entropy(kw["h"][:16], kw["weight"], kw["target"][:16], backend="triton")
    assert torch.equal(part, whole[:16])
