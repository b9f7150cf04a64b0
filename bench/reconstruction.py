"""Least-squares reconstruction vs FLAP's bias compensation vs nothing, on FLAP and BESA masks.

For each method and sparsity, the method's own mask (as `bpp baseline` makes it: 32 calibration
windows of 128 tokens of the embedded text, seed 0 or --calib-seed) is compacted three ways — no compensation,
FLAP's output biases, and `bpp.reconstruction` (damped least squares with an intercept, inputs
from the already-pruned model) — all calibrated on those same windows. Each model is evaluated on
windows of 128 tokens of two texts: the held-out part of the embedded text (CPython's pydoc
topics) and a text of another domain, the licence texts under /usr/share/common-licenses
(concatenated, symlinked duplicates skipped). Windows are spread evenly over each text. Paired
bootstrap over the windows (10,000 resamples) of the perplexity difference, reconstruct − bias
and reconstruct − none, with its 95% interval (negative: reconstruction is better).

    python bench/reconstruction.py --methods flap --sparsities 0.2,0.4 --json bench/results/reconstruction.json
    python bench/reconstruction.py --methods besa --sparsities 0.2,0.4 --json bench/results/reconstruction.json
    python bench/reconstruction.py --methods default --sparsities 0.4 --masks default-0.4=RUN/mask.safetensors --json ...

(``--masks``: masks made elsewhere, e.g. `bpp prune`'s, compensated and evaluated the same way;
``--refit-samples N``: the refit also fits N windows the dense model samples itself, text of no
one domain, to see whether the refit then travels to the other text.)

A run adds to the JSON it is given (rows already there are kept and not recomputed), so the grid
can be filled in parts; masks are cached in --cache.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from common import paired_bootstrap, window_nll

from bpp import load_model
from bpp.compaction import compact_model
from bpp.data import load_text, tokenize, window_bos, windows
from bpp.masks import Masks
from bpp.methods import baseline_mask
from bpp.methods.flap import compensation_for
from bpp.reconstruction import DAMPING, reconstruct
from bpp.space import MaskSpace

LICENCES = Path("/usr/share/common-licenses")


def licence_text() -> str:
    files = sorted(p for p in LICENCES.iterdir() if p.is_file() and not p.is_symlink())
    return "\n\n".join(p.read_text(errors="replace") for p in files)


def spread_windows(ids: torch.Tensor, seq_len: int, n: int | None) -> torch.Tensor:
    """``n`` non-overlapping windows spread evenly over ``ids`` (all of them when n is None)."""
    total = ids.numel() // seq_len
    data = ids[: total * seq_len].view(total, seq_len)
    if n is None or n >= total:
        return data
    return data[torch.linspace(0, total - 1, n).round().long()]


def model_samples(model, tok, n: int, seq_len: int, cache: Path, seed: int = 0) -> torch.Tensor:
    """``(n, seq_len)`` token ids the dense model samples itself (temperature 1, no truncation),
    each from the BOS token (EOS where there is none), seeded; cached in ``cache``."""
    path = cache / f"samples-{n}x{seq_len}-seed{seed}.pt"
    if path.is_file():
        return torch.load(path)
    torch.manual_seed(seed)
    first = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    start = torch.full((n, 1), first, dtype=torch.long)
    t0 = time.perf_counter()
    with torch.no_grad():
        ids = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, max_new_tokens=seq_len, min_new_tokens=seq_len,
                             pad_token_id=tok.eos_token_id)[:, 1:seq_len + 1]
    print(f"sampled {n} x {seq_len} tokens from the dense model in {time.perf_counter() - t0:.0f} s", flush=True)
    torch.save(ids, path)
    return ids


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="flap,besa")
    ap.add_argument("--sparsities", default="0.2,0.4")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=None, help="windows per text (default: all)")
    ap.add_argument("--damping", default=str(DAMPING), help="λ of the reconstruction; several: a comma list")
    ap.add_argument("--cache", default="/tmp/bpp-reconstruction-cache", help="folder for the methods' masks")
    ap.add_argument("--masks", default="", help="masks made elsewhere, as method-sparsity=path (e.g. the mask of a "
                    "bpp prune run: default-0.4=RUN/mask.safetensors), used when that method and sparsity are asked")
    ap.add_argument("--refit-samples", type=int, default=0, help="refit on the calibration windows and this many "
                    "windows the dense model samples itself (--calib-seq-len tokens each); the bias stays on the text")
    ap.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration windows (bpp prune --seed S "
                    "calibrates on seed S's windows)")
    ap.add_argument("--targets", default="residual", help="the refit's targets, a comma list: residual (the dense "
                    "residual stream; the default where the model allows) and/or output (each projection's dense output)")
    ap.add_argument("--json", default="bench/results/reconstruction.json")
    ap.add_argument("--versus", default=None, help="also compare this method's rows with every other method's at "
                    "the same sparsity, compensation and text (e.g. default), from the JSON")
    args = ap.parse_args()
    if args.refit_samples < 0:
        ap.error(f"--refit-samples must be >= 0, got {args.refit_samples}")

    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {"meta": {}, "models": {}, "comparisons": []}
    results["meta"].setdefault("commands", []).append(
        {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "host": platform.node(), "threads": torch.get_num_threads(), "torch": torch.__version__})
    save = lambda: path.write_text(json.dumps(results, indent=1) + "\n")  # noqa: E731

    model, tok = load_model()
    space = MaskSpace.from_model(model)
    calib = windows(tok, load_text("default", "calib"), args.calib_seq_len, args.calib_windows, seed=args.calib_seed,
                    bos=window_bos(model))
    targets = args.targets.split(",")
    if not set(targets) <= {"residual", "output"}:
        ap.error(f"--targets takes residual and/or output, got {args.targets!r}")
    texts = {"default/heldout": spread_windows(tokenize(tok, load_text("default", "heldout")), 128, args.eval_windows),
             "licences": spread_windows(tokenize(tok, licence_text()), 128, args.eval_windows)}
    results["meta"].update({"calib": f"default/calib, {args.calib_windows} x {args.calib_seq_len}, seed {args.calib_seed}",
                            "eval_windows": {k: int(v.shape[0]) for k, v in texts.items()}, "default_damping": DAMPING})
    dampings = [x if x == "auto" else float(x) for x in args.damping.split(",")]

    def evaluate(key: str, small) -> dict:
        if key not in results["models"]:
            t0 = time.perf_counter()
            results["models"][key] = {text: window_nll(small, data).tolist() for text, data in texts.items()}
            results["models"][key]["eval_seconds"] = time.perf_counter() - t0
            ppl = {t: math.exp(sum(v) / len(v)) for t, v in results["models"][key].items() if t in texts}
            print(f"{key}: " + ", ".join(f"{t} {p:.3f}" for t, p in ppl.items()), flush=True)
            save()
        return results["models"][key]

    evaluate("dense", model)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    refit_calib, suffix = calib, ""
    if args.refit_samples > 0:
        refit_calib = torch.cat([calib, model_samples(model, tok, args.refit_samples, args.calib_seq_len, cache)])
        suffix = f" +{args.refit_samples} samples"
        results["meta"]["refit_samples"] = args.refit_samples
    for method in args.methods.split(","):
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            tag = f"{method} {sparsity:g}"
            seed_tag = f"-seed{args.calib_seed}" if args.calib_seed else ""
            mask_file = cache / f"{method}-{sparsity:g}-{args.calib_windows}x{args.calib_seq_len}{seed_tag}.safetensors"
            given = dict(x.split("=", 1) for x in args.masks.split(",") if x)
            if f"{method}-{sparsity:g}" in given:
                mask = Masks.load(given[f"{method}-{sparsity:g}"])
                results.setdefault("mask_files", {})[tag] = given[f"{method}-{sparsity:g}"]
            elif mask_file.is_file():
                mask = Masks.load(mask_file)
            else:
                t0 = time.perf_counter()
                mask = baseline_mask(method, model, space, calib, sparsity)
                mask.save(mask_file)
                results.setdefault("mask_seconds", {})[tag] = time.perf_counter() - t0
            results.setdefault("params", {})[tag] = int(space.params(mask)[0])
            rows = {}
            fits = [(f"reconstruct λ={lam if lam == 'auto' else format(lam, 'g')} {target}{suffix}", lam, target)
                    for target in targets for lam in dampings]
            refits = [name for name, _, _ in fits]
            for comp, lam, target in [("none", None, None), ("bias", None, None)] + fits:
                key = f"{tag} {comp}"
                if key not in results["models"]:
                    t0 = time.perf_counter()
                    if comp == "none":
                        extra = {}
                    elif comp == "bias":
                        extra = compensation_for(model, mask, calib)
                    else:
                        recon = reconstruct(model, mask, refit_calib, damping=lam, progress=True,
                                            residual=target == "residual")
                        extra = recon.compact_kwargs()
                        results.setdefault("reconstruction", {})[key] = {
                            "seconds": time.perf_counter() - t0, "tokens": recon.tokens, "damping": lam,
                            "errors": recon.errors}
                    small = compact_model(model, mask, **extra)
                    evaluate(key, small)
                rows[comp] = results["models"][key]
            for text, refit, other in ((t, r, o) for t in texts for r in refits for o in ("bias", "none")):
                    rec = {"method": method, "sparsity": sparsity, "text": text, "a": refit, "b": other,
                           **paired_bootstrap(torch.tensor(rows[refit][text], dtype=torch.float64),
                                              torch.tensor(rows[other][text], dtype=torch.float64))}
                    results["comparisons"] = [c for c in results["comparisons"]
                                              if (c["method"], c["sparsity"], c["text"], c["a"], c["b"]) !=
                                              (method, sparsity, text, refit, other)] + [rec]
            save()

    print("\n| mask | sparsity | text (refit) | none | bias | reconstruct | reconstruct − bias [95% CI] | reconstruct − none [95% CI] |")
    print("|---|---|---|---|---|---|---|---|")
    dense = results["models"]["dense"]
    for text in texts:
        print(f"| dense | 0 | {text} | {math.exp(sum(dense[text]) / len(dense[text])):.2f} | | | | |")
    by_key = {(c["method"], c["sparsity"], c["text"], c["a"], c["b"]): c for c in results["comparisons"]}
    for (method, sparsity, text, a, b), c in sorted(by_key.items()):
        if b != "bias":
            continue
        none = by_key[(method, sparsity, text, a, "none")]
        print(f"| {method} | {sparsity:g} | {text} ({a}) | {none['ppl_b']:.2f} | {c['ppl_b']:.2f} | {c['ppl_a']:.2f} | "
              f"{c['mean_difference']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] | "
              f"{none['mean_difference']:+.2f} [{none['ci95'][0]:+.2f}, {none['ci95'][1]:+.2f}] |")
    if args.versus:
        versus(results, args.versus)


def versus(results: dict, method: str) -> None:
    """``method`` against every other method at the same sparsity and text: each compensation of
    one against each of the other (paired over the same windows), as a markdown table."""
    models = results["models"]
    rows = []
    for key in sorted(models):
        parts = key.split(" ", 2)
        if len(parts) < 3 or parts[0] != method:
            continue
        sparsity, comp = parts[1], parts[2]
        for other in sorted(models):
            o = other.split(" ", 2)
            if len(o) < 3 or o[0] == method or o[1] != sparsity:
                continue
            for text in (t for t in models[key] if t != "eval_seconds" and t in models[other]):
                c = paired_bootstrap(torch.tensor(models[key][text], dtype=torch.float64),
                                     torch.tensor(models[other][text], dtype=torch.float64))
                rows.append((sparsity, text, f"{method} + {comp}", f"{o[0]} + {o[2]}", c))
    print(f"\n| sparsity | text | {method} | other | ppl | other ppl | difference [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for sparsity, text, a, b, c in rows:
        print(f"| {sparsity} | {text} | {a} | {b} | {c['ppl_a']:.2f} | {c['ppl_b']:.2f} | {c['mean_difference']:+.2f} "
              f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] |")


if __name__ == "__main__":
    main()
