"""masked_attention's position_ids, attention_mask and window on every backend against the
reference, forward and gradients (x, w_qkv, w_o_t, q/k/v bias, q/k norms, per-group scales; each
batch has a sample keeping no group and one keeping all): shifted, gapped and packed positions, left and
right padding, a fully padded row, windows of 1, 3 and >= T, all three at once; longer sequences
that cross the C++ query chunks and the Triton tiles the window skips; a query row that sees no
key gives zeros and passes no gradient; the defaults and position_ids=arange are the same bits
as a call without the arguments; the window convention is Hugging Face's (its mask functions, and
a tiny Mistral run by transformers with sliding_window, padding and positions); bad inputs are
refused. RoPE is relative: a constant offset of the positions changes no attention output, so
the position lookup is tested by uneven positions (gapped, packed, padded).

fp16 tolerances: FlashAttention's rule (cases.grad_tolerances) with a floor of two fp16 epsilons:
a gradient of a few scalars (unit_scale's) can come out of the fp16 reference run with almost no
error by chance, which would ask more than fp16 rounding of the result allows."""
import pytest
import torch

from bpp_kernels import cpp, ops, reference
from tests.kernels import cases

WRT = ["x", "w_qkv", "w_o_t", "b_qkv", "q_norm", "k_norm", "unit_scale"]
S, B, T, D, G, R, HD = 3, 2, 11, 16, 2, 2, 8  # tiny: the Triton interpreter is slow
LOW_PRECISION = (torch.float32, torch.float16)


def _packed(B: int, T: int, starts: list[list[int]]) -> torch.Tensor:
    """(B, T) positions restarting at 0 at each listed place of each row (packed sequences)."""
    pos = torch.empty(B, T, dtype=torch.int64)
    for b, row in enumerate(starts):
        edges = [0, *row, T]
        for lo, hi in zip(edges[:-1], edges[1:]):
            pos[b, lo:hi] = torch.arange(hi - lo)
    return pos


def _left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Hugging Face's positions for a padded batch: counting real tokens from 0 (padding gets 0)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def scenario(name: str, B: int = B, T: int = T) -> tuple[dict, int]:
    """(the new keyword arguments, P = the rows cos/sin need) of a named case."""
    ones = torch.ones(B, T, dtype=torch.bool)
    if name == "shifted":
        return dict(position_ids=torch.arange(7, 7 + T).expand(B, T)), T + 7
    if name == "gapped":  # shifted by 7 with 4 positions skipped after the 5th token (an offset alone
        # changes no attention score: RoPE is relative, so only uneven positions show a wrong row)
        return dict(position_ids=(7 + torch.arange(T) + 4 * (torch.arange(T) >= 5)).expand(B, T)), T + 11
    if name == "packed":
        return dict(position_ids=_packed(B, T, [[4], [3, 6]][:B])), T
    if name == "left-padding":
        mask = ones.clone()
        mask[0, :3] = False
        return dict(attention_mask=mask, position_ids=_left_padded_positions(mask)), T
    if name == "right-padding":
        mask = ones.clone()
        mask[-1, T - 4:] = False
        return dict(attention_mask=mask), T
    if name == "fully-padded-row":
        mask = ones.clone()
        mask[0] = False
        mask[-1, T - 2:] = False
        return dict(attention_mask=mask), T
    if name == "window-1":
        return dict(window=1), T
    if name == "window-3":
        return dict(window=3), T
    if name == "window-T":
        return dict(window=T), T
    if name in ("all-three", "all-three-plain"):
        mask = ones.clone()
        mask[0, :2] = False  # left padding
        mask[-1, T - 3:] = False  # right padding
        pos = _packed(B, T, [[5], [4]][:B]) + 7  # packed and shifted
        return dict(position_ids=pos, attention_mask=mask, window=4), T + 7
    raise ValueError(name)


SCENARIOS = ["shifted", "gapped", "packed", "left-padding", "right-padding", "fully-padded-row", "window-1", "window-3",
             "window-T", "all-three", "all-three-plain"]
FP16_ON_INTERPRETER = {"fully-padded-row", "window-1", "all-three"}  # the interpreter is slow


def inputs(name: str, dtype=torch.float32, device="cpu", seed=41, S=S, B=B, T=T, d=D, G=G, r=R, hd=HD,
           keep=0.5) -> dict:
    """masked_attention kwargs with the scenario's arguments and cos/sin of P rows on ``device``."""
    extra, P = scenario(name, B, T)
    full = not name.endswith("-plain")
    kw = cases.attention_inputs(S, B, T, d, G, r, hd, keep, dtype=dtype, device=device, seed=seed, bias=full,
                                qk_norm=full, unit_scale=full)
    kw["cos"], kw["sin"] = cases.rope(P, hd, dtype=dtype, device=device)
    kw.update({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in extra.items()})
    return kw


