"""Devices and dtypes the Triton kernels are tested on: CPU through the interpreter (fp32,
fp16; the interpreter gets bf16 wrong), and CUDA when present (fp32, fp16, bf16)."""
import os

import pytest
import torch

# CPU tensors reach Triton only through the interpreter (conftest turns it on when there is no GPU)
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="CPU Triton cases run under TRITON_INTERPRET=1 only")

CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def device_dtypes():
    params = [pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}", marks=needs_interpreter) for dt in CPU_DTYPES]
    params += [pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=pytest.mark.gpu) for dt in GPU_DTYPES]
    return params


def tolerance(ref_fn, kwargs, dtype):
    """fp32: tight; low precision: FlashAttention's rule (2x a PyTorch run in that dtype)."""
    from tests.kernels import cases

    if dtype == torch.float32:
        up = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
        return ref_fn(**up), 1e-5
    return cases.low_precision_tolerance(ref_fn, kwargs, dtype)


def fresh_seed():
    return int(torch.randint(0, 2**31 - 1, (1,)).item())
