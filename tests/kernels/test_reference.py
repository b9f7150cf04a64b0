"""The reference ops against independent dense formulas (masks multiplied in, no gathering), and
their gradients checked by finite differences (torch.autograd.gradcheck, float64) for every op
and differentiable input: ragged, empty and full masks, one token and odd lengths, GQA ratio 1
and > 1, with and without per-unit scales, biases and q/k norms."""
import pytest
import torch
import torch.nn.functional as F

from bpp_kernels import layout, ops, reference
from tests.kernels import cases


def test_mask_to_index_is_a_permutation_with_kept_first():
    mask = torch.rand(7, 13, generator=torch.Generator().manual_seed(61)) < 0.4
    mask[0] = False
    mask[1] = True
    keep_idx, keep_count = reference.mask_to_index(mask)
    assert keep_idx.dtype == torch.int32 and keep_count.dtype == torch.int32
    assert torch.equal(keep_count, mask.sum(1).int())
    for s in range(7):
        assert sorted(keep_idx[s].tolist()) == list(range(13))
        kept = keep_idx[s, : keep_count[s]].tolist()
        assert kept == torch.nonzero(mask[s]).flatten().tolist()


def _dense_unit_scale(kw, s, n):
    """Sample s's per-unit multiplier in unit order: unit_scale where kept, 0 where pruned."""
    mask = torch.zeros(n)
    c = int(kw["keep_count"][s])
    kept = kw["keep_idx"][s, :c].long()
    mask[kept] = 1.0 if kw.get("unit_scale") is None else kw["unit_scale"][s, :c]
    return mask


@pytest.mark.parametrize("scaled", [False, True], ids=["hard-mask", "unit-scale"])
@pytest.mark.parametrize("S,N,d,m,keep", [(3, 5, 12, 17, 0.5), (4, 9, 60, 70, 0.3), (2, 1, 8, 8, 1.0),
                                          (2, 3, 8, 8, 0.0)])
def test_masked_swiglu_equals_dense_with_mask_multiplied(S, N, d, m, keep, scaled):
    kw = cases.swiglu_inputs(S, N, d, m, keep, seed=62, unit_scale=scaled)
    out = reference.masked_swiglu(**kw)
    w_gate, w_up = kw["w_gate_up"][:, 0], kw["w_gate_up"][:, 1]
    for s in range(S):
        mask = _dense_unit_scale(kw, s, m)
        dense = (F.silu(kw["x"][s] @ w_gate.t()) * (kw["x"][s] @ w_up.t()) * mask) @ kw["w_down_t"]
        torch.testing.assert_close(out[s], dense, rtol=1e-5, atol=1e-5)


DENSE_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "relu": F.relu}


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("scaled", [False, True], ids=["hard-mask", "unit-scale"])
@pytest.mark.parametrize("activation", list(DENSE_ACTIVATIONS))
@pytest.mark.parametrize("S,N,d,m,keep", [(3, 5, 12, 17, 0.5), (4, 9, 60, 70, 0.3), (2, 1, 8, 8, 1.0),
                                          (2, 3, 8, 8, 0.0)])
def test_masked_mlp_equals_dense_opt_style_mlp(S, N, d, m, keep, activation, scaled, bias):
    """A hand-written OPT / GPT-2 / Pythia MLP from the unpacked weights (fc1 with its bias, the
    activation, the channel mask multiplied in, fc2 without its bias), all channels computed."""
    g = torch.Generator().manual_seed(70)
    fc1_w, fc1_b = torch.randn(m, d, generator=g) / d**0.5, torch.randn(m, generator=g)
    fc2_w = torch.randn(d, m, generator=g) / m**0.5
    w_up, w_down_t, b_up = layout.pack_mlp(fc1_w, fc2_w, fc1_b if bias else None)
    kw = cases.mlp_inputs(S, N, d, m, keep, seed=71, unit_scale=scaled, activation=activation)
    kw.update(w_up=w_up, w_down_t=w_down_t, b_up=b_up)
    out = reference.masked_mlp(**kw)
    act = DENSE_ACTIVATIONS[activation]
    for s in range(S):
        mask = _dense_unit_scale(kw, s, m)
        hidden = kw["x"][s] @ fc1_w.t() + (fc1_b if bias else 0.0)
        dense = (act(hidden) * mask) @ fc2_w.t()
        torch.testing.assert_close(out[s], dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["fp32", "fp16", "bf16", "fp64"])
