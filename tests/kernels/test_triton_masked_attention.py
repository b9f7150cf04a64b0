import pytest
import torch

from bpp_kernels import ops, reference
from tests.kernels import cases
from tests.kernels.triton_util import device_dtypes, fresh_seed, tolerance

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs go through the interpreter

SHAPES = [  # S, B, T, d, G, r, hd, keep
    pytest.param(3, 2, 7, 24, 3, 2, 8, 0.5, id="S3-B2-T7-G3-r2-hd8"),
    pytest.param(2, 1, 63, 20, 2, 3, 10, 0.6, id="S2-B1-T63-G2-r3-hd10"),
    pytest.param(4, 2, 5, 24, 4, 1, 6, 0.4, id="S4-B2-T5-MHA-hd6"),
    pytest.param(2, 1, 33, 16, 2, 2, 16, 1.0, id="S2-B1-T33-all-kept"),
    pytest.param(2, 2, 9, 16, 2, 2, 8, 0.0, id="S2-B2-T9-none-kept"),
    pytest.param(2, 1, 40, 36, 2, 2, 64, 0.5, id="S2-B1-T40-d36-hd64"),
    # GPU only: the GPU tile config (128-row tiles, 64-wide flash tiles) at hd 128, T not a multiple of 64
    pytest.param(3, 2, 200, 264, 4, 2, 128, 0.5, id="S3-B2-T200-d264-hd128", marks=pytest.mark.gpu),
]
VARIANTS = [pytest.param(False, False, id="plain"), pytest.param(True, False, id="qkv-bias"),
            pytest.param(False, True, id="qk-norm")]


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("bias,qk_norm", VARIANTS)
@pytest.mark.parametrize("S,B,T,d,G,r,hd,keep", SHAPES)
def test_masked_attention_matches_reference(S, B, T, d, G, r, hd, keep, bias, qk_norm, device, dtype):
    kw = cases.attention_inputs(S, B, T, d, G, r, hd, keep, dtype=dtype, device=device, seed=fresh_seed(),
                                bias=bias, qk_norm=qk_norm)
    ref, tol = tolerance(reference.masked_attention, kw, dtype)
    out = ops.masked_attention(**kw, backend="triton")
    assert out.dtype == dtype
    cases.assert_close("masked_attention", ref, out, tol)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_custom_scale_with_bias_and_qk_norm(device, dtype):
    kw = cases.attention_inputs(3, 2, 11, 20, 3, 2, 8, 0.5, dtype=dtype, device=device, seed=fresh_seed(),
                                bias=True, qk_norm=True)
    kw["scale"], kw["norm_eps"] = 0.3, 1e-5
    ref, tol = tolerance(reference.masked_attention, kw, dtype)
    cases.assert_close("masked_attention", ref, ops.masked_attention(**kw, backend="triton"), tol)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_pruned_groups_are_never_read(device, dtype):
    """NaN in the weights and biases of groups that no sample keeps must not reach the output."""
    kw = cases.attention_inputs(3, 2, 13, 24, 4, 2, 8, 0.5, dtype=dtype, device=device, seed=fresh_seed(), bias=True)
    mask = cases.random_mask(3, 4, 0.5, torch.Generator().manual_seed(fresh_seed()))
    mask[:, 3] = False  # group 3 is pruned in every sample
    keep_idx, keep_count = reference.mask_to_index(mask)
    kw["keep_idx"], kw["keep_count"] = keep_idx.to(device), keep_count.to(device)
    kept_anywhere = mask.any(0).to(device)
    ref, tol = tolerance(reference.masked_attention, kw, dtype)
    for name in ("w_qkv", "w_o_t", "b_qkv"):
        kw[name][~kept_anywhere] = float("nan")
    out = ops.masked_attention(**kw, backend="triton")
    assert torch.isfinite(out).all()
    cases.assert_close("masked_attention", ref, out, tol)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_batch_invariance(device, dtype):
    kw = cases.attention_inputs(8, 2, 13, 24, 3, 2, 8, 0.6, dtype=dtype, device=device, seed=fresh_seed(),
                                bias=True)
    together = ops.masked_attention(**kw, backend="triton")
    for j in (1, 5):
        one = {k: (v[j:j + 1] if k in ("x", "keep_idx", "keep_count") else v) for k, v in kw.items()}
        assert torch.equal(ops.masked_attention(**one, backend="triton")[0], together[j])


def test_odd_head_dim_is_refused():
    kw = cases.attention_inputs(1, 1, 4, 12, 1, 1, 5, 1.0, device=DEVICE, seed=fresh_seed())
    kw["cos"], kw["sin"] = torch.ones(4, 5, device=DEVICE), torch.zeros(4, 5, device=DEVICE)  # cases.rope cannot make an odd head_dim
    with pytest.raises(ValueError, match="even head_dim"):
        ops.masked_attention(**kw, backend="triton")


@pytest.mark.gpu
def test_no_host_sync():
    """Counts stay on the device: the op must not wait for the GPU (DESIGN: one sync per PG step)."""
    kw = cases.attention_inputs(4, 2, 64, 64, 4, 2, 16, 0.5, dtype=torch.bfloat16, device="cuda", seed=fresh_seed(),
                                bias=True, qk_norm=True)
    ops.masked_attention(**kw, backend="triton")  # compile first: the first launch may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.masked_attention(**kw, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
