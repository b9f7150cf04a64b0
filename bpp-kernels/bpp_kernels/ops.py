"""Public functional API of bpp_kernels: one function per op, dispatched to a backend.

Backends: ``reference`` (plain PyTorch, :mod:`bpp_kernels.reference`), ``cpp`` (the C++
extension ``bpp_kernels._C``, CPU tensors, wrapped in :mod:`bpp_kernels.cpp`) and ``triton``
(one module per kernel family under :mod:`bpp_kernels.triton`; CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``).

Choice: the ``backend=`` argument of a call (strict: an error if that backend lacks the op),
else the environment variable ``BPP_KERNELS_BACKEND`` in {auto, reference, cpp, triton}
(a backend lacking an op falls back to reference for it), where ``auto`` means triton for
CUDA tensors and cpp for CPU tensors when built, else reference.
:func:`backend_info` tells what each op resolves to on this machine.

Dtypes: float32, float16 and bfloat16 on every backend; float64 is computed in float64 by the
reference (inputs in float64 go there unless another backend is named, which is an error).

Gradients: every op but :func:`mask_to_index` is differentiable on every backend, first order;
a batch that keeps no unit gives zero gradients (never ``None``) on every backend.
The reference is plain autograd; the C++ and Triton ops each have a backward op beside the
forward op, recomputing what it needs from the saved inputs (C++ masked_swiglu saves its kept
channels' gate/up projections instead), and one wiring per op
(:mod:`bpp_kernels._autograd`: fake implementations and ``torch.library.register_autograd``)
ties either backend's pair, so eager autograd and ``torch.compile`` both use them. The backward
runs on the backend that ran the forward.
"""
from __future__ import annotations

import numbers
import os

import torch

from . import reference

BACKENDS = ("reference", "cpp", "triton")
ENV_VAR = "BPP_KERNELS_BACKEND"

# op name -> module under bpp_kernels.triton that defines a function of the same name
_TRITON_MODULE = {
    "mask_to_index": "mask_index",
    "rms_norm": "rmsnorm",
    "add_rms_norm": "rmsnorm",
    "masked_swiglu": "masked_mlp",
    "masked_mlp": "ungated_mlp",
    "layer_norm": "layernorm",
    "masked_attention": "masked_attention",
    "linear_cross_entropy": "linear_cross_entropy",
}
OPS = tuple(_TRITON_MODULE)


# backend modules by name, loaded on first use (a plain dict, not functools.cache: torch.compile
# traces through the dispatch, and it warns about cache wrappers)
_LOADED: dict = {}


def _cpp_module():
    if "cpp" not in _LOADED:
        try:
            from . import cpp  # loads bpp_kernels._C
        except (ImportError, OSError):
            cpp = None
        _LOADED["cpp"] = cpp if getattr(cpp, "AVAILABLE", False) else None
    return _LOADED["cpp"]


def _triton_modules() -> dict | None:
    if "triton" not in _LOADED:
        # plain import statements (not importlib), so torch.compile traces through the dispatch
        try:
            from .triton import (layernorm, linear_cross_entropy, mask_index, masked_attention, masked_mlp, rmsnorm,
                                 ungated_mlp)
        except ImportError:
            _LOADED["triton"] = None
        else:
            _LOADED["triton"] = dict(mask_index=mask_index, rmsnorm=rmsnorm, masked_mlp=masked_mlp,
                                     masked_attention=masked_attention, linear_cross_entropy=linear_cross_entropy,
                                     ungated_mlp=ungated_mlp, layernorm=layernorm)
    return _LOADED["triton"]


def _triton_impl(op: str):
    modules = _triton_modules()
    return None if modules is None else getattr(modules[_TRITON_MODULE[op]], op, None)


def _impl(op: str, backend: str):
    if backend == "reference":
        return getattr(reference, op)
    if backend == "cpp":
        module = _cpp_module()
        return getattr(module, op, None) if module is not None else None
    return _triton_impl(op)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def requested_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of auto, {', '.join(BACKENDS)}")
    return value


