"""Index lists are checked before any backend reads them: out-of-range, negative and repeated
kept indices and impossible counts give a ValueError naming the offence (a device-side assertion
on CUDA and under torch.compile), on every backend, for every masked op; ``check=False`` skips
the check for indices that come from mask_to_index."""
import pytest
import torch

from bpp_kernels import check_indices, mask_to_index, ops
from tests.kernels import cases

BACKENDS = [pytest.param("reference", id="reference"), pytest.param("cpp", id="cpp", marks=cases.needs_cpp),
            pytest.param("triton", id="triton-cpu", marks=cases.needs_interpreter)]


def _bad_cases(n: int):
    """(what to change, message) for index lists of width n whose sample 1 keeps every unit."""
    return [
        (lambda i, c: i.__setitem__((1, 0), n), rf"keep_idx\[1, 0\] = {n} is outside \[0, {n}\)"),
        (lambda i, c: i.__setitem__((1, 2), -1), rf"keep_idx\[1, 2\] = -1 is outside \[0, {n}\)"),
        (lambda i, c: i.__setitem__((1, 1), int(i[1, 0])), r"appears 2 times among the .* kept entries of keep_idx\[1\]"),
        (lambda i, c: c.__setitem__(1, n + 1), rf"keep_count\[1\] = {n + 1} is outside \[0, {n}\]"),
        (lambda i, c: c.__setitem__(0, -1), rf"keep_count\[0\] = -1 is outside \[0, {n}\]"),
    ]


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_indices_are_refused_by_every_masked_op(backend, case):
    kw = cases.swiglu_inputs(3, 4, 8, 11, 0.5, seed=case)  # sample 0 keeps nothing, sample 1 everything
    change, message = _bad_cases(11)[case]
    change(kw["keep_idx"], kw["keep_count"])
    with pytest.raises(ValueError, match=message):
        ops.masked_swiglu(**kw, backend=backend)
    att = cases.attention_inputs(3, 1, 4, 8, 5, 2, 4, 0.5, seed=case)
    change, message = _bad_cases(5)[case]
    change(att["keep_idx"], att["keep_count"])
    with pytest.raises(ValueError, match=message.replace("masked_swiglu", "masked_attention")):
        ops.masked_attention(**att, backend=backend)
    mlp = cases.mlp_inputs(3, 4, 8, 11, 0.5, seed=case, unit_scale=True)
    change, message = _bad_cases(11)[case]
    change(mlp["keep_idx"], mlp["keep_count"])
    with pytest.raises(ValueError, match=message):
        ops.masked_mlp(**mlp, backend=backend)


def test_entries_past_the_count_are_not_read_so_not_checked():
    idx, cnt = mask_to_index(torch.tensor([[True, False, True, False]]))
    idx[0, 3] = 99  # never read: the sample keeps 2 units
    check_indices(idx, cnt, 4)
    idx[0, 1] = 0  # read, and a repeat of unit 0
    with pytest.raises(ValueError, match="unit 0 appears 2 times"):
        check_indices(idx, cnt, 4)


def test_check_false_skips_the_check_and_good_indices_pass_either_way():
    kw = cases.swiglu_inputs(4, 3, 8, 13, 0.5, seed=7)
    a = ops.masked_swiglu(**kw, backend="reference")
    b = ops.masked_swiglu(**kw, backend="reference", check=False)
    assert torch.equal(a, b)


@cases.needs_cpp
def test_compiled_ops_check_on_the_device():
    kw = cases.swiglu_inputs(3, 5, 12, 17, 0.5)
    f = torch.compile(lambda **k: ops.masked_swiglu(**k, backend="cpp"), fullgraph=True)
    assert f(**kw).shape == (3, 5, 12)
    bad = kw["keep_idx"].clone()
    bad[1, 0] = 17
    with pytest.raises(RuntimeError, match="keep_idx outside"):
        f(**{**kw, "keep_idx": bad})


def test_indices_on_another_device_are_refused():
    kw = cases.swiglu_inputs(2, 3, 8, 13, 0.5)
    with pytest.raises(ValueError, match="must be on x's device"):
        ops.masked_swiglu(**{**kw, "keep_idx": kw["keep_idx"].to("meta")}, backend="reference")
