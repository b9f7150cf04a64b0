"""How masks/s and peak memory of the batched masked engine grow with the model, the number of
masks S and the tokens per call, against the hook loop.

Models: SmolLM2's published shapes (Llama, tied embeddings, vocabulary 49,152) with random
weights, fp32 (speed does not depend on the values): 135M (d 576, 30 layers, 1,536 channels,
9 heads in 3 KV groups), 360M (960, 32, 2,560, 15 heads in 5 groups), 1.7B (2,048, 24, 8,192,
32 heads in 32 groups). Masks: random per sample, each keeping in every layer a random 60% of the
MLP channels and round(0.6 G) of the G KV groups (135M: 2 of 3; 360M: 3 of 5; 1.7B: 19 of 32).
Tokens per call are B × T windows of the default text with T = min(tokens, 512).

- batched: ``bpp.MaskedModel.losses`` with the C++ ops, all S masks in one call
- hook loop: one Hugging Face forward per mask with multiplicative hook masks

Each model is measured along one-factor-at-a-time sweeps through a centre point (S over its
list at the centre's tokens, tokens over their list at the centre's S), the hook loop at a few of
those points. Per point: one call whose peak RSS above the RSS before it is the point's memory
(measured in this process, after handing the heap's free memory back: :func:`common.peak_rss_of`),
then ``repeats`` timed calls, their median the time (with no repeats, that first call's time).
Times are the process's CPU seconds (run it with one thread: on a host shared with other jobs, the
time spent waiting for a core is then left out), the wall-clock times beside them.
Every point is merged into the JSON as it is measured, so a sweep can be run model by model.
The table reprints the fits: log time = log c + a log S + b log tokens + p log(params computed
per token), by least squares with standard errors, and peak memory as a line in S × tokens.

    OMP_NUM_THREADS=1 python bench/scaling.py --quick                    # seconds: 135M, S 1-2, 128 tokens
    OMP_NUM_THREADS=1 python bench/scaling.py --models 135M,360M,1.7B    # the sweeps below (PLANS)
    python bench/scaling.py --table-only                                 # the table, fits and plot again
    python bench/scaling.py --save-model /tmp/FOLDER --models 1.7B       # the random model + tokenizer
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import common
import masked_forward

VOCAB = 49152
SHAPES = {  # SmolLM2's config.json sizes
    "135M": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                 num_key_value_heads=3),
    "360M": dict(hidden_size=960, num_hidden_layers=32, intermediate_size=2560, num_attention_heads=15,
                 num_key_value_heads=5),
    "1.7B": dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=8192, num_attention_heads=32,
                 num_key_value_heads=32),
}
KEEP = 0.6
MAX_T = 512
BATCHED, HOOK = "batched/cpp", "hook loop (a)"


@dataclass
class Plan:
    """One model's sweeps: S over ``samples`` at ``centre_tokens``, tokens over ``tokens`` at
    ``centre_samples``; the hook loop at the ``hook`` points (S, tokens)."""

    samples: tuple
    tokens: tuple
    centre_samples: int
    centre_tokens: int
    hook: tuple
    repeats: int

    def points(self):
        """(method, S, tokens) in the order they run: smallest work first within each method."""
        batched = {(s, self.centre_tokens) for s in self.samples} | {(self.centre_samples, t) for t in self.tokens}
        return ([(BATCHED, s, t) for s, t in sorted(batched, key=lambda p: (p[0] * p[1], p))]
                + [(HOOK, s, t) for s, t in sorted(self.hook, key=lambda p: (p[0] * p[1], p))])


PLANS = {
    "135M": Plan((1, 2, 4, 8, 16, 32), (128, 256, 512, 1024, 2048), 8, 256, ((1, 256), (8, 256), (8, 128), (8, 1024)), 2),
    "360M": Plan((1, 2, 4, 8, 16, 32), (128, 256, 512, 1024), 8, 256, ((1, 256), (8, 128), (8, 256)), 0),
    "1.7B": Plan((1, 4, 8), (128, 256, 1024), 4, 256, ((1, 256), (4, 256)), 0),
}
QUICK = Plan((1, 2), (128,), 1, 128, ((1, 128), (2, 128)), 1)


def random_model(name: str, dtype: torch.dtype = torch.float32):
    """SmolLM2-``name``'s shape with N(0, 0.02) weights and unit norms in ``dtype``, built without
    the slow default initialisation (on the meta device, then filled)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=8192,
                         rope_theta=100000.0, bos_token_id=0, eos_token_id=0, dtype=dtype, **SHAPES[name])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device="cpu")
    model.tie_weights()  # to_empty gives the tied head its own storage
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers were left empty
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def default_tokenizer():
    """The embedded default's tokenizer (SmolLM2's, the same 49,152 tokens as every shape here)."""
    from transformers import AutoTokenizer

    from bpp.embedded import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def batch_shape(tokens: int) -> tuple[int, int]:
    T = min(tokens, MAX_T)
    return tokens // T, T


