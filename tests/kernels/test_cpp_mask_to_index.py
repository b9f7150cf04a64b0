"""C++ mask_to_index (bpp_kernels._C): the same permutation and counts as the reference."""
import pytest
import torch

from bpp_kernels import cpp, ops, reference

pytestmark = pytest.mark.skipif(not cpp.AVAILABLE, reason="bpp_kernels._C not built")


@pytest.mark.parametrize("S,n", [(9, 101), (1, 1), (3, 1536), (70, 3)])
def test_matches_reference(S, n):
    mask = torch.rand(S, n) < 0.3
    mask[0] = False
    if S > 1:
        mask[1] = True
    idx, cnt = ops.mask_to_index(mask, backend="cpp")
    want_idx, want_cnt = reference.mask_to_index(mask)
    assert idx.dtype == cnt.dtype == torch.int32
    assert torch.equal(idx, want_idx) and torch.equal(cnt, want_cnt)


def test_non_contiguous_mask():
    mask = (torch.rand(40, 12) < 0.5).t()
    got = ops.mask_to_index(mask, backend="cpp")
    want = reference.mask_to_index(mask)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_rejects_non_bool():
    with pytest.raises(RuntimeError, match="2-D bool"):
        torch.ops.bpp.mask_to_index(torch.ones(2, 3, dtype=torch.int32))
