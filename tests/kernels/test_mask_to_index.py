"""mask_to_index on every backend: the same permutation and counts as the reference, on the
mask's device, and the contract itself (a permutation, kept units first ascending, then the
pruned ones ascending); non-contiguous masks; input errors."""
import pytest
import torch

from bpp_kernels import ops, reference
from tests.kernels import cases

SHAPES = [pytest.param(5, 17, 0.5, id="S5-n17-ragged"), pytest.param(3, 1, 0.5, id="S3-n1"),
          pytest.param(2, 300, 0.3, id="S2-n300"), pytest.param(9, 101, 0.3, id="S9-n101"),
          pytest.param(3, 1536, 0.3, id="S3-n1536"), pytest.param(70, 3, 0.3, id="S70-n3"),
          pytest.param(1, 1, 0.5, id="S1-n1"), pytest.param(4, 9, 0.0, id="S4-n9-none-kept"),
          pytest.param(4, 9, 1.0, id="S4-n9-all-kept")]
BACKENDS = [pytest.param("cpp", "cpu", marks=cases.needs_cpp, id="cpp"),
            pytest.param("triton", "cpu", marks=cases.needs_interpreter, id="triton-cpu"),
            pytest.param("triton", "cuda", marks=pytest.mark.gpu, id="triton-cuda")]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("S,n,keep", SHAPES)
def test_matches_reference(S, n, keep, backend, device):
    mask = cases.random_mask(S, n, keep, torch.Generator().manual_seed(51)).to(device)
    keep_idx, keep_count = ops.mask_to_index(mask, backend=backend)
    ref_idx, ref_count = reference.mask_to_index(mask.cpu())
    assert keep_idx.dtype == torch.int32 and keep_count.dtype == torch.int32
    assert keep_idx.device == mask.device and keep_count.device == mask.device
    assert torch.equal(keep_idx.cpu(), ref_idx) and torch.equal(keep_count.cpu(), ref_count)
    for s in range(S):
        idx, c = keep_idx[s].cpu().long(), int(keep_count[s])
        assert torch.equal(idx.sort().values, torch.arange(n))
        assert mask[s].cpu()[idx[:c]].all() and not mask[s].cpu()[idx[c:]].any()
        assert torch.equal(idx[:c], idx[:c].sort().values) and torch.equal(idx[c:], idx[c:].sort().values)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_mask(backend, device):
    mask = (torch.rand(40, 12, generator=torch.Generator().manual_seed(52)) < 0.5).t().to(device)
    got = ops.mask_to_index(mask, backend=backend)
    want = reference.mask_to_index(mask.cpu())
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


def test_rejects_non_bool():
    with pytest.raises(ValueError, match="2-D bool"):
        ops.mask_to_index(torch.ones(2, 3, dtype=torch.int32))


@cases.needs_cpp
def test_cpp_op_rejects_non_bool():
    with pytest.raises(RuntimeError, match="2-D bool"):
        torch.ops.bpp.mask_to_index(torch.ones(2, 3, dtype=torch.int32))
