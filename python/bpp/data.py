"""Calibration and evaluation text: the offline default, the hub corpora of pruning papers, local files."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BppError, missing_dependency

SPLITS = ("calib", "heldout", "all")
# model types whose every window of text starts with the BOS token: Gemma reads text that does not
# begin with it far worse (Gemma 3 270M, held-out default text, windows of 128: perplexity 192
# without, 27 with)
BOS_FIRST = ("gemma3_text",)


@dataclass(frozen=True)
class HubText:
    """A corpus on the Hugging Face hub, in the configuration pruning papers use."""

    path: str
    name: str | None
    splits: dict  # our split -> (hub split, data_files or None)
    field: str
    sep: str
    max_docs: dict | None = None  # our split -> number of leading documents kept


HUB_TEXTS = {
    # LLM-Pruner / FLAP / SparseGPT conventions
    "wikitext2": HubText("wikitext", "wikitext-2-raw-v1", {"calib": ("train", None), "heldout": ("test", None)},
                         "text", "\n\n"),
    "ptb": HubText("ptb_text_only", "penn_treebank", {"calib": ("train", None), "heldout": ("test", None)},
                   "sentence", " "),
    "c4": HubText("allenai/c4", None,
                  {"calib": ("train", {"train": "en/c4-train.00000-of-01024.json.gz"}),
                   "heldout": ("validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"})},
                  "text", " ", max_docs={"heldout": 1100}),
}
TEXT_NAMES = ("default", *HUB_TEXTS)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise BppError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def default_text(split: str = "calib") -> str:
    """CPython's ``pydoc_data.topics`` (≈465 kB of English prose in every Python install).

    Topics are joined in name order and cut into paragraphs; paragraphs are grouped in blocks of
    20, and every 10th block (block % 10 == 9) is held out: ~10% of the text, in contiguous
    passages spread over all topics. Deterministic across machines with the same Python."""
    _check_split(split)
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    paragraphs = [p for k in sorted(topics) for p in topics[k].strip().split("\n\n") if p.strip()]
    if split == "all":
        return "\n\n".join(paragraphs)
    held = split == "heldout"
    return "\n\n".join(p for i, p in enumerate(paragraphs) if ((i // 20) % 10 == 9) == held)


def _file_text(path: Path, split: str) -> str:
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    # the whole file, in blocks: binary content anywhere (a NUL, or bytes that are not UTF-8) is refused
    block = 65536
    for start in range(0, len(text), block):
        part = text[start:start + block]
        if "\x00" in part or part.count("\ufffd") > max(8, len(part) // 100):
            raise BppError(f"{path} does not look like text (binary or not UTF-8 content near character {start}); "
                           "give a UTF-8 .txt file with --data")
    if split == "all":
        return text
    cut = text.rfind("\n", 0, int(len(text) * 0.9))  # calib = first ~90% up to a line break
    cut = int(len(text) * 0.9) if cut <= 0 else cut
    return text[:cut] if split == "calib" else text[cut:]


def _hub_text(spec: HubText, split: str) -> str:
    if importlib.util.find_spec("datasets") is None:
        raise missing_dependency("datasets", "loading hub corpora")
    import datasets

    parts = ["calib", "heldout"] if split == "all" else [split]
    texts = []
    for part in parts:
        hub_split, data_files = spec.splits[part]
        try:
            ds = datasets.load_dataset(spec.path, spec.name, split=hub_split, data_files=data_files)
        except Exception as e:  # network, missing config, ...: one clear message
            raise BppError(f"could not load {spec.path} ({hub_split}) through datasets: {e}. "
                           "Without the hub, use --data default or a path to a .txt file") from None
        docs = ds[spec.field]
        limit = (spec.max_docs or {}).get(part)
        texts.append(spec.sep.join(docs[:limit] if limit else docs))
    return spec.sep.join(texts)


def load_text(name: str = "default", split: str = "calib") -> str:
    """Text of ``name`` ('default', 'wikitext2', 'c4', 'ptb', or a .txt path) for ``split``
    ('calib', 'heldout' or 'all')."""
    _check_split(split)
    if name == "default":
        return default_text(split)
    if name in HUB_TEXTS:
        return _hub_text(HUB_TEXTS[name], split)
    path = Path(name).expanduser()
    if path.is_file():
        return _file_text(path, split)
    if path.suffix or "/" in name:
        raise BppError(f"text file {name!r} not found")
    raise BppError(f"unknown data {name!r}; use one of {', '.join(TEXT_NAMES)} or a path to a .txt file")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids (tokenised once, no length warning)."""
    if not text.strip():
        raise BppError("the text is empty")
    saved = getattr(tokenizer, "model_max_length", None)
    try:
        tokenizer.model_max_length = int(1e30)  # we cut windows ourselves
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved
    return ids


def window_bos(model) -> int | None:
    """The token every window of text starts with for ``model``: its BOS where its family needs
    one first (:data:`BOS_FIRST`), else None (windows are plain slices of the text)."""
    config = model.config
    bos = getattr(config, "bos_token_id", None)
    return int(bos) if getattr(config, "model_type", None) in BOS_FIRST and bos is not None else None


def _without_leading(ids: torch.Tensor, bos: int | None) -> torch.Tensor:
    return ids[1:] if bos is not None and ids.numel() and int(ids[0]) == bos else ids


def cut_windows(ids: torch.Tensor, seq_len: int, bos: int | None = None) -> torch.Tensor:
    """The token stream ``ids`` cut into consecutive windows ``(n, seq_len)`` (the tail shorter
    than a window dropped); with ``bos``, each window is that token and the next seq_len − 1
    tokens of the text (the BOS the tokenizer put at the start of the text left out)."""
    ids = _without_leading(ids, bos)
    text_len = seq_len - (bos is not None)
    n = ids.numel() // text_len
    out = ids[: n * text_len].view(n, text_len)
    return out if bos is None else torch.cat([torch.full((n, 1), bos, dtype=ids.dtype), out], 1)


def windows(tokenizer, text: str | torch.Tensor, seq_len: int, n: int, seed: int = 0,
            bos: int | None = None) -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens, ``(n, seq_len)`` int64, from ``text`` (a
    string, or ids from :func:`tokenize`); the same seed gives the same windows. With ``bos``
    (:func:`window_bos`), each is that token and seq_len − 1 tokens of the text."""
    if seq_len < 2 or n < 1:
        raise BppError(f"need seq_len >= 2 and n >= 1, got seq_len={seq_len}, n={n}")
    ids = tokenize(tokenizer, text) if isinstance(text, str) else text
    if ids.numel() < seq_len:
        raise BppError(f"the text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    ids = _without_leading(ids, bos)
    text_len = seq_len - (bos is not None)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - text_len + 1, (n,), generator=g)
    out = torch.stack([ids[s : s + text_len] for s in starts.tolist()])
    return out if bos is None else torch.cat([torch.full((n, 1), bos, dtype=out.dtype), out], 1)
