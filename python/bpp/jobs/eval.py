"""``bpp eval``: held-out perplexity of a model (and optionally zero-shot accuracy through
lm-evaluation-harness), on a model folder, a hub id or the embedded default."""
from __future__ import annotations

from ..data import load_text
from ..evaluation import ZERO_SHOT_TASKS, perplexity, zero_shot
from ..modelio import load_model


def evaluate_model(model: str | None = None, *, data: str = "default", split: str = "heldout", seq_len: int = 128,
             batch_size: int = 8, dtype: str = "float32", device: str = "cpu", tasks: str | list[str] | None = None,
             limit: int | None = None, include_path: str | None = None, progress: bool = True) -> dict:
    """``{"perplexity": .., "model": .., "data": .., "split": .., "seq_len": .., "zero_shot": {task: row}}``.
    ``tasks``: lm-eval task names (a list or comma-separated), or ``"paper"`` for the suite the
    pruning papers report."""
    text = load_text(data, split)
    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    result = {"model": model or "default", "data": data, "split": split, "seq_len": seq_len,
              "perplexity": perplexity(lm, tokenizer, text, seq_len=seq_len, batch_size=batch_size, progress=progress)}
    if tasks:
        if isinstance(tasks, str):
            tasks = list(ZERO_SHOT_TASKS) if tasks == "paper" else [t.strip() for t in tasks.split(",") if t.strip()]
        result["zero_shot"] = zero_shot(lm, tokenizer, tasks, limit=limit, include_path=include_path)
    return result
