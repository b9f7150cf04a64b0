"""Gemma 3 GGUF export on a real model: llama.cpp's greedy tokens against transformers'.

Each model folder (the embedded Gemma 3 270M, or a folder bpp compacted from it) is exported with
``bpp.export_gguf`` and loaded in llama.cpp (llama-cpp-python, f32 KV cache); for each of three
held-out texts of the embedded default data, the prompt's tokens (transformers' tokenizer, BOS
first) are continued greedily for --new-tokens tokens by llama.cpp (one decode per token) and by
transformers' ``generate()`` (KV cache, EOS not special). Prints, per folder and prompt, whether
the tokens agree and where they first differ, whether llama.cpp tokenizes the prompt text as
transformers does, and writes the rows to bench/results/gguf_gemma3.json. llama.cpp's tokens
come from its own greedy sampler (llama-cpp-python's ``generate()`` at temperature 0).

``--uniform-channels N`` adds a folder compacted from the first FOLDER by a layer-uniform mask
that keeps the N highest-magnitude MLP channels of every layer and every head (bpp's magnitude
metric; the same sizes in every layer, which is what llama.cpp's gemma3 takes).

    .venv/bin/python bench/gguf_gemma3.py FOLDER [FOLDER ...] [--uniform-channels N] [--dtype f32] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import common

PROMPT_CHARS = 300


def _prompts(n: int) -> list[str]:
    from bpp.data import load_text

    text = load_text("default", "heldout")
    step = len(text) // n
    return [text[i * step: i * step + PROMPT_CHARS] for i in range(n)]


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """llama.cpp's own greedy sampler (temperature 0, no penalties) through llama-cpp-python."""
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == n:
            return out


@torch.no_grad()
def _torch_greedy(model, ids: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _uniform_compaction(folder: str, channels: int, work: Path) -> Path:
    """``folder`` compacted to the ``channels`` highest-magnitude MLP channels of every layer."""
    from bpp import MaskSpace, load_model
    from bpp.compaction import save_compacted
    from bpp.methods import prior_mask

    model, tok = load_model(folder)
    space = MaskSpace.from_model(model)
    mask = prior_mask(model, space, "magnitude", 1 - channels / space.n_channels, granularity=("channel",))
    kept = mask.channels[0].sum(-1).tolist()
    assert set(kept) == {channels} and bool(mask.groups.all()), (kept, "not a layer-uniform mask")
    out = work / f"{Path(folder).name}-magnitude-{channels}ch"
    with torch.no_grad():
        return save_compacted(model, mask, out, tokenizer=tok, force=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="model folders (the embedded 270M: $BPP_CACHE/gemma3-270m)")
    p.add_argument("--dtype", default="f32")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default="/tmp/gguf-gemma3")
    p.add_argument("--uniform-channels", type=int, default=None)
    a = p.parse_args()

    import llama_cpp

    from bpp import export_gguf, load_model

    print(common.machine_line(), f"llama-cpp-python {llama_cpp.__version__}")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    folders = list(a.folders)
    if a.uniform_channels is not None:
        folders.append(str(_uniform_compaction(a.folders[0], a.uniform_channels, work)))
    rows = []
    for name in folders:
        model, tok = load_model(name)
        path = work / f"{Path(name).name}.{a.dtype}.gguf"
        t0 = time.perf_counter()
        export_gguf(name, path, dtype=a.dtype, force=True, progress=False)
        export_s = time.perf_counter() - t0
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=a.threads,
                              n_threads_batch=a.threads, logits_all=True, verbose=False,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        for text in _prompts(a.prompts):
            ids = tok(text)["input_ids"]
            same_tokens = llm.tokenize(text.encode(), add_bos=True) == ids
            want, got = _torch_greedy(model, ids, a.new_tokens), _llama_greedy(llm, ids, a.new_tokens)
            first = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), None)
            row = {"folder": name, "arch": llm.metadata.get("general.architecture"), "dtype": a.dtype,
                   "params": sum(p.numel() for p in model.parameters()), "prompt_tokens": len(ids),
                   "tokenizer_agrees": same_tokens, "new_tokens": a.new_tokens, "agree": want == got,
                   "first_difference": first, "transformers": want, "llama_cpp": got,
                   "export_s": round(export_s, 1)}
            rows.append(row)
            print(f"{name} ({row['arch']}, {row['params'] / 1e6:.1f} M, {a.dtype}): prompt {len(ids)} tokens, "
                  f"tokenizer {'agrees' if same_tokens else 'DIFFERS'}; {a.new_tokens} greedy tokens "
                  f"{'agree' if first is None else f'differ first at token {first}'}")
            if first is not None:
                print("  transformers:", tok.decode(want))
                print("  llama.cpp:   ", tok.decode(got))
        llm.close()
    out = Path(__file__).parent / "results" / "gguf_gemma3.json"
    out.write_text(json.dumps({"machine": common.machine_line(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