def assert_grads_match(name: str, kw: dict, backend: str, dtype: torch.dtype,
                       truth=reference.masked_attention) -> tuple[torch.Tensor, dict]:
    """cases.assert_grads_match with a floor of two epsilons on fp16/bf16 tolerances (see the module
    docstring), against ``truth`` (a function of masked_attention's keyword arguments: the reference
    by default); returns the backend's output and gradients."""
    ref_out, ref_grads, tols = cases.grad_tolerances(truth, kw, WRT, dtype)
    if dtype != torch.float32:
        tols = {k: max(v, 2 * torch.finfo(dtype).eps) for k, v in tols.items()}
    out, grads = cases.forward_backward(lambda **k: ops.masked_attention(**k, backend=backend), kw, WRT)
    assert out.dtype == dtype
    cases.assert_close(f"{name} output", ref_out, out, tols["out"])
    for k, g in grads.items():
        assert g.dtype == kw[k].dtype, f"{name} d{k}: dtype {g.dtype} != input's {kw[k].dtype}"
        cases.assert_close(f"{name} d{k}", ref_grads[k], g, tols[k])
    return out, grads


def blind_rows(kw: dict) -> torch.Tensor:
    """(B, T) bool: the query rows that see no key."""
    T_ = kw["x"].shape[2]
    vis = reference.attention_visibility(T_, kw.get("attention_mask"), kw.get("window"), kw["x"].device)
    return ~vis.any(-1).expand(kw["x"].shape[1], T_)


def _cheap_enough(case, target) -> bool:
    return not (cases.interpreted(target) and target.id.endswith("fp16") and case.id not in FP16_ON_INTERPRETER)


@pytest.mark.parametrize("name,backend,device,dtype",
                         cases.cross([pytest.param(n, id=n) for n in SCENARIOS], cases.targets(dtypes=LOW_PRECISION),
                                     _cheap_enough))
def test_matches_reference(name, backend, device, dtype):
    kw = inputs(name, dtype, device)
    out, grads = assert_grads_match(f"{backend} masked_attention {name}", kw, backend, dtype)
    blind = blind_rows(kw)
    assert (out[:, blind] == 0).all(), "a query row that sees no key must give zeros"
    assert (out[kw["keep_count"] == 0] == 0).all(), "a sample keeping no group must give zeros"
    if "attention_mask" in kw:  # a row whose every key is padding: no output and no gradient through it
        dead = ~kw["attention_mask"].any(-1)
        assert (grads["x"][:, dead] == 0).all(), "a fully padded row passes no gradient to x"


LONG = {  # backend -> (S, B, T, d, G, r, hd): sequences past the C++ query chunks (128) and Triton tiles (32)
    "cpp": (2, 2, 300, 24, 2, 2, 8),
    "triton-cpu": (2, 1, 70, 16, 1, 2, 8),
    "triton-cuda": (3, 2, 200, 64, 2, 2, 64),
}


@pytest.mark.parametrize("window", [pytest.param(5, id="window-5"), pytest.param(40, id="window-40"),
                                    pytest.param(None, id="no-window")])
@pytest.mark.parametrize("backend,device,dtype", [
    pytest.param("cpp", "cpu", torch.float32, id="cpp-fp32", marks=cases.needs_cpp),
    pytest.param("cpp", "cpu", torch.bfloat16, id="cpp-bf16", marks=cases.needs_cpp),
    pytest.param("triton", "cpu", torch.float32, id="triton-cpu-fp32", marks=cases.needs_interpreter),
    pytest.param("triton", "cuda", torch.bfloat16, id="triton-cuda-bf16", marks=pytest.mark.gpu)])
