"""masked_attention's head_keep (query heads pruned inside KV groups) on every backend: forward and
gradients against a dense GQA attention written here (every head of every group computed, the
pruned ones zeroed before W_o), for r = 1, 2 and 3 with ragged S, B and T, one case plain, one with
position_ids, padding, a window and per-group scales, one with q/k norms, q/k/v bias and scales;
head_keep all True is the call without it, bit for bit; a kept group keeping no head is that group
pruned through keep_idx; pruning every head gives zeros and zero gradients; a pruned head's rows
of w_qkv and w_o_t (and a headless group's k/v rows) get exactly zero gradient and, on the C++
and Triton backends, are never read (NaN there changes no bit); batch invariance; torch.compile;
bad head_keep refused with a one-line ValueError.

Tolerances as in test_attention_positions (FlashAttention's rule, with the dense attention below as
the truth, floored at two epsilons of fp16/bf16)."""
import pytest
import torch

from bpp_kernels import cpp, ops, reference
from tests.kernels import cases
from tests.kernels.test_attention_positions import WRT, assert_grads_match, scenario

TARGETS = [pytest.param("reference", "cpu", dt, id=f"reference-{cases.DTYPE_IDS[dt]}") for dt in cases.ALL_DTYPES] \
    + cases.targets()
FAST_TARGETS = cases.targets(dtypes=(torch.float32,))  # cpp, triton (interpreter), triton-cuda


def dense_attention(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, *, head_keep=None, b_qkv=None, q_norm=None,
                    k_norm=None, norm_eps=1e-6, unit_scale=None, position_ids=None, attention_mask=None,
                    window=None):
    """GQA attention with every query head of every group computed (as Hugging Face's Llama runs
    it), each head's output then multiplied by its keep flag (group kept and head kept) and its
    group's scale before W_o. Independent of bpp_kernels' loop over kept groups."""
    S, B, T, d = x.shape
    G, rows, _ = w_qkv.shape
    hd = cos.shape[-1]
    r = rows // hd - 2
    qkv = (x @ w_qkv.reshape(G * rows, d).t()).view(S, B, T, G, r + 2, hd)
    if b_qkv is not None:
        qkv = qkv + b_qkv.view(G, r + 2, hd)
    q, k, v = qkv[..., :r, :], qkv[..., r, :], qkv[..., r + 1, :]  # (S, B, T, G, r, hd), (S, B, T, G, hd)

    def head_norm(t, weight):  # Qwen3's q/k RMSNorm: fp32 statistics, rounded, then the weight
        t32 = t.float()
        return weight * (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + norm_eps)).to(t.dtype)

    def rope(t, c, s_):
        half = hd // 2
        return t * c + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * s_

    if q_norm is not None:
        q = head_norm(q, q_norm)
    if k_norm is not None:
        k = head_norm(k, k_norm)
    pos = torch.arange(T, device=x.device).expand(B, T) if position_ids is None else position_ids.long()
    c, s_ = cos.to(x.dtype)[pos], sin.to(x.dtype)[pos]  # (B, T, hd)
    q, k = rope(q, c[:, :, None, None], s_[:, :, None, None]), rope(k, c[:, :, None], s_[:, :, None])
    scores = torch.einsum("sbtgjh,sbugh->sbgjtu", q, k) * hd**-0.5
    t = torch.arange(T, device=x.device)
    seen = t[None, :] <= t[:, None]
    if window is not None:
        seen = seen & (t[:, None] - t[None, :] < window)
    seen = seen.expand(B, T, T)
    if attention_mask is not None:
        seen = seen & attention_mask[:, None, :]
    seen = seen[None, :, None, None]  # (1, B, 1, 1, T, T)
    scores = torch.where(seen.any(-1, keepdim=True), scores.masked_fill(~seen, float("-inf")), 0.0)
    att = torch.einsum("sbgjtu,sbugh->sbtgjh", torch.softmax(scores, dim=-1) * seen, v)
    live = torch.arange(G, device=x.device) < keep_count[:, None]  # slot j holds a kept group
    per_slot = live.to(x.dtype) if unit_scale is None else torch.where(live, unit_scale.to(x.dtype), 0.0)
    per_group = torch.zeros(S, G, dtype=x.dtype, device=x.device).scatter(1, keep_idx.long(), per_slot)
    per_head = per_group[:, :, None].expand(S, G, r)
    if head_keep is not None:
        per_head = per_head * head_keep.to(x.dtype)
    att = att * per_head[:, None, None, :, :, None]
    return att.reshape(S, B, T, G * r * hd) @ w_o_t.reshape(G * r * hd, d)


