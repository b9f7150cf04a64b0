"""The reference ops against independent dense formulas (masks multiplied in, no gathering)."""
import pytest
import torch
import torch.nn.functional as F

from bpp_kernels import ops, reference
from tests.kernels import cases


def test_mask_to_index_is_a_permutation_with_kept_first():
    mask = torch.rand(7, 13) < 0.4
    mask[0] = False
    mask[1] = True
    keep_idx, keep_count = reference.mask_to_index(mask)
    assert keep_idx.dtype == torch.int32 and keep_count.dtype == torch.int32
    assert torch.equal(keep_count, mask.sum(1).int())
    for s in range(7):
        assert sorted(keep_idx[s].tolist()) == list(range(13))
        kept = keep_idx[s, : keep_count[s]].tolist()
        assert kept == torch.nonzero(mask[s]).flatten().tolist()


@pytest.mark.parametrize("S,N,d,m,keep", [(3, 5, 12, 17, 0.5), (4, 9, 60, 70, 0.3), (2, 1, 8, 8, 1.0), (2, 3, 8, 8, 0.0)])
def test_masked_swiglu_equals_dense_with_mask_multiplied(S, N, d, m, keep):
    kw = cases.swiglu_inputs(S, N, d, m, keep, seed=torch.seed() % 2**31)
    out = reference.masked_swiglu(**kw)
    w_gate, w_up = kw["w_gate_up"][:, 0], kw["w_gate_up"][:, 1]
    for s in range(S):
        mask = torch.zeros(m)
        mask[kw["keep_idx"][s, : kw["keep_count"][s]].long()] = 1.0
        dense = (F.silu(kw["x"][s] @ w_gate.t()) * (kw["x"][s] @ w_up.t()) * mask) @ kw["w_down_t"]
        torch.testing.assert_close(out[s], dense, rtol=1e-5, atol=1e-5)


def _dense_attention(x, w_qkv, w_o_t, cos, sin, group_mask, b_qkv=None, q_norm=None, k_norm=None, eps=1e-6):
    """All heads computed, head outputs zeroed by the mask before W_o (the hook ground truth)."""
    B, T, d = x.shape
    G, rows, _ = w_qkv.shape
    hd = cos.shape[1]
    r = rows // hd - 2
    y = x @ w_qkv.reshape(-1, d).t()
    if b_qkv is not None:
        y = y + b_qkv.reshape(-1)
    y = y.view(B, T, G, r + 2, hd)
    q = y[:, :, :, :r].reshape(B, T, G * r, hd).transpose(1, 2)
    k = y[:, :, :, r].transpose(1, 2)
    v = y[:, :, :, r + 1].transpose(1, 2)
    if q_norm is not None:
        q = reference.rms_norm(q, q_norm, eps)
        k = reference.rms_norm(k, k_norm, eps)
    q, k = reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    scores = (q @ k.transpose(-1, -2)) / hd**0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    att = (scores.softmax(-1) @ v) * group_mask.repeat_interleave(r).view(1, G * r, 1, 1)
    return att.transpose(1, 2).reshape(B, T, -1) @ w_o_t.reshape(-1, d)


@pytest.mark.parametrize("bias,qk_norm", [(False, False), (True, False), (False, True)], ids=["plain", "qkv-bias", "qk-norm"])
@pytest.mark.parametrize("S,B,T,G,r,hd,keep", [(3, 2, 7, 3, 2, 8, 0.5), (2, 1, 13, 2, 3, 10, 1.0), (4, 2, 5, 4, 1, 6, 0.4)])
def test_masked_attention_equals_dense_with_heads_zeroed(S, B, T, G, r, hd, keep, bias, qk_norm):
    d = 24
    kw = cases.attention_inputs(S, B, T, d, G, r, hd, keep, bias=bias, qk_norm=qk_norm, seed=torch.seed() % 2**31)
    out = reference.masked_attention(**kw)
    for s in range(S):
        mask = torch.zeros(G)
        mask[kw["keep_idx"][s, : kw["keep_count"][s]].long()] = 1.0
        dense = _dense_attention(kw["x"][s], kw["w_qkv"], kw["w_o_t"], kw["cos"], kw["sin"], mask,
                                 kw["b_qkv"], kw.get("q_norm"), kw.get("k_norm"))
        torch.testing.assert_close(out[s], dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N,d,V,chunk", [(17, 12, 50, 4), (5, 8, 301, 4096), (64, 16, 97, 7)])
def test_linear_cross_entropy_equals_torch(N, d, V, chunk):
    kw = cases.cross_entropy_inputs(N, d, V, seed=torch.seed() % 2**31, n_ignored=3)
    out = ops.linear_cross_entropy(**kw, chunk_size=chunk, backend="reference")
    expected = F.cross_entropy(kw["h"] @ kw["weight"].t(), kw["target"], reduction="none")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out[kw["target"] == -100] == 0).all()


def test_rms_norm_and_add_rms_norm():
    x, res, w = torch.randn(3, 5, 16), torch.randn(3, 5, 16), torch.randn(16)
    expected = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5, backend="reference"), expected)
    normed, summed = ops.add_rms_norm(x, res, w, 1e-5, backend="reference")
    torch.testing.assert_close(summed, x + res)
    torch.testing.assert_close(normed, ops.rms_norm(x + res, w, 1e-5, backend="reference"))