def resolve(op: str, device_type: str, backend: str | None = None) -> str:
    """The backend that runs ``op`` on tensors of ``device_type`` ('cpu' or 'cuda')."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
        if _impl(op, backend) is None:
            raise RuntimeError(f"bpp_kernels: backend {backend!r} has no {op} here; see backend_info()")
        if backend == "cpp" and device_type != "cpu":
            raise RuntimeError(f"bpp_kernels: the cpp backend runs CPU tensors only, got {device_type}")
        if backend == "triton" and device_type == "cpu" and not _interpreting():
            raise RuntimeError("bpp_kernels: triton runs CPU tensors only under TRITON_INTERPRET=1")
        return backend
    wanted = requested_backend()
    if wanted == "auto":
        order = ("triton", "reference") if device_type == "cuda" else ("cpp", "reference")
    else:
        order = (wanted, "reference")
    for name in order:
        if name == "cpp" and device_type != "cpu":
            continue
        if name == "triton" and device_type == "cpu" and not _interpreting():
            continue
        if _impl(op, name) is not None:
            return name
    return "reference"


def backend_info() -> dict[str, dict[str, str]]:
    """``{op: {"cpu": backend, "cuda": backend}}`` under the current settings.

    Example::

        >>> import bpp_kernels as K
        >>> info = K.backend_info()
        >>> sorted(info)
        ['add_rms_norm', 'layer_norm', 'linear_cross_entropy', 'mask_to_index', 'masked_attention', 'masked_mlp', 'masked_swiglu', 'rms_norm']
        >>> info["masked_swiglu"]["cpu"] in K.BACKENDS  # 'cpp' when the extension is built, else 'reference'
        True
    """
    return {op: {dev: resolve(op, dev) for dev in ("cpu", "cuda")} for op in OPS}


def _call(op: str, x: torch.Tensor, backend: str | None, *args, float64: bool | None = None, **kwargs):
    """Run ``op`` on the backend chosen for x's device. ``float64``: whether the call involves
    float64 (default: x is float64), which only the reference computes."""
    name = resolve(op, x.device.type, backend)
    if float64 is None:
        float64 = x.dtype == torch.float64
    if float64 and name != "reference":
        # the C++ and Triton kernels compute in float32 at most: float64 is the reference's
        if backend is not None:
            raise ValueError(f"{op}: the {name} backend computes in float32 at most; float64 inputs run on "
                             "backend='reference' (what they get without a backend=)")
        name = "reference"
    return _impl(op, name)(*args, **kwargs)


def _check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{op}: {msg}")


def _check_index(op: str, keep_idx: torch.Tensor, keep_count: torch.Tensor, S: int, n: int,
                 unit_scale: torch.Tensor | None, x: torch.Tensor, check: bool = True) -> None:
    _check(keep_idx.shape == (S, n), op, f"keep_idx must be (S={S}, n={n}), got {tuple(keep_idx.shape)}")
    _check(keep_count.shape == (S,), op, f"keep_count must be (S={S},), got {tuple(keep_count.shape)}")
    _check(keep_idx.dtype == torch.int32 and keep_count.dtype == torch.int32, op,
           "keep_idx and keep_count must be int32 (use mask_to_index)")
    _check(keep_idx.device == x.device == keep_count.device, op,
           f"keep_idx ({keep_idx.device}) and keep_count ({keep_count.device}) must be on x's device ({x.device})")
    if check:
        check_indices(keep_idx, keep_count, n, op)
    if unit_scale is not None:
        _check(unit_scale.shape == (S, n) and unit_scale.is_floating_point(), op,
               f"unit_scale must be a floating (S={S}, n={n}) tensor aligned with keep_idx, got "
               f"{tuple(unit_scale.shape)} {unit_scale.dtype}")
        _check(unit_scale.device == x.device, op, f"unit_scale is on {unit_scale.device}, x on {x.device}")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_indices(keep_idx: torch.Tensor, keep_count: torch.Tensor, n: int, op: str = "check_indices") -> None:
    """Check the index lists an op reads: every count in [0, n], and each sample's first
    ``keep_count[s]`` entries of ``keep_idx`` in [0, n) and distinct (the entries after them are
    never read). On CPU a ValueError names the first offence; on CUDA (and under torch.compile)
    the check runs on the device without a host sync and fails as a device-side assertion. Cost:
    one pass over ``(S, n)``. The ops call it unless ``check=False``.

    Example::

        >>> import torch, bpp_kernels as K
        >>> keep_idx = torch.tensor([[2, 2, 0]], dtype=torch.int32)
        >>> K.check_indices(keep_idx, torch.tensor([1], dtype=torch.int32), 3)  # reads only keep_idx[0, :1]
        >>> K.check_indices(keep_idx, torch.tensor([2], dtype=torch.int32), 3)
        Traceback (most recent call last):
            ...
        ValueError: check_indices: unit 2 appears 2 times among the 2 kept entries of keep_idx[0]
    """
    S = keep_idx.shape[0]
    live = torch.arange(n, device=keep_idx.device).unsqueeze(0) < keep_count.unsqueeze(1)
    idx = keep_idx.long()
    in_range = (idx >= 0) & (idx < n)
    out_of_range = live & ~in_range
    bad_count = (keep_count < 0) | (keep_count > n)
    slot = torch.where(live & in_range, idx, torch.full_like(idx, n))
    seen = torch.zeros(S, n + 1, dtype=torch.int32, device=idx.device).scatter_add_(
        1, slot, torch.ones_like(slot, dtype=torch.int32))[:, :n]
    repeated = seen > 1
    if keep_idx.device.type != "cpu" or _compiling():
        ok = ~(bad_count.any() | out_of_range.any() | repeated.any())
        torch._assert_async(ok, f"{op}: keep_count outside [0, {n}], or keep_idx outside [0, {n}) or repeated "
                                "among the kept entries")
        return
    if bool(bad_count.any()):
        s = int(bad_count.nonzero()[0, 0])
        raise ValueError(f"{op}: keep_count[{s}] = {int(keep_count[s])} is outside [0, {n}]")
    if bool(out_of_range.any()):
        s, j = (int(v) for v in out_of_range.nonzero()[0])
        raise ValueError(f"{op}: keep_idx[{s}, {j}] = {int(keep_idx[s, j])} is outside [0, {n})")
    if bool(repeated.any()):
        s, u = (int(v) for v in repeated.nonzero()[0])
        raise ValueError(f"{op}: unit {u} appears {int(seen[s, u])} times among the {int(keep_count[s])} kept "
                         f"entries of keep_idx[{s}]")


def mask_to_index(mask: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask (S, n) bool`` -> ``keep_idx (S, n) int32`` (a permutation, kept units first in
    ascending order), ``keep_count (S,) int32``. Runs on mask's device, no host sync.

    Example::

        >>> import torch, bpp_kernels as K
        >>> mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
        >>> keep_idx, keep_count = K.mask_to_index(mask)
        >>> keep_count
        tensor([2, 1], dtype=torch.int32)
        >>> keep_idx[0, :2].tolist(), keep_idx[1, :1].tolist(), sorted(keep_idx[1].tolist())
        ([0, 2], [3], [0, 1, 2, 3])
    """
    _check(mask.dim() == 2 and mask.dtype == torch.bool, "mask_to_index",
           f"mask must be a 2-D bool tensor (S, n), got {tuple(mask.shape)} {mask.dtype}")
    return _call("mask_to_index", mask, backend, mask)