def test_layer_norm_equals_torch(dtype, bias):
    kw = cases.layer_norm_inputs((3, 5, 40), dtype=dtype, seed=72, bias=bias)
    out = reference.layer_norm(**kw)
    expected = F.layer_norm(kw["x"], (40,), kw["weight"], kw["bias"], kw["eps"])
    assert out.dtype == dtype
    # fp32 statistics and affine map, one rounding: half precision within one unit in the last place
    half = dtype in (torch.float16, torch.bfloat16)
    tol = dict(rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps) if half else {}
    torch.testing.assert_close(out, expected, **tol)


def _dense_attention(x, w_qkv, w_o_t, cos, sin, group_mask, b_qkv=None, q_norm=None, k_norm=None, eps=1e-6):
    """All heads computed, head outputs multiplied by the mask before W_o (the hook ground truth)."""
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


@pytest.mark.parametrize("scaled", [False, True], ids=["hard-mask", "unit-scale"])
@pytest.mark.parametrize("bias,qk_norm", [(False, False), (True, False), (False, True)], ids=["plain", "qkv-bias", "qk-norm"])
@pytest.mark.parametrize("S,B,T,G,r,hd,keep", [(3, 2, 7, 3, 2, 8, 0.5), (2, 1, 13, 2, 3, 10, 1.0), (4, 2, 5, 4, 1, 6, 0.4)])
def test_masked_attention_equals_dense_with_heads_zeroed(S, B, T, G, r, hd, keep, bias, qk_norm, scaled):
    kw = cases.attention_inputs(S, B, T, 24, G, r, hd, keep, bias=bias, qk_norm=qk_norm, seed=63, unit_scale=scaled)
    out = reference.masked_attention(**kw)
    for s in range(S):
        dense = _dense_attention(kw["x"][s], kw["w_qkv"], kw["w_o_t"], kw["cos"], kw["sin"], _dense_unit_scale(kw, s, G),
                                 kw["b_qkv"], kw.get("q_norm"), kw.get("k_norm"))
        torch.testing.assert_close(out[s], dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N,d,V,chunk", [(17, 12, 50, 4), (5, 8, 301, 4096), (64, 16, 97, 7)])
def test_linear_cross_entropy_equals_torch(N, d, V, chunk):
    kw = cases.cross_entropy_inputs(N, d, V, seed=64, n_ignored=3)
    out = ops.linear_cross_entropy(**kw, chunk_size=chunk, backend="reference")
    expected = F.cross_entropy(kw["h"] @ kw["weight"].t(), kw["target"], reduction="none")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out[kw["target"] == -100] == 0).all()


def test_rms_norm_and_add_rms_norm():
    g = torch.Generator().manual_seed(65)
    x, res, w = torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 16, generator=g), torch.randn(16, generator=g)
    expected = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5, backend="reference"), expected)
    normed, summed = ops.add_rms_norm(x, res, w, 1e-5, backend="reference")
    torch.testing.assert_close(summed, x + res)
    torch.testing.assert_close(normed, ops.rms_norm(x + res, w, 1e-5, backend="reference"))


# --- gradients by finite differences (float64) ------------------------------------------------


def _gradcheck(fn, kwargs: dict, wrt: list[str], fast_mode: bool = False):
    """gradcheck of fn w.r.t. the float64 kwargs named in wrt (all present ones), the others fixed.
    fast_mode compares the Jacobian along random projections instead of column by column."""
    names = [k for k in wrt if kwargs.get(k) is not None]
    leaves = [kwargs[k].detach().double().requires_grad_() for k in names]

    def f(*tensors):
        return fn(**{**kwargs, **dict(zip(names, tensors))})

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast_mode)


def _double(kw: dict) -> dict:
    return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}


