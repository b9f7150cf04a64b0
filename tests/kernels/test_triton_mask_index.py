import os

import pytest
import torch

from bpp_kernels import ops, reference
from tests.kernels import cases
from tests.kernels.triton_util import fresh_seed

# triton takes CPU tensors only in the interpreter (conftest switches it on when there is no GPU)
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                        reason="CPU tensors need TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("S,n,keep", [(5, 17, 0.5), (3, 1, 0.5), (2, 300, 0.3), (4, 9, 0.0), (4, 9, 1.0)],
                         ids=["S5-n17-ragged", "S3-n1", "S2-n300", "S4-n9-none-kept", "S4-n9-all-kept"])
def test_mask_to_index_matches_reference(S, n, keep, device):
    mask = cases.random_mask(S, n, keep, torch.Generator().manual_seed(fresh_seed())).to(device)
    keep_idx, keep_count = ops.mask_to_index(mask, backend="triton")
    ref_idx, ref_count = reference.mask_to_index(mask.cpu())
    assert keep_idx.dtype == torch.int32 and keep_count.dtype == torch.int32
    assert keep_idx.device == mask.device and keep_count.device == mask.device
    assert torch.equal(keep_idx.cpu(), ref_idx) and torch.equal(keep_count.cpu(), ref_count)
    # the contract itself: a permutation, kept units first in ascending order, then the pruned ones
    for s in range(S):
        idx, c = keep_idx[s].cpu().long(), int(keep_count[s])
        assert torch.equal(idx.sort().values, torch.arange(n))
        assert mask[s].cpu()[idx[:c]].all() and not mask[s].cpu()[idx[c:]].any()
        assert torch.equal(idx[:c], idx[:c].sort().values)