def test_long_sequences_with_window_and_padding(backend, device, dtype, window):
    """A window far below T skips keys (C++: per query chunk; Triton: whole tiles); padding on both
    sides and packed, shifted positions on top."""
    key = backend if backend == "cpp" else f"triton-{device}"
    S_, B_, T_, d, G_, r, hd = LONG[key]
    kw = cases.attention_inputs(S_, B_, T_, d, G_, r, hd, 0.6, dtype=dtype, device=device, seed=42, bias=True,
                                qk_norm=True, unit_scale=True)
    mask = torch.ones(B_, T_, dtype=torch.bool)
    mask[0, :T_ // 3] = False  # a long left padding: whole tiles of padded keys
    mask[-1, T_ - 7:] = False
    pos = _packed(B_, T_, [[T_ // 2], [T_ // 4]][:B_]) + 3
    kw["cos"], kw["sin"] = cases.rope(T_ + 3, hd, dtype=dtype, device=device)
    kw.update(position_ids=pos.to(device), attention_mask=mask.to(device), window=window)
    out, _ = assert_grads_match(f"{backend} masked_attention long window={window}", kw, backend, dtype)
    assert (out[:, blind_rows(kw)] == 0).all()


@pytest.mark.parametrize("backend,device,dtype", cases.targets(reference_backend=True, dtypes=LOW_PRECISION))
def test_defaults_are_the_same_bits(backend, device, dtype):
    """position_ids=arange (int64 or int32, with more cos/sin rows than T), attention_mask=None and
    window=None are the call without them, bit for bit, forward and backward; so is a window of T
    or more on the fast backends (the reference computes it through its explicit mask: close)."""
    kw = cases.attention_inputs(S, B, T, D, G, R, HD, 0.5, dtype=dtype, device=device, seed=43, bias=True,
                                qk_norm=True, unit_scale=True)
    base_out, base_grads = cases.forward_backward(lambda **k: ops.masked_attention(**k, backend=backend), kw, WRT)
    longer = cases.rope(T + 5, HD, dtype=dtype, device=device)  # the same first T rows, then 5 more
    cos, sin = (torch.cat((kw[k], t[T:])) for k, t in zip(("cos", "sin"), longer))
    arange = torch.arange(T, device=device).expand(B, T)
    same = [dict(position_ids=arange), dict(position_ids=arange.int(), window=None, attention_mask=None),
            dict(cos=cos, sin=sin), dict(cos=cos, sin=sin, position_ids=arange)]
    windows = [dict(window=T), dict(window=T + 5)]
    extras = same + windows
    if backend == "triton" and device == "cpu":  # the interpreter is slow: the widest of each kind
        extras = [same[1], same[3], windows[1]]
    for extra in extras:
        out, grads = cases.forward_backward(lambda **k: ops.masked_attention(**k, backend=backend), {**kw, **extra},
                                            WRT)
        what = ", ".join(k if k not in ("cos", "sin", "position_ids") else f"{k}{tuple(v.shape)} {v.dtype}"
                         for k, v in extra.items())
        if backend == "reference" and "window" in extra:
            cases.assert_close(f"{what}", base_out, out, 1e-5 if dtype == torch.float32 else 2e-3)
            continue
        assert torch.equal(out, base_out), f"{backend}: output with {what} differs from the default call"
        for k in WRT:
            assert torch.equal(grads[k], base_grads[k]), f"{backend}: d{k} with {what} differs from the default call"


@pytest.mark.parametrize("backend,device,dtype", cases.targets(reference_backend=True, dtypes=(torch.float32,)))
def test_full_and_empty_attention_masks(backend, device, dtype):
    """An all-True attention_mask is no padding (close to the call without it); an all-False one
    hides every key: zero output and zero gradients, no NaN."""
    kw = cases.attention_inputs(S, B, T, D, G, R, HD, 0.5, dtype=dtype, device=device, seed=44, bias=True,
                                qk_norm=True, unit_scale=True)
    run = lambda **k: ops.masked_attention(**k, backend=backend)  # noqa: E731
    base = run(**kw)
    full = run(**kw, attention_mask=torch.ones(B, T, dtype=torch.bool, device=device))
    cases.assert_close(f"{backend} all-True attention_mask", base, full, 1e-5)
    out, grads = cases.forward_backward(run, {**kw, "attention_mask": torch.zeros(B, T, dtype=torch.bool,
                                                                                  device=device)}, WRT)
    assert (out == 0).all(), "no visible key anywhere: the output must be zeros"
    for k, g in grads.items():
        assert (g == 0).all(), f"no visible key anywhere: d{k} must be zeros"


def test_reference_window_and_padding_convention():
    """The visibility the docstring states: key s is seen by query t iff s <= t, t - s < window and
    attention_mask[b, s]; window 1 is the diagonal, window >= T plain causal."""
    T_ = 6
    mask = torch.tensor([[False, True, True, True, True, True], [True] * 4 + [False] * 2])
    vis = reference.attention_visibility(T_, mask, 3)
    for b in range(2):
        for t in range(T_):
            for s in range(T_):
                assert bool(vis[b, t, s]) == (s <= t and t - s < 3 and bool(mask[b, s])), (b, t, s)
    assert torch.equal(reference.attention_visibility(T_, window=1)[0], torch.eye(T_, dtype=torch.bool))
    causal = torch.ones(T_, T_, dtype=torch.bool).tril()
    assert torch.equal(reference.attention_visibility(T_, window=T_)[0], causal)
    assert torch.equal(reference.attention_visibility(T_)[0], causal)


def test_window_convention_is_hugging_faces():
    """transformers' own mask functions (sliding_window_causal_mask_function and
    padding_mask_function of masking_utils, as Mistral and Gemma 3 use them) give the same
    visibility as ours for windows of 1 to T + 1."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    T_ = 7
    pad = torch.tensor([[False, False, True, True, True, True, True], [True] * 5 + [False] * 2])
    b, q, kv = torch.arange(2)[:, None, None], torch.arange(T_)[None, :, None], torch.arange(T_)[None, None, :]
    for window in range(1, T_ + 2):
        hf = masking_utils.and_masks(masking_utils.sliding_window_causal_mask_function(window),
                                     masking_utils.padding_mask_function(pad))
        theirs = hf(b, torch.tensor(0), q, kv).expand(2, T_, T_)  # (batch, query, key), index-based
        assert torch.equal(reference.attention_visibility(T_, pad, window), theirs), f"window {window}"


@pytest.mark.parametrize("backend", [pytest.param("reference"), pytest.param("cpp", marks=cases.needs_cpp),
                                     pytest.param("triton", marks=cases.needs_interpreter)])
def test_matches_hugging_face_mistral_with_sliding_window_and_padding(backend):
    """A tiny Hugging Face Mistral with sliding_window=3 run by transformers itself on a left- and a
    right-padded batch (its own padding mask, its own positions for the left padding, shifted by 5):
    the first layer's attention output equals masked_attention's with every group kept, the same
    attention_mask, position_ids and window=3, on every row that sees a key."""
    pytest.importorskip("transformers")
    from tests.tiny import tiny_model

    import bpp_kernels as K

    model = tiny_model("mistral", sliding_window=3)
    attn, norm = model.model.layers[0].self_attn, model.model.layers[0].input_layernorm
    T_, hd = 8, attn.head_dim
    G_ = attn.k_proj.out_features // hd
    mask = torch.ones(2, T_, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[1, T_ - 2:] = False  # right padding
    position_ids = _left_padded_positions(mask) + 5
    seen = {}
    hooks = [norm.register_forward_hook(lambda m, i, o: seen.setdefault("x", o)),
             attn.register_forward_hook(lambda m, i, o: seen.setdefault("att", o[0]))]
    ids = torch.randint(3, 301, (2, T_), generator=torch.Generator().manual_seed(48))
    with torch.no_grad():
        try:
            model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids)
        finally:
            for h in hooks:
                h.remove()
        P = int(position_ids.max()) + 1
        cos, sin = model.model.rotary_emb(seen["x"], torch.arange(P)[None])
        w_qkv, w_o_t, _ = K.pack_attention(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                                           attn.o_proj.weight, G_)
        keep_idx, keep_count = K.mask_to_index(torch.ones(1, G_, dtype=torch.bool))
        ours = ops.masked_attention(seen["x"][None], w_qkv, w_o_t, cos[0], sin[0], keep_idx, keep_count,
                                    scale=float(attn.scaling), position_ids=position_ids, attention_mask=mask,
                                    window=3, backend=backend)[0]
    sees = ~blind_rows(dict(x=seen["x"][None], attention_mask=mask, window=3))
    assert not sees[0, :3].any() and sees.sum() == 2 * T_ - 3  # the left padding's own queries see nothing
    torch.testing.assert_close(ours[sees], seen["att"][sees], rtol=1e-4, atol=1e-5)
    assert (ours[~sees] == 0).all()


@pytest.mark.parametrize("name", ["all-three", "fully-padded-row"])
def test_reference_gradcheck(name):
    """The reference's explicit masked softmax is differentiable in float64 (finite differences),
    rows that see no key included."""
    kw = cases.to_float64(inputs(name, S=2, B=2, T=5, d=4, G=2, r=2, hd=4, seed=47))
    names = [k for k in WRT if kw.get(k) is not None]
    leaves = [kw[k].detach().requires_grad_() for k in names]

    def f(*tensors):
        return reference.masked_attention(**{**kw, **dict(zip(names, tensors))})

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("change,message", [
    (dict(position_ids=torch.zeros(2, 4, dtype=torch.int64)), r"position_ids must be a \(B=2, T=5\) int64 or int32"),
    (dict(position_ids=torch.zeros(5, dtype=torch.int64)), r"position_ids must be a \(B=2, T=5\)"),
    (dict(position_ids=torch.zeros(2, 5)), r"position_ids must be .* got \(2, 5\) torch.float32"),
    (dict(position_ids=torch.full((2, 5), 5)), r"position_ids\[0, 0\] = 5 is outside \[0, 5\)"),
    (dict(position_ids=torch.tensor([[0, 1, 2, 3, 4], [0, 1, -1, 3, 4]])),
     r"position_ids\[1, 2\] = -1 is outside \[0, 5\)"),
    (dict(attention_mask=torch.ones(2, 6, dtype=torch.bool)), r"attention_mask must be a \(B=2, T=5\) bool"),
    (dict(attention_mask=torch.ones(2, 5, dtype=torch.int64)), r"attention_mask must be .* torch.int64"),
    (dict(attention_mask=[[True] * 5] * 2), r"attention_mask must be a \(B=2, T=5\) bool tensor, got list"),
    (dict(window=0), "window must be a positive int or None, got 0"),
    (dict(window=-3), "window must be a positive int or None, got -3"),
    (dict(window=2.0), "window must be a positive int or None, got 2.0"),
    (dict(window=True), "window must be a positive int or None, got True"),
    (dict(window="3"), "window must be a positive int or None, got '3'"),
], ids=["pos-shape", "pos-1d", "pos-float", "pos-past-table", "pos-negative", "mask-shape", "mask-int", "mask-list",
        "window-0", "window-negative", "window-float", "window-bool", "window-str"])
@pytest.mark.parametrize("backend", [pytest.param("reference"), pytest.param("cpp", marks=cases.needs_cpp),
                                     pytest.param("triton", marks=cases.needs_interpreter)])
def test_bad_inputs_say_what_is_wrong(backend, change, message):
    kw = cases.attention_inputs(2, 2, 5, 16, 2, 2, 8, 0.5)
    with pytest.raises(ValueError, match=message) as err:
        ops.masked_attention(**kw, **change, backend=backend)
    assert "\n" not in str(err.value), "a one-line message"


def test_short_rope_tables_are_refused():
    kw = cases.attention_inputs(2, 2, 5, 16, 2, 2, 8, 0.5)
    cos, sin = kw["cos"][:4], kw["sin"][:4]
    with pytest.raises(ValueError, match=r"need a row per position 0..T-1 \(T=5\) without position_ids, got 4 rows"):
        ops.masked_attention(**{**kw, "cos": cos, "sin": sin})
    # with position_ids, 4 rows serve positions 0..3
    y = ops.masked_attention(**{**kw, "cos": cos, "sin": sin}, position_ids=torch.tensor([[0, 1, 2, 3, 3]] * 2))
    assert torch.isfinite(y).all()


@cases.needs_cpp
def test_cpp_checks_positions_even_unchecked():
    """check=False skips the Python check; the C++ op still refuses to read past the tables."""
    kw = cases.attention_inputs(2, 2, 5, 16, 2, 2, 8, 0.5)
    bad = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 3, 9]])
    with pytest.raises(RuntimeError, match=r"position_ids\[1, 4\] = 9 is outside \[0, 5\)"):
        ops.masked_attention(**kw, position_ids=bad, check=False, backend="cpp")
    with pytest.raises(RuntimeError, match="window must be positive"):
        cpp.masked_attention(**kw, window=-1)


@cases.needs_cpp
def test_compiled_op_checks_positions_on_the_device():
    kw = cases.attention_inputs(2, 1, 5, 16, 2, 2, 8, 0.5)
    f = torch.compile(lambda **k: ops.masked_attention(**k, backend="cpp"), fullgraph=True)
    good = torch.arange(5)[None]
    assert f(**kw, position_ids=good, window=2).shape == (2, 1, 5, 16)
    with pytest.raises(RuntimeError, match=r"position_ids outside \[0, 5\)"):
        f(**kw, position_ids=good + 1, window=2)


@pytest.mark.parametrize("backend,device", [pytest.param("cpp", "cpu", marks=cases.needs_cpp),
                                            pytest.param("triton", "cpu", marks=cases.needs_interpreter),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_forward_and_backward_compile_without_graph_break(backend, device):
    kw = inputs("all-three", device=device, seed=45, S=2, T=6)
    cases.assert_compiled_matches_eager(lambda **k: ops.masked_attention(**k, backend=backend), kw, WRT)


@pytest.mark.gpu
def test_cuda_positions_are_checked_on_the_device_without_a_sync():
    """Good positions: no host sync (the check is an asynchronous device assertion)."""
    kw = inputs("all-three", dtype=torch.bfloat16, device="cuda", seed=46)
    ops.masked_attention(**kw, backend="triton")  # compile first: the first launch may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.masked_attention(**kw, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