def measure(model, tok, masked, method: str, S: int, tokens: int, repeats: int) -> dict:
    """One point: the first call's peak memory, then the median time of ``repeats`` calls."""
    B, T = batch_shape(tokens)
    fn = masked_forward.build(method, model, tok, S, B, T, keep=KEEP, masked=masked)
    t0, c0 = time.perf_counter(), time.process_time()
    losses, peak_mb = common.peak_rss_of(fn)
    times, cpu_times = [time.perf_counter() - t0], [time.process_time() - c0]
    if repeats:
        times, cpu_times = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    import bpp

    space = bpp.MaskSpace.from_model(model)
    kept = float(space.params(common.random_masks(space, S, KEEP)).double().mean())
    return {"method": method, "S": S, "tokens": tokens, "B": B, "T": T, "seconds": statistics.median(cpu_times),
            "cpu_times": cpu_times, "wall_seconds": statistics.median(times), "wall_times": times, "peak_mb": peak_mb,
            "losses": losses.tolist(),
            "params_per_token": kept if method == BATCHED else float(space.total_params)}


def rss_mb() -> float:
    return common.status_kib("VmRSS") / 1024.0


def run_model(name: str, plan: Plan, tok, path: Path) -> None:
    import bpp

    os.environ["BPP_KERNELS_BACKEND"] = "cpp"
    before = rss_mb()
    t0 = time.perf_counter()
    model = random_model(name)
    built = time.perf_counter() - t0
    model_mb = rss_mb() - before
    masked = bpp.MaskedModel(model)
    engine_mb = rss_mb() - before - model_mb
    space = bpp.MaskSpace.from_model(model)
    info = {"total_params": int(space.total_params), "model_mb": model_mb, "engine_pack_mb": engine_mb,
            "build_seconds": built, "repeats": plan.repeats}
    print(f"{name}: {space.total_params / 1e6:.1f}M parameters, model {model_mb:.0f} MiB, packed engine weights "
          f"{engine_mb:.0f} MiB (built in {built:.0f}s)", flush=True)
    masked_forward.build(BATCHED, model, tok, 1, 1, 128, keep=KEEP, masked=masked)()  # first-call costs, untimed
    for method, S, tokens in plan.points():
        if method == HOOK and masked is not None:
            masked = None  # the hook loop needs only the model: free the packed copy of its weights
        row = {"model": name, **measure(model, tok, masked, method, S, tokens, plan.repeats)}
        print(f"  {method:<14} S={S:<3} tokens={tokens:<5} {row['seconds']:8.2f} CPU s/call ({row['wall_seconds']:.2f} wall)  "
              f"{S / row['seconds']:7.3f} masks/s  peak {row['peak_mb']:7.0f} MiB", flush=True)
        save(path, name, info, row)


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"meta": {}, "models": {}, "rows": []}


def save(path: Path, name: str, info: dict, row: dict) -> None:
    """Merge one point into the JSON (replacing the same model, method, S and tokens)."""
    data = load(path)
    data["models"][name] = info
    data["meta"][name] = {"date": common.utc_now(), "machine": common.machine_line(), "command": " ".join(sys.argv)}
    key = lambda r: (r["model"], r["method"], r["S"], r["tokens"])  # noqa: E731
    data["rows"] = [r for r in data["rows"] if key(r) != key(row)] + [row]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


# --- fits, table, plot ---------------------------------------------------------------------------


def log_fit(rows: list[dict], factors: list[str]) -> dict | None:
    """Least squares of log seconds on log(factor) for each factor that varies among ``rows``:
    exponents with standard errors, and the fit's RMS residual (as a factor)."""
    import numpy as np

    names = [f for f in factors if len({r[f] for r in rows}) > 1]
    if len(rows) <= len(names) + 1:
        return None
    X = np.array([[1.0] + [math.log(r[f]) for f in names] for r in rows])
    y = np.array([math.log(r["seconds"]) for r in rows])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    dof = len(rows) - X.shape[1]
    sigma2 = float(resid @ resid) / dof
    se = np.sqrt(np.diag(sigma2 * np.linalg.inv(X.T @ X)))
    return {"exponents": {f: (float(c), float(s)) for f, c, s in zip(names, coef[1:], se[1:])},
            "rms_residual_factor": math.exp(math.sqrt(float(resid @ resid) / len(rows))), "points": len(rows)}