@pytest.mark.parametrize("scaled", [False, True], ids=["hard-mask", "unit-scale"])
@pytest.mark.parametrize("S,N,d,m,keep", [pytest.param(3, 3, 4, 5, 0.5, id="S3-N3-ragged-empty-full"),
                                          pytest.param(2, 1, 4, 6, 1.0, id="S2-N1-all-kept"),
                                          pytest.param(2, 3, 4, 5, 0.0, id="S2-N3-none-kept")])
def test_masked_swiglu_gradcheck(S, N, d, m, keep, scaled):
    kw = _double(cases.swiglu_inputs(S, N, d, m, keep, seed=66, unit_scale=scaled))
    _gradcheck(reference.masked_swiglu, kw, ["x", "w_gate_up", "w_down_t", "unit_scale"])


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("bias,scaled", [(False, False), (True, True)], ids=["plain", "bias-unit-scale"])
@pytest.mark.parametrize("S,N,d,m,keep", [pytest.param(3, 3, 4, 5, 0.5, id="S3-N3-ragged-empty-full"),
                                          pytest.param(2, 3, 4, 5, 0.0, id="S2-N3-none-kept")])
def test_masked_mlp_gradcheck(S, N, d, m, keep, bias, scaled, activation):
    kw = _double(cases.mlp_inputs(S, N, d, m, keep, seed=73, bias=bias, unit_scale=scaled, activation=activation))
    _gradcheck(reference.masked_mlp, kw, ["x", "w_up", "w_down_t", "b_up", "unit_scale"])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(3, 5), (1, 1, 7)], ids=["3x5", "one-row"])
def test_layer_norm_gradcheck(shape, bias):
    _gradcheck(reference.layer_norm, _double(cases.layer_norm_inputs(shape, seed=74, bias=bias)),
               ["x", "weight", "bias"])


@pytest.mark.parametrize("bias,qk_norm,scaled", [(False, False, False), (True, True, True)],
                         ids=["plain", "bias-norm-unit-scale"])
@pytest.mark.parametrize("S,B,T,G,r,keep", [pytest.param(3, 1, 3, 2, 2, 0.5, id="S3-T3-GQA2-ragged-empty-full"),
                                            pytest.param(3, 2, 1, 2, 1, 0.5, id="S3-B2-T1-MHA"),
                                            pytest.param(2, 1, 5, 2, 3, 1.0, id="S2-T5-GQA3-all-kept"),
                                            pytest.param(2, 1, 3, 2, 1, 0.0, id="S2-T3-none-kept")])
def test_masked_attention_gradcheck(S, B, T, G, r, keep, bias, qk_norm, scaled):
    kw = _double(cases.attention_inputs(S, B, T, 4, G, r, 4, keep, seed=67, bias=bias, qk_norm=qk_norm,
                                        unit_scale=scaled))
    # fast mode: the full Jacobian (~300 columns, each two Python-loop forwards) takes 10-25 s here
    _gradcheck(reference.masked_attention, kw, ["x", "w_qkv", "w_o_t", "b_qkv", "q_norm", "k_norm", "unit_scale"],
               fast_mode=True)


@pytest.mark.parametrize("N,V,chunk", [pytest.param(5, 7, 2, id="N5-V7-three-chunks"),
                                       pytest.param(1, 9, 4096, id="N1-V9")])
def test_linear_cross_entropy_gradcheck(N, V, chunk):
    kw = _double(cases.cross_entropy_inputs(N, 4, V, seed=68, n_ignored=1 if N > 1 else 0))
    _gradcheck(lambda **k: reference.linear_cross_entropy(**k, chunk_size=chunk), kw, ["h", "weight"])


@pytest.mark.parametrize("shape", [(3, 5), (1, 1, 7)], ids=["3x5", "one-row"])
def test_rms_norm_gradcheck(shape):
    x, res, w = (t.double() for t in cases.norm_inputs(shape, seed=69))
    _gradcheck(reference.rms_norm, dict(x=x, weight=w, eps=1e-6), ["x", "weight"])
    _gradcheck(lambda **k: torch.cat(reference.add_rms_norm(**k), -1),
               dict(x=x, residual=res, weight=w, eps=1e-6), ["x", "residual", "weight"])