def head_masks(S: int, G: int, r: int, seed: int) -> torch.Tensor:
    """(S, G, r) bool: random (about 60% kept); sample 1 keeps every head; the last sample's group 0
    keeps no head and its group 1 one head only."""
    head_keep = torch.rand(S, G, r, generator=torch.Generator().manual_seed(seed)) < 0.6
    head_keep[1] = True
    head_keep[-1, 0] = False
    head_keep[-1, 1] = False
    head_keep[-1, 1, r - 1] = True
    return head_keep


def inputs(r: int, S: int, B: int, T: int, G: int, variant: str, dtype=torch.float32, device="cpu", seed=61,
           d: int = 16, hd: int = 8) -> dict:
    """masked_attention kwargs with a head_keep: ``plain``, ``masks`` (all-three of
    test_attention_positions: packed shifted positions, padding, window 4; per-group scales),
    ``norm-bias`` (q/k norms, q/k/v bias, per-group scales) or ``all`` (both). Sample 0 keeps no
    group, sample 1 all; the last sample keeps groups 0 and 1 (group 0 with no head); with S >= 4,
    sample S-2 keeps only the last groups (so slots and group indices differ), with alternate heads
    of the last group."""
    masks, norm_bias = variant in ("masks", "all"), variant in ("norm-bias", "all")
    kw = cases.attention_inputs(S, B, T, d, G, r, hd, 0.6, dtype=dtype, device=device, seed=seed, bias=norm_bias,
                                qk_norm=norm_bias, unit_scale=masks or norm_bias)
    groups = cases.random_mask(S, G, 0.6, torch.Generator().manual_seed(seed + 1))
    groups[-1, :2] = True
    head_keep = head_masks(S, G, r, seed + 2)
    if S >= 4:  # sample S-2 keeps the last groups only, so head_keep's group g sits at keep_idx slot j != g
        groups[S - 2] = False
        groups[S - 2, max(G - 2, 1):] = True
        head_keep[S - 2, G - 1] = torch.arange(r) % 2 == 0  # heads 0, 2, ... of the last group
    keep_idx, keep_count = reference.mask_to_index(groups)
    if S >= 4:
        assert any(int(keep_idx[S - 2, j]) != j for j in range(int(keep_count[S - 2])))
    kw.update(keep_idx=keep_idx.to(device), keep_count=keep_count.to(device), head_keep=head_keep.to(device))
    if masks:
        extra, P = scenario("all-three", B, T)
        kw["cos"], kw["sin"] = cases.rope(P, hd, dtype=dtype, device=device)
        kw.update({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in extra.items()})
    return kw


CASES = [  # r, S, B, T, G, variant
    pytest.param(1, 4, 2, 7, 3, "plain", id="r1-S4-B2-T7-G3-plain"),
    pytest.param(2, 4, 2, 9, 2, "masks", id="r2-S4-B2-T9-G2-positions-padding-window-scale"),
    pytest.param(3, 4, 1, 6, 3, "norm-bias", id="r3-S4-B1-T6-G3-norm-bias-scale"),
]


def _run(backend):
    return lambda **k: ops.masked_attention(**k, backend=backend)