def _check_norm(op: str, x: torch.Tensor, weight: torch.Tensor, out_dtype, residual: torch.Tensor | None = None):
    _check(x.dim() >= 1, op, f"x must be (..., d), got {tuple(x.shape)}")
    d = x.shape[-1]
    _check(weight.shape == (d,), op, f"weight must be ({d},), got {tuple(weight.shape)}")
    tensors = {"x": x, "weight": weight} if residual is None else {"x": x, "residual": residual, "weight": weight}
    for name, t in tensors.items():
        _check(t.is_floating_point(), op, f"{name} must be floating, got {t.dtype}")
        _check(t.device == x.device, op, f"{name} is on {t.device}, x on {x.device}")
    _check(out_dtype is None or (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point), op,
           f"out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")


def _norm_float64(out_dtype, *tensors: torch.Tensor) -> bool:
    return out_dtype == torch.float64 or any(t.dtype == torch.float64 for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out_dtype: torch.dtype | None = None,
             backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim, as Hugging Face's Llama computes it: fp32 statistics,
    ``normed = x * rsqrt(mean(x^2) + eps)`` rounded to x's dtype, then ``weight * normed``.

    x ``(..., d)`` fp32/fp16/bf16 (float64 runs on the reference); weight ``(d,)`` of any of
    those dtypes. Returns ``(..., d)`` in ``out_dtype`` when given (one conversion at the end, in
    the same pass), else in the dtype weight and x promote to (x's when they agree). A row's result
    depends on that row only. Differentiable in x (gradient in x's dtype) and weight (the backward
    recomputes the statistics). Backends: cpp (CPU), triton (CUDA), reference.

    Example::

        >>> import torch, bpp_kernels as K
        >>> x, weight = torch.randn(2, 3, 8), torch.randn(8)
        >>> y = K.rms_norm(x, weight, 1e-6)
        >>> torch.allclose(y, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight, atol=1e-5)
        True
        >>> K.rms_norm(x, weight, 1e-6, out_dtype=torch.bfloat16).dtype   # fp32 math, bf16 result
        torch.bfloat16
    """
    _check_norm("rms_norm", x, weight, out_dtype)
    return _call("rms_norm", x, backend, x, weight, eps, out_dtype=out_dtype,
                 float64=_norm_float64(out_dtype, x, weight))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 out_dtype: torch.dtype | None = None,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the RMSNorm after it in one pass:
    ``h = x.to(residual.dtype) + residual``, computed and returned in residual's dtype; returns
    ``(rms_norm(h, weight, eps, out_dtype=out_dtype), h)``.

    x and residual ``(..., d)``, each fp32/fp16/bf16, of the same dtype or not (float64 runs on
    the reference): a bf16 computation whose residual stream stays fp32 passes
    ``add_rms_norm(a16, h32, w32, eps, out_dtype=torch.bfloat16)`` and gets the bf16 input of its
    next layer and the fp32 stream, without separate casts. weight ``(d,)``. y is in
    ``out_dtype`` when given, else in the dtype weight and residual promote to (residual's when
    they agree; with x, residual and weight of one dtype everything is as before out_dtype
    existed). Differentiable in x, residual and weight; the gradients come back in their input's
    dtype. Backends: cpp (CPU), triton (CUDA), reference.

    Example::

        >>> import torch, bpp_kernels as K
        >>> x, residual, weight = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(8)
        >>> y, h = K.add_rms_norm(x, residual, weight, 1e-6)
        >>> torch.allclose(h, x + residual), torch.allclose(y, K.rms_norm(x + residual, weight, 1e-6), atol=1e-5)
        (True, True)
        >>> y16, h32 = K.add_rms_norm(x.bfloat16(), residual, weight, 1e-6, out_dtype=torch.bfloat16)
        >>> y16.dtype, h32.dtype, torch.equal(h32, x.bfloat16().float() + residual)
        (torch.bfloat16, torch.float32, True)
    """
    op = "add_rms_norm"
    _check(x.shape == residual.shape, op, f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    _check_norm(op, x, weight, out_dtype, residual)
    return _call(op, x, backend, x, residual, weight, eps, out_dtype=out_dtype,
                 float64=_norm_float64(out_dtype, x, residual, weight))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, *,
               backend: str | None = None) -> torch.Tensor:
    """LayerNorm over the last dim (OPT, GPT-2, Pythia), as ``torch.nn.functional.layer_norm``:
    mean and biased variance in fp32, ``(x - mean) / sqrt(var + eps) * weight + bias`` in fp32,
    one rounding to x's dtype.

    x ``(..., d)`` fp32/fp16/bf16 (float64 runs on the reference); weight ``(d,)``, bias ``(d,)``
    or None, in x's dtype. Returns ``(..., d)`` in x's dtype; a row's result depends on that row
    only. Differentiable in x, weight and bias (the backward recomputes the statistics).
    Backends: cpp (CPU), triton (CUDA), reference.

    Example::

        >>> import torch, bpp_kernels as K
        >>> x, weight, bias = torch.randn(2, 3, 8), torch.randn(8), torch.randn(8)
        >>> y = K.layer_norm(x, weight, bias, 1e-5)
        >>> torch.allclose(y, torch.nn.functional.layer_norm(x, (8,), weight, bias, 1e-5), atol=1e-5)
        True
    """
    op = "layer_norm"
    _check(x.dim() >= 1, op, f"x must be (..., d), got {tuple(x.shape)}")
    d = x.shape[-1]
    _check(weight.shape == (d,), op, f"weight must be ({d},), got {tuple(weight.shape)}")
    _check(bias is None or bias.shape == (d,), op,
           f"bias must be ({d},) or None, got {None if bias is None else tuple(bias.shape)}")
    _check(x.is_floating_point(), op, f"x must be floating, got {x.dtype}")
    _check(weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype), op,
           f"weight and bias must be in x's dtype {x.dtype}, got {weight.dtype} and "
           f"{None if bias is None else bias.dtype}")
    _check(weight.device == x.device and (bias is None or bias.device == x.device), op,
           f"weight and bias must be on x's device ({x.device})")
    _check(eps >= 0, op, f"eps must be >= 0, got {eps}")
    return _call(op, x, backend, x, weight, bias, float(eps))


def masked_mlp(x: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, keep_idx: torch.Tensor,
               keep_count: torch.Tensor, *, b_up: torch.Tensor | None = None, activation: str = "gelu",
               unit_scale: torch.Tensor | None = None, backend: str | None = None, check: bool = True) -> torch.Tensor:
    """Per-sample non-gated MLP (OPT, GPT-2, Pythia) over kept channels only:
    ``y[s] = sum over kept j of a_j * act(x[s] @ w_up[j] + b_up[j]) * w_down_t[j]``.

    x ``(S, ..., d)`` fp32/fp16/bf16 (float64 runs on the reference); w_up ``(m, d)``, w_down_t
    ``(m, d)`` (W_down transposed), b_up ``(m,)`` or None, all in x's dtype, from
    :func:`bpp_kernels.layout.pack_mlp`; keep_idx ``(S, m)`` int32, keep_count ``(S,)`` int32;
    activation ``"gelu"`` (exact, erf: Pythia), ``"gelu_tanh"`` (GPT-2's ``gelu_new``) or
    ``"relu"`` (OPT); unit_scale ``(S, m)`` floating or None: ``a = unit_scale[s, j]`` for the
    j-th kept channel ``keep_idx[s, j]`` (soft masks; None = 1). The down projection's bias is not
    part of the op: the caller adds it. Returns ``(S, ..., d)`` in x's dtype; a sample that keeps
    no channel gets zeros. Pruned channels cost nothing, forward or backward, and their weights
    are never read. Differentiable in x, w_up, w_down_t, b_up and unit_scale. Backends: cpp (CPU),
    triton (CUDA), reference. ``check``: validate keep_idx / keep_count first
    (:func:`check_indices`; False for indices that come from :func:`mask_to_index`).

    Example (an OPT-style MLP, 3 masks over 6 channels in one call; each sample equals the dense
    MLP with its pruned channels zeroed)::

        >>> import torch, bpp_kernels as K
        >>> m, d = 6, 4
        >>> w_up, b_up, w_down = torch.randn(m, d), torch.randn(m), torch.randn(d, m)
        >>> w_up_p, w_down_t, b_up_p = K.pack_mlp(w_up, w_down, b_up)
        >>> mask = torch.tensor([[1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
        >>> keep_idx, keep_count = K.mask_to_index(mask)
        >>> x = torch.randn(3, 2, 5, d)                      # (S, B, T, d)
        >>> y = K.masked_mlp(x, w_up_p, w_down_t, keep_idx, keep_count, b_up=b_up_p, activation="relu")
        >>> y.shape
        torch.Size([3, 2, 5, 4])
        >>> dense = (torch.relu(x @ w_up.T + b_up) * mask[:, None, None]) @ w_down.T
        >>> torch.allclose(y, dense, rtol=1e-4, atol=1e-5), bool(y[2].eq(0).all())
        (True, True)
    """
    op = "masked_mlp"
    _check(x.dim() >= 2, op, f"x must be (S, ..., d), got {tuple(x.shape)}")
    _check(w_down_t.dim() == 2, op, f"w_down_t must be (m, d), got {tuple(w_down_t.shape)}")
    m, d = w_down_t.shape
    _check(w_up.shape == (m, d), op, f"w_up must be ({m}, {d}), got {tuple(w_up.shape)}")
    _check(x.shape[-1] == d, op, f"x's last dim {x.shape[-1]} != hidden size {d}")
    _check(b_up is None or b_up.shape == (m,), op,
           f"b_up must be ({m},) or None, got {None if b_up is None else tuple(b_up.shape)}")
    _check(activation in reference.ACTIVATIONS, op,
           f"activation={activation!r} is not one of {', '.join(reference.ACTIVATIONS)}")
    _check(x.is_floating_point(), op, f"x must be floating, got {x.dtype}")
    _check(x.dtype == w_up.dtype == w_down_t.dtype and (b_up is None or b_up.dtype == x.dtype), op,
           f"x, w_up, w_down_t and b_up must share a dtype, got {x.dtype}, {w_up.dtype}, {w_down_t.dtype}, "
           f"{None if b_up is None else b_up.dtype}")
    _check(w_up.device == x.device and w_down_t.device == x.device and (b_up is None or b_up.device == x.device),
           op, f"w_up, w_down_t and b_up must be on x's device ({x.device})")
    _check_index(op, keep_idx, keep_count, x.shape[0], m, unit_scale, x, check)
    return _call(op, x, backend, x, w_up, w_down_t, keep_idx, keep_count, b_up=b_up, activation=activation,
                 unit_scale=unit_scale)


def masked_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down_t: torch.Tensor, keep_idx: torch.Tensor,
                  keep_count: torch.Tensor, *, unit_scale: torch.Tensor | None = None, activation: str = "silu",
                  backend: str | None = None, check: bool = True) -> torch.Tensor:
    """Per-sample gated MLP over kept channels only: ``down(a * act(gate(x)) * up(x))``.

    x ``(S, ..., d)`` fp32/fp16/bf16; w_gate_up ``(m, 2, d)``, w_down_t ``(m, d)`` from
    :func:`bpp_kernels.layout.pack_swiglu`; keep_idx ``(S, m)`` int32, keep_count ``(S,)`` int32;
    unit_scale ``(S, m)`` floating or None: ``a = unit_scale[s, j]`` for the j-th kept channel
    ``keep_idx[s, j]`` (soft masks; None = 1, the scale-free path).
    ``activation``: the gate's ``act``, ``"silu"`` (SwiGLU: Llama, Mistral, Qwen; the default) or
    ``"gelu_tanh"`` (GeGLU as in Gemma: ``torch.nn.functional.gelu(g, approximate="tanh")``);
    anything else is a ValueError.
    Returns ``(S, ..., d)``; a sample that keeps no channel gets zeros. Pruned channels cost
    nothing, forward or backward. Differentiable in x, w_gate_up, w_down_t and unit_scale.
    ``check``: validate keep_idx / keep_count first (:func:`check_indices`; False for indices
    that come from :func:`mask_to_index`).

    Example (3 masks over 6 channels in one call; each sample equals the dense MLP with its pruned
    channels zeroed)::

        >>> import torch, bpp_kernels as K
        >>> m, d = 6, 4
        >>> w_gate, w_up, w_down = torch.randn(m, d), torch.randn(m, d), torch.randn(d, m)
        >>> w_gate_up, w_down_t = K.pack_swiglu(w_gate, w_up, w_down)
        >>> mask = torch.tensor([[1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
        >>> keep_idx, keep_count = K.mask_to_index(mask)
        >>> x = torch.randn(3, 2, 5, d)                      # (S, B, T, d)
        >>> y = K.masked_swiglu(x, w_gate_up, w_down_t, keep_idx, keep_count)
        >>> y.shape
        torch.Size([3, 2, 5, 4])
        >>> dense = (torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T) * mask[:, None, None]) @ w_down.T
        >>> torch.allclose(y, dense, rtol=1e-4, atol=1e-5), bool(y[2].eq(0).all())
        (True, True)
        >>> y = K.masked_swiglu(x, w_gate_up, w_down_t, keep_idx, keep_count, activation="gelu_tanh")  # GeGLU
        >>> geglu = torch.nn.functional.gelu(x @ w_gate.T, approximate="tanh") * (x @ w_up.T)
        >>> torch.allclose(y, (geglu * mask[:, None, None]) @ w_down.T, rtol=1e-4, atol=1e-5)
        True
    """
    op = "masked_swiglu"
    reference.check_activation(activation, op)
    _check(x.dim() >= 2, op, f"x must be (S, ..., d), got {tuple(x.shape)}")
    m, d = w_down_t.shape
    _check(w_gate_up.shape == (m, 2, d), op, f"w_gate_up must be ({m}, 2, {d}), got {tuple(w_gate_up.shape)}")
    _check(x.shape[-1] == d, op, f"x's last dim {x.shape[-1]} != hidden size {d}")
    _check(x.dtype == w_gate_up.dtype == w_down_t.dtype, op, "x and weights must share a dtype")
    _check_index(op, keep_idx, keep_count, x.shape[0], m, unit_scale, x, check)
    return _call(op, x, backend, x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale=unit_scale,
                 activation=activation)