def memory_fit(rows: list[dict], per_mask: bool) -> dict | None:
    """Peak MiB = α + β · work by least squares, β in bytes per unit of work: S · tokens with
    ``per_mask`` (the batched engine holds all S masks' activations), else tokens (the hook loop
    holds one mask's at a time)."""
    import numpy as np

    work = [r["S"] * r["tokens"] if per_mask else r["tokens"] for r in rows]
    if len(set(work)) < 2:
        return None
    X = np.array([[1.0, w] for w in work])
    y = np.array([r["peak_mb"] for r in rows])
    (alpha, beta), *_ = np.linalg.lstsq(X, y, rcond=None)
    return {"alpha_mb": float(alpha), "bytes_per_unit": float(beta) * 2 ** 20, "unit": "mask-token" if per_mask else "token"}


def per_mask_fit(rows: list[dict]) -> dict | None:
    """Seconds per mask = f + g · tokens by least squares over one S's tokens sweep: f is what a
    mask costs whatever the tokens (gathering its kept weights), g what each token adds."""
    import numpy as np

    if len({r["tokens"] for r in rows}) < 2:
        return None
    X = np.array([[1.0, r["tokens"]] for r in rows])
    y = np.array([r["seconds"] / r["S"] for r in rows])
    (f, g), *_ = np.linalg.lstsq(X, y, rcond=None)
    return {"S": rows[0]["S"], "fixed_s": float(f), "per_token_s": float(g)}


FACTORS = ["S", "tokens", "params_per_token"]


def fits(data: dict) -> dict:
    out = {}
    for method in (BATCHED, HOOK):
        rows = [r for r in data["rows"] if r["method"] == method]
        out[method] = {"joint": log_fit(rows, FACTORS),
                       **{m: log_fit([r for r in rows if r["model"] == m], FACTORS) for m in data["models"]}}
        out[method]["memory"] = {m: memory_fit([r for r in rows if r["model"] == m], method == BATCHED)
                                 for m in data["models"]}
        out[method]["per_mask"] = {m: per_mask_fit([r for r in rows if r["model"] == m
                                                    and r["S"] == PLANS[m].centre_samples]) for m in data["models"]}
    return out


def _fmt_fit(fit: dict | None) -> str:
    if fit is None:
        return "too few points"
    exps = ", ".join(f"{f} ^ {c:.3f} ± {s:.3f}" for f, (c, s) in fit["exponents"].items())
    return f"{exps} (RMS residual ×{fit['rms_residual_factor']:.3f}, {fit['points']} points)"


def _fmt_per_mask(fit: dict, model: str) -> str:
    share = fit["fixed_s"] / (fit["fixed_s"] + 256 * fit["per_token_s"])
    return (f"at S = {fit['S']}, f = {fit['fixed_s']:.3f} s, g = {1e3 * fit['per_token_s']:.2f} ms per token (f is "
            f"{share:.0%} of a mask's time at 256 tokens)")


def _fmt_memory(fit: dict, model: str) -> str:
    d, beta = SHAPES[model]["hidden_size"], fit["bytes_per_unit"]
    return (f"α = {fit['alpha_mb']:.0f} MiB, β = {beta:,.0f} bytes per {fit['unit']} = {beta / (4 * d):.1f} fp32 rows "
            f"of d = {d}, {beta / (4 * VOCAB):.3f} of a fp32 logit row ({4 * VOCAB:,} bytes)")


def _per_model_lines(title: str, fitted: dict, kind: str, models: list[str], fmt) -> list[str]:
    """A titled list of each method's and model's ``kind`` fit (those with enough points)."""
    return ["", title, ""] + [f"- {method}, {m}: {fmt(fitted[method][kind][m], m)}" for method in (BATCHED, HOOK)
                              for m in models if fitted[method][kind][m] is not None]