@pytest.mark.parametrize("r,S,B,T,G,variant,backend,device,dtype", cases.cross(CASES, TARGETS))
def test_matches_dense_attention_with_heads_zeroed(r, S, B, T, G, variant, backend, device, dtype):
    kw = inputs(r, S, B, T, G, variant, dtype, device)
    out, grads = assert_grads_match(f"{backend} masked_attention heads {variant}", kw, backend, dtype,
                                    truth=dense_attention)
    assert (out[kw["keep_count"] == 0] == 0).all(), "a sample keeping no group must give zeros"


@pytest.mark.parametrize("backend,device,dtype",
                         [pytest.param("reference", "cpu", torch.float32, id="reference-fp32")] + FAST_TARGETS
                         + [p for p in cases.targets(dtypes=(torch.bfloat16,), triton=False)])
def test_all_heads_kept_is_the_call_without_head_keep(backend, device, dtype):
    """head_keep all True: the same bits as head_keep=None, forward and every gradient."""
    kw = inputs(3, 3, 2, 9, 2, "all", dtype, device, seed=62)
    base = {k: v for k, v in kw.items() if k != "head_keep"}
    out, grads = cases.forward_backward(_run(backend), base, WRT)
    all_kept = torch.ones_like(kw["head_keep"])
    out1, grads1 = cases.forward_backward(_run(backend), {**base, "head_keep": all_kept}, WRT)
    assert torch.equal(out, out1), f"{backend}: output with head_keep all True differs from head_keep=None"
    for k in grads:
        assert torch.equal(grads[k], grads1[k]), f"{backend}: d{k} with head_keep all True differs"


def _by_group(slot_values: torch.Tensor, keep_idx: torch.Tensor, keep_count: torch.Tensor) -> torch.Tensor:
    """(S, G) values aligned with keep_idx's slots -> by group (0 where the group is pruned)."""
    live = torch.arange(keep_idx.shape[1], device=keep_idx.device) < keep_count[:, None]
    return torch.zeros_like(slot_values).scatter(1, keep_idx.long(), torch.where(live, slot_values, 0))


@pytest.mark.parametrize("backend,device,dtype",
                         [pytest.param("reference", "cpu", torch.float32, id="reference-fp32")] + FAST_TARGETS)
def test_group_with_no_kept_head_is_the_group_pruned(backend, device, dtype):
    """A kept group whose every head is pruned gives what pruning that group through keep_idx gives
    (unit_scale realigned to the new slots): the same bits on the C++ and Triton backends, which skip
    it whole (Triton's q/k norm-weight gradients: to rounding), and close on the reference (which
    computes it and multiplies by zero)."""
    kw = inputs(2, 4, 2, 9, 3, "norm-bias", dtype, device, seed=63)
    kw["head_keep"][2:, 1] = False  # samples 2 and 3: group 1 keeps no head (sample 3's group 0 neither)
    groups = _by_group(torch.ones_like(kw["unit_scale"]), kw["keep_idx"], kw["keep_count"]) > 0
    keep_idx, keep_count = reference.mask_to_index(groups & kw["head_keep"].any(-1))
    scale = _by_group(kw["unit_scale"], kw["keep_idx"], kw["keep_count"]).gather(1, keep_idx.long())
    out, grads = cases.forward_backward(_run(backend), kw, WRT)
    out1, grads1 = cases.forward_backward(
        _run(backend), {**kw, "keep_idx": keep_idx, "keep_count": keep_count, "unit_scale": scale}, WRT)
    grads["unit_scale"] = _by_group(grads["unit_scale"], kw["keep_idx"], kw["keep_count"])
    grads1["unit_scale"] = _by_group(grads1["unit_scale"], keep_idx, keep_count)
    for name, a, b in [("output", out, out1)] + [(f"d{k}", grads[k], grads1[k]) for k in WRT]:
        if backend == "reference" or (backend == "triton" and name in ("dq_norm", "dk_norm")):
            # the reference multiplies by zero; Triton's norm-weight gradients sum over a buffer laid
            # out by slots, whose zeros move with keep_idx (the same terms in another order)
            cases.assert_close(f"{backend} {name}", b, a, 1e-6)
        else:
            assert torch.equal(a, b), f"{backend} {name}: a group with no kept head differs from the group pruned"