def masked_attention(x: torch.Tensor, w_qkv: torch.Tensor, w_o_t: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, keep_idx: torch.Tensor, keep_count: torch.Tensor, *,
                     b_qkv: torch.Tensor | None = None, q_norm: torch.Tensor | None = None,
                     k_norm: torch.Tensor | None = None, norm_eps: float = 1e-6, scale: float | None = None,
                     unit_scale: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None, window: int | None = None,
                     head_keep: torch.Tensor | None = None, backend: str | None = None,
                     check: bool = True) -> torch.Tensor:
    """Per-sample causal GQA attention over kept KV groups only, through W_o (no residual).

    x ``(S, B, T, d)``; w_qkv ``(G, (r+2)*hd, d)``, w_o_t ``(G, r*hd, d)``, b_qkv
    ``(G, (r+2)*hd)`` from :func:`bpp_kernels.layout.pack_attention`; cos/sin ``(P, hd)``
    (Hugging Face rotate-half RoPE, one row per position, :func:`rope_tables`) of any floating
    dtype, cast to x's dtype on every backend; q_norm/k_norm ``(hd,)`` per-head RMSNorm (Qwen3);
    keep_idx ``(S, G)`` int32, keep_count ``(S,)`` int32; scale (the softmax scale) defaults
    to hd**-0.5; unit_scale ``(S, G)`` floating or None multiplies the attention output of the
    j-th kept group (all its r query heads) by ``unit_scale[s, j]`` before W_o.

    Positions and masking (the same for every sample; they combine freely):

    - ``position_ids`` ``(B, T)`` int64 or int32, or None: token (b, t) is rotated by row
      ``position_ids[b, t]`` of cos/sin (shifted windows, packed sequences whose positions restart),
      so P >= max(position_ids) + 1. None: positions 0..T-1 (P >= T; the first T rows are used).
      Positions only choose RoPE rows: they never restrict which keys a query sees.
    - ``attention_mask`` ``(B, T)`` bool, or None: a padding mask over keys (True = a real token);
      a key where it is False is never attended, on top of causality.
    - ``window`` positive int, or None: sliding-window attention as in Hugging Face transformers
      (Mistral, Gemma 3: ``masking_utils.sliding_window_overlay``, ``kv_idx > q_idx - sliding_window``): query
      t sees key s only if ``s <= t`` and ``t - s < window`` (window=1: itself only; window >= T is
      plain causal attention). Indices are the tokens' places in x, not their position_ids.

    A query row that sees no key (a fully padded row, or a left-padded row's first tokens) gets
    an attention output of zeros and passes no gradient. The defaults are plain causal attention
    over positions 0..T-1, the same bits as a call without these arguments.

    Query heads inside groups: ``head_keep`` ``(S, G, r)`` bool, or None, on x's device, indexed by
    the original group g and head j of the group (not by keep_idx's slots): query head j of group g
    contributes to sample s only if g is kept for s and ``head_keep[s, g, j]`` (Minitron- or
    LLM-Pruner-style head pruning inside GQA groups). A pruned head's attention output is zero
    before W_o, so its rows of w_qkv (q) and of w_o_t get exactly zero gradient, and a kept group
    with no kept head contributes nothing (its k/v rows get zero gradient too); unit_scale still
    multiplies the kept heads of a kept group. The C++ and Triton backends skip a pruned head's
    work (its q projection, QK^T, softmax, PV and W_o rows; a group with no kept head, its K/V
    projection too). None keeps every head of every kept group: the same bits as a call without it,
    and so is an all-True head_keep. A mask over the G*r query heads in Hugging Face's order
    (head h in group h // r) is ``head_mask.view(S, G, r)``: no helper needed. Its shape, dtype and
    device are checked on every call, ``check=False`` or not (a ValueError naming the expected shape).

    Returns ``(S, B, T, d)``; a sample that keeps no group (or no head) gets zeros. Differentiable
    in x, w_qkv, w_o_t, b_qkv, q_norm, k_norm and unit_scale; cos, sin, position_ids,
    attention_mask and head_keep are constants. ``check``: validate keep_idx / keep_count first
    (:func:`check_indices`) and that every position has a row of cos/sin (a ValueError on CPU, a
    device-side assertion on CUDA); with ``check=False`` the C++ op still refuses an out-of-range
    position (RuntimeError) and Triton clamps it into the table (a wrong result, no stray read).

    Example (2 KV groups of 2 query heads; sample 0 keeps group 0, sample 1 both)::

        >>> import torch, bpp_kernels as K
        >>> d, H, G, hd, T = 8, 4, 2, 4, 5
        >>> w_q, w_k, w_v = torch.randn(H * hd, d), torch.randn(G * hd, d), torch.randn(G * hd, d)
        >>> w_qkv, w_o_t, _ = K.pack_attention(w_q, w_k, w_v, torch.randn(d, H * hd), num_kv_groups=G)
        >>> cos, sin = K.rope_tables(T, hd)
        >>> keep_idx, keep_count = K.mask_to_index(torch.tensor([[True, False], [True, True]]))
        >>> x = torch.randn(2, 1, T, d)                      # (S, B, T, d)
        >>> y = K.masked_attention(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count)
        >>> y.shape
        torch.Size([2, 1, 5, 8])
        >>> ref = K.masked_attention(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, backend="reference")
        >>> torch.allclose(y, ref, rtol=1e-4, atol=1e-5)
        True

    Shifted positions, left padding and a sliding window of 3 tokens::

        >>> cos, sin = K.rope_tables(T + 7, hd)              # rows for positions 0..11
        >>> position_ids = torch.arange(7, 7 + T)[None]      # (B, T): this window starts at position 7
        >>> attention_mask = torch.tensor([[False, True, True, True, True]])   # token 0 is padding
        >>> extras = dict(position_ids=position_ids, attention_mask=attention_mask, window=3)
        >>> y = K.masked_attention(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, **extras)
        >>> bool(y[:, 0, 0].eq(0).all())                     # query 0 sees only the padded key 0: zeros
        True

    Pruning query heads inside groups: sample 0 keeps head 1 of group 0; sample 1 keeps group 0
    whole and head 0 of group 1 (a mask over the H = G*r query heads reshapes to (S, G, r))::

        >>> head_mask = torch.tensor([[False, True, True, True], [True, True, True, False]])   # (S, H)
        >>> kw = dict(head_keep=head_mask.view(2, G, H // G))   # head h is head h % r of group h // r
        >>> y = K.masked_attention(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, **kw)
        >>> ref = K.masked_attention(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, **kw, backend="reference")
        >>> torch.allclose(y, ref, rtol=1e-4, atol=1e-5)
        True
    """
    op = "masked_attention"
    _check(x.dim() == 4, op, f"x must be (S, B, T, d), got {tuple(x.shape)}")
    S, B, T, d = x.shape
    _check(w_qkv.dim() == 3 and w_qkv.shape[2] == d, op, f"w_qkv must be (G, (r+2)*hd, {d}), got {tuple(w_qkv.shape)}")
    G, rows = w_qkv.shape[:2]
    _check(cos.dim() == 2 and cos.shape == sin.shape, op,
           f"cos and sin must be (P, hd), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    _check(position_ids is not None or cos.shape[0] >= T, op,
           f"cos and sin need a row per position 0..T-1 (T={T}) without position_ids, got {cos.shape[0]} rows")
    hd = cos.shape[1]
    _check(rows % hd == 0 and rows // hd >= 3, op, f"w_qkv rows {rows} are not (r+2)*hd with hd={hd}")
    r = rows // hd - 2
    _check(w_o_t.shape == (G, r * hd, d), op, f"w_o_t must be ({G}, {r * hd}, {d}), got {tuple(w_o_t.shape)}")
    _check(b_qkv is None or b_qkv.shape == (G, rows), op, f"b_qkv must be ({G}, {rows})")
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        _check(w is None or w.shape == (hd,), op, f"{name} must be ({hd},)")
    _check(x.dtype == w_qkv.dtype == w_o_t.dtype, op, "x and weights must share a dtype")
    _check(not (cos.requires_grad or sin.requires_grad), op,
           "cos and sin are RoPE constants and get no gradient; pass them detached")
    _check_index(op, keep_idx, keep_count, S, G, unit_scale, x, check)
    _check_positions_and_masks(op, position_ids, attention_mask, window, B, T, cos.shape[0], x, check)
    _check_head_keep(op, head_keep, S, G, r, x)
    extra = {}  # the new keywords only when given: a call without them is the same call as before
    if position_ids is not None:
        extra["position_ids"] = position_ids
    if attention_mask is not None:
        extra["attention_mask"] = attention_mask
    if window is not None:
        extra["window"] = int(window)
    if head_keep is not None:
        extra["head_keep"] = head_keep
    return _call(op, x, backend, x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count,
                 b_qkv=b_qkv, q_norm=q_norm, k_norm=k_norm, norm_eps=norm_eps, scale=scale, unit_scale=unit_scale,
                 **extra)


def _check_positions_and_masks(op: str, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                               window, B: int, T: int, P: int, x: torch.Tensor, check: bool) -> None:
    """masked_attention's position_ids ``(B, T)`` integer in [0, P) (the range checked unless
    ``check=False``: a ValueError on CPU, a device-side assertion on CUDA and under torch.compile),
    attention_mask ``(B, T)`` bool and window a positive int or None."""
    if window is not None:
        _check(isinstance(window, numbers.Integral) and not isinstance(window, bool) and window > 0, op,
               f"window must be a positive int or None, got {window!r}")
    if attention_mask is not None:
        _check(torch.is_tensor(attention_mask) and attention_mask.dtype == torch.bool
               and tuple(attention_mask.shape) == (B, T), op,
               f"attention_mask must be a (B={B}, T={T}) bool tensor, got "
               f"{_describe(attention_mask)}")
        _check(attention_mask.device == x.device, op, f"attention_mask is on {attention_mask.device}, x on {x.device}")
    if position_ids is None:
        return
    _check(torch.is_tensor(position_ids) and position_ids.dtype in (torch.int64, torch.int32)
           and tuple(position_ids.shape) == (B, T), op,
           f"position_ids must be a (B={B}, T={T}) int64 or int32 tensor, got {_describe(position_ids)}")
    _check(position_ids.device == x.device, op, f"position_ids is on {position_ids.device}, x on {x.device}")
    if not check or position_ids.numel() == 0:
        return
    bad = (position_ids < 0) | (position_ids >= P)
    if position_ids.device.type != "cpu" or _compiling():
        torch._assert_async(~bad.any(), f"{op}: position_ids outside [0, {P}) (cos/sin have {P} rows)")
        return
    if bool(bad.any()):
        b, t = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{op}: position_ids[{b}, {t}] = {int(position_ids[b, t])} is outside [0, {P}) "
                         f"(cos/sin have {P} rows)")


