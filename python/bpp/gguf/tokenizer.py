"""The tokenizer: a folder's tokenizer.json → llama.cpp's tokenizer keys ("gpt2" byte-level BPE
with its pre-tokenizer, or "llama" SentencePiece-style BPE with scores), checked before writing."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from ..errors import BppError
from .plan import Model, Weights

# Hugging Face pre-tokenizers (as tokenizer.json describes them) → llama.cpp's tokenizer.ggml.pre
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    (("ByteLevel", False, True),): "gpt-2",
    (("Digits", True), ("ByteLevel", False, True)): "smollm",
    (("Split", _LLAMA3_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "qwen2",
}


def _describe_pre(pt: dict | None) -> tuple:
    """A comparable description of a tokenizer.json pre_tokenizer."""
    if pt is None:
        return ()
    kind = pt.get("type")
    if kind == "Sequence":
        return tuple(x for p in pt.get("pretokenizers", []) for x in _describe_pre(p))
    if kind == "ByteLevel":
        return (("ByteLevel", bool(pt.get("add_prefix_space", True)), bool(pt.get("use_regex", True))),)
    if kind == "Digits":
        return (("Digits", bool(pt.get("individual_digits", False))),)
    if kind == "Split":
        pattern = pt.get("pattern") or {}
        return (("Split", pattern.get("Regex", pattern.get("String")), pt.get("behavior"), bool(pt.get("invert"))),)
    return ((kind,),)


def tokenizer_writer(model: Model, weights: Weights) -> Callable:
    """Read and check the folder's tokenizer now; return the function that writes it to the file.

    Byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2/3) becomes llama.cpp's "gpt2" tokenizer with the
    matching pre-tokenizer; byte-fallback BPE converted from SentencePiece (Llama 2, Mistral, Gemma 3)
    becomes its "llama" tokenizer, each token scored by the rank of the merge that makes it."""
    import gguf

    path = model.folder / "tokenizer.json"
    if not path.is_file():
        raise BppError(f"{model.folder} has no tokenizer.json; llama.cpp needs the tokenizer in the file: save "
                       "the tokenizer into the folder (bpp compact does)")
    tok = json.loads(path.read_text(encoding="utf-8"))
    bpe = tok.get("model") or {}
    if bpe.get("type") != "BPE":
        raise BppError(f"{path}: a {bpe.get('type')} tokenizer is not exported; bpp writes BPE tokenizers "
                       "(GPT-2, SmolLM, Llama 2/3, Mistral, Qwen2/3, Gemma 3)")
    n_vocab = weights.shape("model.embed_tokens.weight")[0]
    spm = bool(bpe.get("byte_fallback"))
    if spm:
        space_prefix = _sentencepiece_space_prefix(tok)
        if space_prefix is None:
            raise BppError(f"{path}: a byte-fallback BPE tokenizer whose normalizer / pre-tokenizer is not the "
                           "SentencePiece one ('▁' for spaces); llama.cpp has no equivalent bpp knows")
    else:
        pre = _PRE_TOKENIZERS.get(_describe_pre(tok.get("pre_tokenizer")))
        normalizer = (tok.get("normalizer") or {}).get("type")
        if pre is None or normalizer not in (None, "NFC" if pre == "qwen2" else None):
            raise BppError(f"{path}: its pre-tokenizer {_describe_pre(tok.get('pre_tokenizer'))} (normalizer "
                           f"{normalizer}) has no llama.cpp equivalent bpp knows; bpp writes the byte-level BPE "
                           "tokenizers of GPT-2, SmolLM, Llama 3 and Qwen2/3")
    tokens: list[str | None] = [None] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    unk = bpe.get("unk_token")
    for text, i in bpe.get("vocab", {}).items():
        if i >= n_vocab:
            raise BppError(f"{path}: token id {i} is beyond the embedding's {n_vocab} rows")
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tok.get("added_tokens", []):
        i = int(added["id"])
        if i >= n_vocab:
            raise BppError(f"{path}: added token id {i} is beyond the embedding's {n_vocab} rows")
        tokens[i] = added["content"]
        types[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if spm:
        for i, text in enumerate(tokens):
            if text is not None and _BYTE_TOKEN.fullmatch(text):
                types[i] = gguf.TokenType.BYTE
            elif text is not None and text == unk:
                types[i] = gguf.TokenType.UNKNOWN
        scores = _merge_scores(bpe, n_vocab)
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    special = gguf.SpecialVocab(model.folder, load_merges=not spm, n_vocab=n_vocab)
    if not spm and not special.merges:
        raise BppError(f"{path} has no merges: not a BPE tokenizer llama.cpp can run")
    add_bos, add_eos = _adds_special_tokens(path, special.special_token_ids)
    special.add_special_token.update({"bos": add_bos, "eos": add_eos})

    def write(writer) -> None:
        writer.add_vocab_size(n_vocab)
        if spm:
            writer.add_tokenizer_model("llama")
            writer.add_add_space_prefix(space_prefix)
            writer.add_token_scores(scores)
        else:
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)

    return write


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _sentencepiece_space_prefix(tok: dict) -> bool | None:
    """For a tokenizer.json converted from SentencePiece (spaces become '▁'): whether it puts a '▁'
    before the text (llama.cpp's add_space_prefix); None when it is not of that shape."""
    norm, pre = tok.get("normalizer"), tok.get("pre_tokenizer")
    if _splits_on_spaces(pre):  # Gemma's: after the normalizer turned spaces into '▁' it splits nothing
        pre = None
    if norm is not None and pre is None:  # Prepend('▁') + Replace(' ', '▁')
        steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
        kinds = [(n.get("type"), n.get("prepend"), (n.get("pattern") or {}).get("String"), n.get("content"))
                 for n in steps]
        replace = ("Replace", None, " ", "\u2581")
        if kinds == [("Prepend", "\u2581", None, None), replace]:
            return True
        if kinds == [replace]:
            return False
        return None
    if norm is None and pre is not None and pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581":
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        return {"first": True, "always": True, "never": False}.get(scheme)
    return None


def _splits_on_spaces(pre: dict | None) -> bool:
    """Whether a pre-tokenizer only splits on ' ' (keeping the spaces)."""
    return (pre is not None and pre.get("type") == "Split" and (pre.get("pattern") or {}).get("String") == " "
            and pre.get("behavior") in ("MergedWithPrevious", "MergedWithNext") and not pre.get("invert"))


def _merge_scores(bpe: dict, n_vocab: int) -> list[float]:
    """SentencePiece-style scores from BPE merges: a token made by the merge of rank r scores -r
    (llama.cpp merges the best-scored pair first, as BPE applies the lowest rank first); tokens no
    merge makes (characters, bytes, specials) score 0, which llama.cpp never compares."""
    vocab = bpe.get("vocab", {})
    scores = [0.0] * n_vocab
    seen = set()
    for rank, merge in enumerate(bpe.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = vocab.get(left + right)
        if i is not None and i not in seen:
            seen.add(i)
            scores[i] = -float(rank)
    return scores


def _adds_special_tokens(path: Path, ids: dict) -> tuple[bool, bool]:
    """Whether tokenizer.json's post-processor puts BOS before / EOS after a plain text (read with
    ``tokenizers`` directly: transformers' AutoTokenizer would consult the per-layer config)."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception types; the user needs the one line
        raise BppError(f"cannot read the tokenizer {path}: {e}") from None
    plain = tokenizer.encode("Hello world", add_special_tokens=False).ids
    full = tokenizer.encode("Hello world", add_special_tokens=True).ids
    add_bos = len(full) > len(plain) and full[0] == ids.get("bos") and plain[:1] != full[:1]
    add_eos = len(full) > len(plain) and full[-1] == ids.get("eos") and plain[-1:] != full[-1:]
    return add_bos, add_eos