@pytest.mark.parametrize("backend,device,dtype", TARGETS)
def test_all_heads_pruned_gives_zeros_and_zero_gradients(backend, device, dtype):
    kw = inputs(2, 3, 1, 5, 2, "norm-bias", dtype, device, seed=64)
    kw["head_keep"] = torch.zeros_like(kw["head_keep"])
    leaves = {k: kw[k].detach().clone().requires_grad_() for k in WRT}
    out = ops.masked_attention(**{**kw, **leaves}, backend=backend)
    assert (out == 0).all(), "no head kept anywhere: the output must be zeros"
    grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))  # a None would raise here
    for name, g in zip(leaves, grads):
        assert g is not None and g.shape == leaves[name].shape and (g == 0).all(), f"d{name} must be zeros"


@pytest.mark.parametrize("backend,device,dtype",
                         [pytest.param("reference", "cpu", torch.float32, id="reference-fp32")] + FAST_TARGETS
                         + [p for p in cases.targets(dtypes=(torch.bfloat16,), triton=False)])
def test_pruned_heads_get_zero_gradient_and_are_never_read(backend, device, dtype):
    """Head 1 of group 0 is pruned in every sample, and group 2 keeps no head wherever it is kept:
    their rows of w_qkv (and group 2's k/v rows and bias) and of w_o_t get exactly zero gradient, the
    kept heads' rows do not. On the C++ and Triton backends NaN in those rows changes no bit of the
    output or of any gradient: they are never read."""
    G, r, hd = 3, 2, 8
    kw = inputs(r, 4, 2, 7, G, "norm-bias", dtype, device, seed=65)
    kw["head_keep"][:, 0, 1] = False
    kw["head_keep"][:, 2] = False
    kw["head_keep"][:, 1] = True
    q_rows = slice(hd, 2 * hd)  # head 1's rows inside a group's block
    out, grads = cases.forward_backward(_run(backend), kw, WRT)
    assert (grads["w_qkv"][0, q_rows] == 0).all() and (grads["w_o_t"][0, q_rows] == 0).all()
    assert (grads["w_qkv"][2] == 0).all() and (grads["w_o_t"][2] == 0).all() and (grads["b_qkv"][2] == 0).all()
    assert (grads["b_qkv"][0, q_rows] == 0).all()
    for g, rows in ((0, slice(0, hd)), (0, slice(r * hd, (r + 2) * hd)), (1, slice(None))):  # kept somewhere
        assert (grads["w_qkv"][g, rows] != 0).any(), f"kept rows {g}, {rows} of w_qkv got no gradient"
    assert (grads["w_o_t"][0, :hd] != 0).any() and (grads["w_o_t"][1] != 0).any()
    if backend == "reference":
        return  # it multiplies the pruned heads by zero: NaN would propagate
    poisoned = {k: v.clone() for k, v in kw.items() if k in ("w_qkv", "w_o_t", "b_qkv")}
    for name in poisoned:
        poisoned[name][0, q_rows] = float("nan")
        poisoned[name][2] = float("nan")
    out1, grads1 = cases.forward_backward(_run(backend), {**kw, **poisoned}, WRT)
    assert torch.equal(out, out1), f"{backend}: a pruned head's weights reached the output"
    for k in WRT:
        assert torch.equal(grads[k], grads1[k]), f"{backend}: a pruned head's weights reached d{k}"


@pytest.mark.parametrize("backend,device,dtype",
                         [pytest.param("reference", "cpu", torch.float32, id="reference-fp32")] + FAST_TARGETS)
def test_batch_invariance(backend, device, dtype):
    """Sample j's output with its head_keep is the same bits alone and in a batch of 5."""
    kw = inputs(3, 5, 2, 9, 3, "masks", dtype, device, seed=66)
    together = ops.masked_attention(**kw, backend=backend)
    per_sample = ("x", "keep_idx", "keep_count", "unit_scale", "head_keep")
    for j in ((2, 4) if device == "cpu" and backend == "triton" else range(5)):  # the interpreter is slow
        one = {k: (v[j:j + 1] if k in per_sample else v) for k, v in kw.items()}
        assert torch.equal(ops.masked_attention(**one, backend=backend)[0], together[j]), f"sample {j}"


