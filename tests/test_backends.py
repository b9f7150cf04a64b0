"""Backend selection: BPP_KERNELS_BACKEND, the backend= argument, and backend_info()."""
import pytest
import torch

import bpp_kernels
from bpp_kernels import ops


def test_backend_info_names_a_backend_for_every_op_and_device():
    info = bpp_kernels.backend_info()
    assert set(info) == set(ops.OPS)
    for op, per_device in info.items():
        assert set(per_device) == {"cpu", "cuda"}
        assert all(b in ops.BACKENDS for b in per_device.values()), (op, per_device)


def test_env_reference_forces_reference(monkeypatch):
    monkeypatch.setenv("BPP_KERNELS_BACKEND", "reference")
    assert all(v == {"cpu": "reference", "cuda": "reference"} for v in bpp_kernels.backend_info().values())


def test_env_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("BPP_KERNELS_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="BPP_KERNELS_BACKEND"):
        ops.mask_to_index(torch.zeros(2, 3, dtype=torch.bool))


def test_explicit_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="not one of"):
        ops.mask_to_index(torch.zeros(2, 3, dtype=torch.bool), backend="nope")


def test_auto_on_cpu_prefers_cpp_when_built(monkeypatch):
    monkeypatch.setenv("BPP_KERNELS_BACKEND", "auto")
    expected = "cpp" if ops._impl("mask_to_index", "cpp") is not None else "reference"
    assert ops.resolve("mask_to_index", "cpu") == expected


def test_cpp_extension_is_built_and_matches_reference():
    # the install script builds bpp_kernels._C; CI must exercise it, not silently fall back
    from bpp_kernels import cpp

    assert cpp.AVAILABLE, "bpp_kernels._C was not built (see scripts/install.sh output)"
    mask = torch.rand(5, 37) < 0.5
    got = ops.mask_to_index(mask, backend="cpp")
    want = ops.mask_to_index(mask, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bpp_kernels_imports_without_transformers():
    import subprocess
    import sys

    code = ("import sys; import bpp_kernels; "
            "assert 'transformers' not in sys.modules and 'bpp' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_op_input_is_a_clear_error():
    with pytest.raises(ValueError, match="mask_to_index: mask must be a 2-D bool"):
        ops.mask_to_index(torch.zeros(3))
    with pytest.raises(ValueError, match="keep_idx must be"):
        ops.masked_swiglu(torch.randn(2, 3, 4), torch.randn(5, 2, 4), torch.randn(5, 4),
                          torch.zeros(3, 5, dtype=torch.int32), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="target must be int64"):
        ops.linear_cross_entropy(torch.randn(3, 4), torch.randn(7, 4), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="share a dtype"):
        ops.linear_cross_entropy(torch.randn(3, 4), torch.randn(7, 4).double(), torch.zeros(3, dtype=torch.int64))


def test_cpu_gemm_library_follows_the_environment(monkeypatch):
    from bpp_kernels import cpp

    if not cpp.AVAILABLE:
        pytest.skip("bpp_kernels._C not built")
    monkeypatch.setenv("BPP_CPU_GEMM", "aten")
    assert cpp.gemm_library() == "mm"
    monkeypatch.setenv("BPP_CPU_GEMM", "onednn")
    assert cpp.gemm_library() == ("onednn" if torch.backends.mkldnn.is_available() else "mm")
    monkeypatch.delenv("BPP_CPU_GEMM")
    avx512 = torch._C._cpu._get_cpu_capability().get("avx512_f", False)
    assert cpp.gemm_library() == ("onednn" if avx512 and torch.backends.mkldnn.is_available() else "mm")
    monkeypatch.setenv("BPP_CPU_GEMM", "blas-magic")
    with pytest.raises(RuntimeError, match="BPP_CPU_GEMM=blas-magic is not one of onednn, aten, auto"):
        cpp.gemm_library()


def test_cpu_gemm_library_respects_torch_mkldnn_switch(monkeypatch):
    from bpp_kernels import cpp

    if not cpp.AVAILABLE:
        pytest.skip("bpp_kernels._C not built")
    monkeypatch.setenv("BPP_CPU_GEMM", "onednn")
    with torch.backends.mkldnn.flags(enabled=False):
        assert cpp.gemm_library() == "mm"
