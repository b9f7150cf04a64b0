"""Perplexity by the standard protocol, and the `bpp eval` command."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bpp import data, evaluation
from bpp.errors import BppError
from tests.tiny import tiny_model


def test_perplexity_follows_the_standard_protocol(tokenizer):
    model = tiny_model("llama")
    text = data.load_text("default", "heldout")[:5000]
    ids = data.tokenize(tokenizer, text)
    seq_len = 40
    n = ids.numel() // seq_len
    windows = ids[: n * seq_len].view(n, seq_len)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    expected = math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item())
    got = evaluation.perplexity(model, tokenizer, text, seq_len=seq_len, batch_size=3)
    assert got == pytest.approx(expected, rel=1e-5)
    with pytest.raises(BppError, match="fewer than seq_len"):
        evaluation.perplexity(model, tokenizer, text, seq_len=10**6)


def _bpp(*args):
    return subprocess.run([sys.executable, "-m", "bpp", *args], capture_output=True, text=True)


def test_cli_eval_prints_perplexity(tiny_qwen2_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(data.load_text("default", "heldout")[:6000])
    out = _bpp("eval", "--model", str(tiny_qwen2_dir), "--data", str(text), "--split", "all", "--seq-len", "32")
    assert out.returncode == 0, out.stderr
    assert "perplexity" in out.stdout and float(out.stdout.split()[1]) > 1.0


@pytest.mark.parametrize("args,message", [
    (["--data", "nope"], "unknown data"),
    (["--model", "/no/such/model"], "not found"),
    (["--seq-len", "100000", "--data", "__TEXT__"], "fewer than seq_len"),
])
def test_cli_user_errors_are_one_line_without_traceback(tiny_qwen2_dir, tmp_path, args, message):
    text = tmp_path / "t.txt"
    text.write_text("a few words only")
    args = [str(text) if a == "__TEXT__" else a for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_qwen2_dir)]
    out = _bpp("eval", *args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