@pytest.mark.parametrize("backend,device", [pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_forward_and_backward_compile_without_graph_break(backend, device):
    cases.assert_compiled_matches_eager(_run(backend), inputs(2, 2, 1, 6, 2, "masks", device=device, seed=67), WRT)


@pytest.mark.parametrize("head_keep,message", [
    (torch.ones(2, 2, 3, dtype=torch.bool), r"head_keep must be a \(S=2, G=2, r=2\) bool tensor, got \(2, 2, 3\)"),
    (torch.ones(2, 4, dtype=torch.bool), r"head_keep must be a \(S=2, G=2, r=2\) bool tensor, got \(2, 4\)"),
    (torch.ones(2, 2, 2, dtype=torch.uint8), r"head_keep must be .* got \(2, 2, 2\) torch.uint8"),
    (torch.ones(2, 2, 2), r"head_keep must be .* got \(2, 2, 2\) torch.float32"),
    ([[[True, True]] * 2] * 2, r"head_keep must be a \(S=2, G=2, r=2\) bool tensor, got list"),
    (torch.ones(2, 2, 2, dtype=torch.bool, device="meta"), r"head_keep must be on x's device \(cpu\), got meta"),
], ids=["shape", "flat", "uint8", "float", "list", "device"])
@pytest.mark.parametrize("backend", [pytest.param("reference"), pytest.param("cpp", marks=cases.needs_cpp),
                                     pytest.param("triton", marks=cases.needs_interpreter)])
def test_bad_head_keep_says_what_is_wrong(backend, head_keep, message):
    kw = cases.attention_inputs(2, 2, 5, 16, 2, 2, 8, 0.5)
    with pytest.raises(ValueError, match=message) as err:
        ops.masked_attention(**kw, head_keep=head_keep, backend=backend)
    assert "\n" not in str(err.value), "a one-line message"


@cases.needs_cpp
def test_cpp_op_checks_head_keep():
    """The C++ operator itself refuses a head_keep of the wrong shape or dtype (a RuntimeError)."""
    kw = cases.attention_inputs(2, 2, 5, 16, 2, 2, 8, 0.5)
    for bad in (torch.ones(2, 2, 3, dtype=torch.bool), torch.ones(2, 2, 2, dtype=torch.uint8)):
        with pytest.raises(RuntimeError, match=r"head_keep must be a \(S=2, G=2, r=2\) bool tensor"):
            cpp.masked_attention(**kw, head_keep=bad)


def test_head_mask_in_hugging_face_order_is_a_reshape():
    """A mask over the G*r query heads in Hugging Face's order (head h reads KV head h // r) is
    head_keep after a view: pruning head h equals zeroing its columns h*hd.. of o_proj's weight."""
    S, G, r, hd, d = 3, 2, 3, 8, 16
    kw = cases.attention_inputs(S, 1, 6, d, G, r, hd, 1.0, seed=68)
    head_mask = torch.rand(S, G * r, generator=torch.Generator().manual_seed(69)) < 0.5
    out = ops.masked_attention(**kw, head_keep=head_mask.view(S, G, r))
    for s in range(S):
        w_o = kw["w_o_t"].reshape(G * r * hd, d).t().clone()  # (d, H*hd): o_proj.weight as Hugging Face stores it
        w_o[:, (~head_mask[s]).repeat_interleave(hd)] = 0
        one = {k: (v[s:s + 1] if k in ("x", "keep_idx", "keep_count") else v) for k, v in kw.items()}
        dense = dense_attention(**{**one, "w_o_t": w_o.t().reshape(G, r * hd, d)})
        cases.assert_close(f"sample {s}", dense[0], out[s], cases.FP32_TOL)