def _check_head_keep(op: str, head_keep, S: int, G: int, r: int, x: torch.Tensor) -> None:
    """masked_attention's head_keep: a ``(S, G, r)`` bool tensor on x's device, or None."""
    if head_keep is None:
        return
    _check(torch.is_tensor(head_keep) and head_keep.dtype == torch.bool and tuple(head_keep.shape) == (S, G, r), op,
           f"head_keep must be a (S={S}, G={G}, r={r}) bool tensor, got {_describe(head_keep)}")
    _check(head_keep.device == x.device, op, f"head_keep must be on x's device ({x.device}), got {head_keep.device}")


def _describe(t) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if torch.is_tensor(t) else type(t).__name__


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                         chunk_size: int = 4096, backend: str | None = None) -> torch.Tensor:
    """Per-row cross-entropy of ``h @ weight.T`` (fp32 loss) without materialising all logits.

    h ``(N, d)``; weight ``(V, d)``; target ``(N,)`` int64 in [0, V) or ignore_index.
    Returns ``(N,)`` float32; ignored rows get 0. Differentiable in h and weight: the C++ and
    Triton backward recompute the logits tile by tile (C++) or chunk by chunk (Triton, at most
    ``chunk_size`` rows) and never hold all of them; the reference's autograd keeps every
    chunk's logits. chunk_size bounds the rows the reference holds logits for at once; the C++
    and Triton forward kernels work in fixed tiles of their own.

    Example::

        >>> import torch, bpp_kernels as K
        >>> h, weight = torch.randn(6, 8), torch.randn(50, 8)
        >>> target = torch.tensor([3, 7, -100, 0, 49, 1])    # -100: an ignored row, loss 0
        >>> loss = K.linear_cross_entropy(h, weight, target)
        >>> full = torch.nn.functional.cross_entropy(h @ weight.T, target, reduction="none")
        >>> torch.allclose(loss, full, rtol=1e-4, atol=1e-4), loss[2].item()
        (True, 0.0)
    """
    op = "linear_cross_entropy"
    _check(h.dim() == 2 and weight.dim() == 2 and h.shape[1] == weight.shape[1], op,
           f"h must be (N, d) and weight (V, d), got {tuple(h.shape)} and {tuple(weight.shape)}")
    _check(target.shape == (h.shape[0],), op, f"target must be ({h.shape[0]},), got {tuple(target.shape)}")
    _check(target.dtype == torch.int64, op, f"target must be int64, got {target.dtype}")
    _check(h.dtype == weight.dtype, op, f"h and weight must share a dtype, got {h.dtype} and {weight.dtype}")
    _check(chunk_size > 0, op, "chunk_size must be positive")
    return _call(op, h, backend, h, weight, target, ignore_index=ignore_index, chunk_size=chunk_size)
