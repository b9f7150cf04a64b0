"""The speed a llama.cpp user gets from a pruned GGUF: prompt and generation tokens/s, dense vs pruned.

The embedded default (SmolLM2-135M-Instruct) pruned by FLAP (bpp's baseline: fluctuation metric,
heterogeneous per-layer allocation, bias compensation) at 20% and 40% of the prunable
parameters, compacted, exported with ``bpp.export_gguf`` (pruned: llama.cpp's ``deci``; dense:
``llama``), and run by llama.cpp (llama-cpp-python) on the CPU with the same threads. Each mask
also with its MLP widths rounded up to multiples of 32 ("/32", ``bpp compact --round-to 32``):
q8_0 needs it, and llama.cpp's fast CPU GEMMs want aligned widths.

Prompt: one decode of --prompt-tokens tokens; generation: --new-tokens greedy tokens, one decode
each, after a 16-token prompt. Every round times every file once (interleaved, so machine noise
hits all alike); the table gives medians over --repeats rounds.

    .venv/bin/python bench/gguf_speed.py [--repeats 5] [--threads 2] [--dtypes f32,f16,q8_0]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import common


def _prompt_speed(llm, ids: list[int]) -> float:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    return len(ids) / (time.perf_counter() - t0)


def _generation_speed(llm, prompt: list[int], n: int) -> float:
    llm.reset()
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(n):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtypes", default="f32,f16,q8_0")
    p.add_argument("--workdir", default=None, help="where the folders and GGUF files go (default: a temp folder)")
    a = p.parse_args()

    import llama_cpp

    import bpp
    from bpp.compaction import round_mask, save_compacted
    from bpp.data import load_text, windows
    from bpp.jobs.export import export_gguf
    from bpp.methods.flap import compensation_for, flap_mask

    work = Path(a.workdir or tempfile.mkdtemp(prefix="gguf-speed-"))
    model, tok = bpp.load_model()
    space = bpp.MaskSpace.from_model(model)
    calib = windows(tok, load_text("default", "calib"), 128, 16, seed=1)
    prompt = windows(tok, load_text("default", "heldout"), a.prompt_tokens, 1, seed=0)[0].tolist()

    folders = {"dense": work / "dense"}
    if not folders["dense"].exists():
        model.save_pretrained(folders["dense"])
        tok.save_pretrained(folders["dense"])
    params = {"dense": space.total_params}
    masks = {}
    for sparsity in (0.2, 0.4):
        with torch.no_grad():
            mask = flap_mask(model, calib, sparsity)
        for rounded in (False, True):
            m = round_mask(mask, 32) if rounded else mask
            name = f"FLAP {sparsity:.0%}" + (" /32" if rounded else "")
            masks[name] = m
            folders[name] = work / name.replace(" ", "-").replace("%", "").replace("/", "r")
            params[name] = int(space.params(m)[0])
            if not folders[name].exists():
                with torch.no_grad():
                    save_compacted(model, m, folders[name], tokenizer=tok, **compensation_for(model, m, calib))

    files = {}
    for dtype in a.dtypes.split(","):
        for name, folder in folders.items():
            if dtype == "q8_0" and not (name.endswith("/32") or name == "dense"):
                continue  # q8_0 needs widths in multiples of 32
            path = work / f"{folder.name}.{dtype}.gguf"
            if not path.exists():
                t0 = time.perf_counter()
                export_gguf(folder, path, dtype=dtype, progress=False)
                print(f"  exported {name} {dtype} in {time.perf_counter() - t0:.1f}s", flush=True)
            files[(name, dtype)] = path

    llms = {key: llama_cpp.Llama(model_path=str(path), n_ctx=a.prompt_tokens + a.new_tokens + 32,
                                 n_batch=a.prompt_tokens, n_threads=a.threads, n_threads_batch=a.threads,
                                 verbose=False) for key, path in files.items()}
    first = prompt[:16]
    for llm in llms.values():  # warm-up: page the weights in, size the buffers
        _prompt_speed(llm, prompt)
        _generation_speed(llm, first, 4)
    pp = {key: [] for key in llms}
    tg = {key: [] for key in llms}
    for _ in range(a.repeats):
        for key, llm in llms.items():
            pp[key].append(_prompt_speed(llm, prompt))
            tg[key].append(_generation_speed(llm, first, a.new_tokens))

    print(f"\nmachine: {common.cpu_name()}, {os.cpu_count()} cores; llama.cpp via llama-cpp-python "
          f"{llama_cpp.__version__}, {a.threads} threads; load average {os.getloadavg()[0]:.1f}")
    print(f"prompt: {a.prompt_tokens} tokens in one decode; generation: {a.new_tokens} tokens one by one "
          f"after 16; medians of {a.repeats} interleaved rounds\n")
    print("| file | dtype | arch | params | size | prompt tok/s | × dense | generation tok/s | × dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, dtype), path in files.items():
        pre, gen = statistics.median(pp[(name, dtype)]), statistics.median(tg[(name, dtype)])
        d_pre, d_gen = statistics.median(pp[("dense", dtype)]), statistics.median(tg[("dense", dtype)])
        arch = llms[(name, dtype)].metadata.get("general.architecture", "?")
        print(f"| {name} | {dtype} | {arch} | {params[name] / 1e6:.1f} M | {path.stat().st_size / 2**20:.0f} MiB "
              f"| {pre:.0f} | {pre / d_pre:.2f}× | {gen:.1f} | {gen / d_gen:.2f}× |")


if __name__ == "__main__":
    main()