def table(data: dict) -> str:
    models = [m for m in SHAPES if m in data["models"]]
    order = {m: i for i, m in enumerate(models)}
    rows = sorted(data["rows"], key=lambda r: (order.get(r["model"], 99), r["S"] * r["tokens"], r["S"], r["method"]))
    by = {(r["model"], r["method"], r["S"], r["tokens"]): r for r in rows}
    lines = ["| model | S | tokens (B×T) | method | CPU s/call | wall s/call | masks/s (CPU) | peak MiB over loaded | "
             "× hook loop |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hook = by.get((r["model"], HOOK, r["S"], r["tokens"]))
        ratio = f"{hook['seconds'] / r['seconds']:.2f}×" if hook and r["method"] == BATCHED else ""
        lines.append(f"| {r['model']} | {r['S']} | {r['tokens']} ({r['B']}×{r['T']}) | {r['method']} | "
                     f"{r['seconds']:.3f} | {r['wall_seconds']:.3f} | {r['S'] / r['seconds']:.3f} | {r['peak_mb']:,.0f} | "
                     f"{ratio} |")
    lines.append("")
    lines.append("| model | parameters | model RSS MiB | packed engine weights MiB |")
    lines.append("|---|---|---|---|")
    for m in models:
        info = data["models"][m]
        lines.append(f"| {m} | {info['total_params'] / 1e6:.1f}M | {info['model_mb']:,.0f} | {info['engine_pack_mb']:,.0f} |")
    f = fits(data)
    lines.append("")
    lines.append("Fits of log(s/call) on log S, log tokens and log(parameters computed per token: kept for "
                 "the batched engine, all for the hook loop):")
    lines.append("")
    for method in (BATCHED, HOOK):
        lines.append(f"- {method}, all models: {_fmt_fit(f[method]['joint'])}")
        for m in models:
            lines.append(f"  - {m}: {_fmt_fit(f[method][m])}")
    lines += _per_model_lines("Seconds per mask as f + g · tokens along each tokens sweep:", f, "per_mask", models,
                              _fmt_per_mask)
    lines += _per_model_lines("Peak memory over the loaded model as α + β · S · tokens (batched) or α + β · tokens "
                              "(hook loop):", f, "memory", models, _fmt_memory)
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    """masks/s against S (at each model's centre tokens) and against tokens (at its centre S), log
    axes, one line per model and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, m in enumerate(m for m in SHAPES if m in data["models"]):
        plan = PLANS[m]
        for method, style in ((BATCHED, "-"), (HOOK, "--")):
            rows = [r for r in data["rows"] if r["model"] == m and r["method"] == method]
            for ax, fixed, var, value in ((axes[0], "tokens", "S", plan.centre_tokens),
                                          (axes[1], "S", "tokens", plan.centre_samples)):
                pts = sorted((r[var], r["S"] / r["seconds"]) for r in rows if r[fixed] == value)
                if len(pts) > 1 or (pts and method == HOOK):
                    ax.plot(*zip(*pts), style, marker="o", ms=4, color=f"C{i}",
                            label=f"{m} {method.split('/')[0].split(' (')[0]} ({fixed} {value})")
    for ax, xlabel in ((axes[0], "masks per call S"), (axes[1], "tokens per call (B × T)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("masks/s")
        ax.grid(alpha=0.3, which="both")
    for ax in axes:
        ax.legend(fontsize=7, handlelength=3.5)
    fig.suptitle("batched masked engine (solid) vs hook loop (dashed), fp32, one thread, CPU time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_model(folder: Path, name: str) -> None:
    """The random model in bfloat16 safetensors (as SmolLM2 is published) and the default tokenizer."""
    random_model(name, torch.bfloat16).save_pretrained(folder)
    default_tokenizer().save_pretrained(folder)
    print(f"wrote {folder}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="135M", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--quick", action="store_true", help="135M, S = 1 and 2, 128 tokens (a check that takes seconds)")
    p.add_argument("--json", default="bench/results/scaling.json")
    p.add_argument("--plot", default="bench/results/scaling.png")
    p.add_argument("--table-only", action="store_true", help="reprint the table, fits and plot from --json")
    p.add_argument("--save-model", type=Path, help="write the random model of --models (one) to this folder and stop")
    a = p.parse_args()
    if a.save_model:
        save_model(a.save_model, a.models)
        return
    path = Path(a.json)
    if a.quick and a.json == p.get_default("json"):  # a check: leave the results alone
        path = Path(tempfile.gettempdir()) / "scaling-quick.json"
    if not a.table_only:
        tok = default_tokenizer()
        print(f"machine: {common.machine_line()}", flush=True)
        for name in (["135M"] if a.quick else a.models.split(",")):
            run_model(name, QUICK if a.quick else PLANS[name], tok, path)
    data = load(path)
    print("\n" + table(data))
    if not a.quick:
        plot(data, Path(a.plot))
        print(f"\nplot: {a.plot}")


if __name__ == "__main__":
    main()
