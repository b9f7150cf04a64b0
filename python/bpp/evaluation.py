"""How bpp measures a model: perplexity by the standard protocol (of a dense, masked or compacted
model) and zero-shot accuracy through lm-evaluation-harness. The ``bpp eval`` job is
:mod:`bpp.jobs.eval`."""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import cut_windows, tokenize, window_bos
from .errors import BppError
from .masks import Masks


def check_eval_options(seq_len: int, max_windows: int | None, held: torch.Tensor | None = None,
                       data: str = "the text") -> None:
    """Refuse evaluation options (and a held-out text shorter than one window) before a run starts."""
    if seq_len < 2:
        raise BppError(f"--eval-seq-len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise BppError(f"--eval-windows must be at least 1, got {max_windows}")
    if held is not None and held.numel() < seq_len:
        raise BppError(f"the held-out part of {data} has {held.numel()} tokens, fewer than one evaluation window "
                       f"(--eval-seq-len {seq_len}); give a longer text or a shorter window")


@torch.no_grad()
def perplexity(model, tokenizer, text: str | torch.Tensor, seq_len: int = 128, batch_size: int = 8,
               progress: bool | str = False, max_windows: int | None = None) -> float:
    """Perplexity by the standard protocol: tokenize the joined text once, cut it into
    non-overlapping windows of ``seq_len`` tokens (the tail shorter than a window is dropped; for
    a model that needs BOS first, :func:`bpp.data.window_bos`, each window is BOS and seq_len − 1
    tokens), average the next-token NLL over all predicted tokens of all windows, exponentiate
    (inf when that is beyond a float). ``progress``: a bar over the batches, True or its label."""
    ids = tokenize(tokenizer, text) if isinstance(text, str) else text
    if seq_len < 2:
        raise BppError(f"seq_len must be at least 2, got {seq_len}")
    if batch_size < 1:
        raise BppError(f"the batch size must be at least 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise BppError(f"the number of evaluation windows must be at least 1, got {max_windows}")
    data = cut_windows(ids, seq_len, window_bos(model))
    n = data.shape[0]
    if n == 0:
        raise BppError(f"the text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    data = data[:n]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    label = progress if isinstance(progress, str) else f"perplexity (seq_len {seq_len})"
    for start in tqdm(range(0, n, batch_size), desc=label, disable=not progress, unit="batch"):
        batch = data[start : start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    mean = total / count
    return math.exp(mean) if mean < math.log(sys.float_info.max) else math.inf


def dense_perplexity(model, ids: torch.Tensor, seq_len: int, max_windows: int | None, tokenizer=None,
                     progress: bool | str = False) -> float:
    """:func:`perplexity` of the dense ``model`` on the token ids ``ids``, kept by
    :mod:`bpp.results_cache` under the model, the text and the window options: it depends on
    nothing else, and every run on the same model and text would otherwise compute it again."""
    from . import results_cache

    key = results_cache.model_key(model, "dense perplexity v3", ids, seq_len, max_windows, window_bos(model))
    value = results_cache.load("perplexity", key)
    if isinstance(value, float):
        return value
    value = perplexity(model, tokenizer, ids, seq_len=seq_len, max_windows=max_windows, progress=progress)
    results_cache.save("perplexity", key, float(value))
    return value


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, seq_len: int = 128, max_windows: int | None = None,
               batch_size: int = 8) -> torch.Tensor:
    """(n,) float64 mean next-token NLL of each non-overlapping window (the perplexity protocol:
    windows cut as :func:`perplexity` cuts them, BOS first for the families that need it);
    ``ids`` already cut into windows ``(n, T)`` are taken as they are."""
    if ids.dim() == 2:
        data = ids
    else:
        data = cut_windows(ids, seq_len, window_bos(model))
        data = data[:max_windows] if max_windows else data
    device = next(model.parameters()).device
    out = []
    for start in range(0, data.shape[0], batch_size):
        batch = data[start:start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        out.append(nll.double().mean(1).cpu())
    return torch.cat(out)


@contextmanager
def written_model(model, mask: Masks, biases: dict):
    """The model ``bpp prune`` writes for ``mask``: compacted with its compensation ``biases``
    (output biases and refit weights, as :func:`bpp.compaction.compact_model` takes them) when there
    are any, else ``model`` with the mask applied by hooks (the same logits)."""
    if biases:
        from .compaction import compact_model

        yield compact_model(model, mask, **biases)
        return
    from .models.hooks import hook_masks

    with hook_masks(model, mask):
        yield model


def masked_perplexity(model, tokenizer, ids: torch.Tensor, mask: Masks | None, seq_len: int,
                      max_windows: int | None, progress: bool | str = False) -> float:
    """:func:`perplexity` of ``model`` under the single mask ``mask`` (None: the dense model, through
    :func:`dense_perplexity`'s cache), applied by multiplicative hooks (the ground truth of the
    masked forward)."""
    from .models.hooks import hook_masks

    if mask is None:
        return dense_perplexity(model, ids, seq_len, max_windows, tokenizer, progress)
    with hook_masks(model, mask):
        return perplexity(model, tokenizer, ids, seq_len=seq_len, max_windows=max_windows, progress=progress)


# --- zero-shot accuracy through lm-evaluation-harness ----------------------------------------

# the suite LLM-Pruner, FLAP and the PG paper report (MMLU is 5-shot by convention)
ZERO_SHOT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
FEW_SHOT = {"mmlu": 5}


def zero_shot(model, tokenizer, tasks: list[str] | tuple[str, ...] = ZERO_SHOT_TASKS, *, limit: int | None = None,
              batch_size: int = 8, include_path: str | None = None, num_fewshot: int | None = None) -> dict:
    """Accuracy per task with lm-evaluation-harness's Hugging Face wrapper on an in-memory model.

    Returns ``{task: {"acc": .., "acc_norm": .. (when defined), "n": samples, "num_fewshot": k}}``.
    ``include_path`` adds a folder of task YAML files (e.g. local tasks when the hub is
    unreachable); ``limit`` caps samples per task (for smoke runs; say so beside the figure).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise BppError("zero-shot evaluation needs lm-eval: pip install 'bpp[eval]' (or pip install lm-eval)") from None
    if not tasks:
        raise BppError("no tasks given")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise BppError(f"unknown lm-eval task(s) {', '.join(unknown)}; e.g. {', '.join(ZERO_SHOT_TASKS)}, mmlu")
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = {}
    for task in tasks:  # one call per task: few-shot counts differ (MMLU 5-shot)
        shots = FEW_SHOT.get(task, 0) if num_fewshot is None else num_fewshot
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=shots, limit=limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=0,
                                          verbosity="ERROR")
        except (ConnectionError, OSError) as e:
            raise BppError(f"lm-eval could not load the data of task {task!r}: {e}") from None
        metrics = out["results"][task]
        row = {"num_fewshot": shots, "n": out.get("n-samples", {}).get(task, {}).get("effective")}
        for key in ("acc", "acc_norm"):
            if f"{key},none" in metrics:
                row[key] = float(metrics[f"{key},none"])
        results[task] = row
    return results


def compacted_perplexity(model, tokenizer, held: torch.Tensor, mask: Masks, biases: dict, seq_len: int,
                         max_windows: int | None, progress: bool | str = False) -> float:
    """Held-out perplexity of the model ``bpp prune`` writes for ``mask``: compacted with its
    compensation ``biases`` when there are any, else the mask applied by hooks (the same logits)."""
    with written_model(model, mask, biases) as written:
        return perplexity(written, tokenizer, held, seq_len=seq_len, max_windows=max_windows, progress=progress)

