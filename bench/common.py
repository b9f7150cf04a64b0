"""Helpers shared by the bench scripts: the machine line every table starts with, peak memory,
the embedded default model and text, per-window held-out NLLs with a paired bootstrap, and the
bookkeeping of the quality tables.

The scripts run as ``python bench/X.py`` from the repository root, so this folder is first on
sys.path and ``import common`` finds this file; for the same reason no file here may take the
name of an installed package that a library imports (``kernels.py`` would shadow Hugging Face's
``kernels``, which transformers imports). Nothing here imports another bench script, and bpp is
imported inside the functions that need it, so the kernel benchmarks that import this module need
only torch and bpp_kernels.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# --- the machine ---------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo; the architecture where that file is not readable."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_line() -> str:
    """``"<cpu>, <n> cores, torch <version> (<t> threads)"``: what every CPU table names."""
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (``"VmRSS"``, ``"VmHWM"``). Linux only."""
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS and return that RSS in KiB.

    VmHWM rather than ru_maxrss: Linux carries ru_maxrss over an exec, so a child process would
    start at its parent's peak. Linux only."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS")


def peak_rss_of(fn):
    """``(fn(), MB)``: ``fn``'s result and the peak RSS it reached above the RSS before it, measured
    in this process. The heap's free memory goes back to the system first (glibc's malloc_trim),
    so that memory freed by earlier calls does not hide this one's allocations. Linux only."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = reset_peak_rss()
    out = fn()
    return out, (status_kib("VmHWM") - before) / 1024.0


# --- the embedded default ------------------------------------------------------------------------


@dataclass
class Default:
    """The embedded default model (SmolLM2-135M-Instruct, fp32) and its text, tokenized."""

    model: torch.nn.Module
    tok: object
    space: object  # bpp.MaskSpace of ``model``
    calib: torch.Tensor  # (n,) token ids of the calibration part
    held: torch.Tensor  # (n,) token ids of the held-out part


def load_default(model_name: str | None = None) -> Default:
    """The embedded default model (or ``model_name``: any model ``bpp.load_model`` takes) and the
    embedded default text tokenized by its tokenizer."""
    from bpp import MaskSpace, load_model
    from bpp.data import load_text, tokenize

    model, tok = load_model(model_name)
    return Default(model, tok, MaskSpace.from_model(model), tokenize(tok, load_text("default", "calib")),
                   tokenize(tok, load_text("default", "heldout")))


def random_masks(space, S: int, keep: float | None = None, seed: int = 0):
    """``S`` random masks of ``space`` (a bpp.MaskSpace) that keep every layer and, in each layer, a
    random ``keep`` fraction of its MLP channels and of its KV groups (rounded, at least one); with
    ``keep=None``, half the channels and all KV groups but one (all of a single one)."""
    from bpp import Masks

    g = torch.Generator().manual_seed(seed)
    L, m, G = space.n_layers, space.n_channels, space.n_groups
    n_channels = m // 2 if keep is None else max(1, round(keep * m))
    n_groups = max(G - 1, 1) if keep is None else max(1, round(keep * G))
    channels = torch.zeros(S, L, m, dtype=torch.bool)
    groups = torch.zeros(S, L, G, dtype=torch.bool)
    for s in range(S):
        for layer in range(L):
            channels[s, layer, torch.randperm(m, generator=g)[:n_channels]] = True
            groups[s, layer, torch.randperm(G, generator=g)[:n_groups]] = True
    return Masks(channels, groups, torch.ones(S, L, dtype=torch.bool))


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


# --- held-out windows and paired comparisons -----------------------------------------------------


def window_nll(model, ids: torch.Tensor, seq_len: int = 128, max_windows: int | None = None,
               batch_size: int = 8) -> torch.Tensor:
    """:func:`bpp.evaluation.window_nll`: (n,) float64 mean NLL of each held-out window."""
    from bpp.evaluation import window_nll as nll

    return nll(model, ids, seq_len, max_windows, batch_size)


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, n: int = 10_000, seed: int = 0) -> dict:
    """ppl(a) − ppl(b) over windows resampled together: mean, 95% interval, P(a worse)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, a.numel(), (n, a.numel()), generator=g)
    diff = torch.exp(a[idx].mean(1)) - torch.exp(b[idx].mean(1))
    lo, hi = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"ppl_a": math.exp(float(a.mean())), "ppl_b": math.exp(float(b.mean())),
            "mean_difference": math.exp(float(a.mean())) - math.exp(float(b.mean())),
            "ci95": [lo, hi], "p_a_not_better": float((diff >= 0).double().mean())}


# --- runs of bpp prune ---------------------------------------------------------------------------


def prune_run(config, model, tok, out: Path, snapshots=()) -> dict:
    """``bpp prune`` with ``config`` into the folder ``out`` on an already loaded model: no evaluation,
    no compaction, no checkpoints. Returns its report; the mask is ``out / "mask.safetensors"``."""
    from bpp.jobs.prune import prune

    return prune(config, out, model=model, tokenizer=tok, evaluate=False, progress=False, compact=False,
                 checkpoint_every=0, snapshots=snapshots)


def pg_mask(model, tok, config):
    """``bpp prune``'s final mask for ``config`` (no evaluation, no compaction) and its report."""
    from bpp.masks import Masks

    with tempfile.TemporaryDirectory() as tmp:
        report = prune_run(config, model, tok, Path(tmp) / "run")
        return Masks.load(Path(tmp) / "run" / "mask.safetensors"), report


# --- the quality tables (bench/quality.py, bench/quality_companions.py) ---------------------------

# the per-unit policy of the quality tables: `--policy units` without bias compensation in the loss
# and without the incumbent
UNITS = dict(policy="units", bias_compensation=False, incumbent_every=0)
# its row with the units policy's own defaults (S=8, moving-average baseline): the PG mask the
# companion rows transform
UNITS_DEFAULT_ROW = "PG S=8 moving-avg (units default)"
UNITS_DEFAULT = dict(samples=8, baseline="moving-average")



class QualityTable:
    """Rows of held-out perplexity (seq_len 128) of masks and models on ``held``, printed as they come
    and written as a Markdown table plus raw JSON."""

    def __init__(self, model, tok, space, held: torch.Tensor, eval_windows: int | None):
        self.model, self.tok, self.space, self.held, self.eval_windows = model, tok, space, held, eval_windows
        self.rows: list[dict] = []

    def _add(self, method, sparsity, params, seconds, note, evaluate):
        t0 = time.perf_counter()
        value = evaluate()
        self.rows.append(dict(method=method, sparsity=sparsity, params=params, ppl=value,
                              seconds=seconds, eval_seconds=time.perf_counter() - t0, note=note))
        print(f"{method:<34} s={sparsity:<4} params {params / 1e6:7.2f}M  ppl {value:9.3f}  "
              f"({seconds:.0f}s){'  ' + note if note else ''}", flush=True)

    def mask(self, method, sparsity, mask, seconds, note=""):
        """A row for ``mask`` evaluated on the masked dense model (``None``: the dense model)."""
        from bpp.evaluation import masked_perplexity

        params = int(self.space.params(mask)[0]) if mask is not None else self.space.total_params
        self._add(method, sparsity, params, seconds, note,
                  lambda: masked_perplexity(self.model, self.tok, self.held, mask, 128, self.eval_windows))

    def compacted_model(self, method, sparsity, small, params, seconds, note=""):
        """A row for an already-built (compacted) model."""
        from bpp.evaluation import perplexity

        self._add(method, sparsity, params, seconds, note,
                  lambda: perplexity(small, self.tok, self.held, seq_len=128, max_windows=self.eval_windows))

    def bias_compensated(self, method, sparsity, mask, stats, seconds, note=""):
        """``mask`` compacted with FLAP-style bias compensation from ``stats``, evaluated as the compacted
        model."""
        from bpp.compaction import compact_model
        from bpp.methods.flap import compensation_biases

        attn_bias, mlp_bias = compensation_biases(self.model, mask, stats)
        small = compact_model(self.model, mask, o_proj_bias=attn_bias, down_proj_bias=mlp_bias)
        self.compacted_model(method, sparsity, small, int(self.space.params(mask)[0]), seconds, note)

    def markdown(self) -> str:
        lines = ["| method | sparsity | params (M) | held-out ppl | time (s) | note |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['method']} | {r['sparsity']:g} | {r['params'] / 1e6:.2f} | {r['ppl']:.3f} | "
                         f"{r['seconds']:.0f} | {r['note']} |")
        return "\n".join(lines)

    def write(self, path: str, meta: dict) -> None:
        """Print the Markdown table and write it, the rows and ``meta`` to ``path`` as JSON."""
        table = self.markdown()
        print("\n" + table)
        Path(path).write_text(json.dumps({"meta": meta, "rows": self.rows, "table": table}, indent=2) + "\n")


def pg_rows(table: QualityTable, name: str, sparsity: float, config, stats, compensated: bool = True):
    """Run ``bpp prune`` with ``config``, add its mask's row and, with ``compensated``, the row of the
    same mask compacted with bias compensation from ``stats``; return the mask."""
    mask, report = pg_mask(table.model, table.tok, config)
    t = report["timings_s"]
    seconds = t["init"] + t["policy_gradient"]
    table.mask(name, sparsity, mask, seconds,
               f"{config.steps} steps, {t['per_step']:.1f}s/step, {report['losses_backend']}")
    if compensated:
        table.bias_compensated(name + " + bias compensation", sparsity, mask, stats, seconds,
                               "`bpp compact --bias-compensation`")
    return mask


# --- paired comparisons of compacted models (bench/quality_allocation.py, bench/estimators.py) ---


class QualityBench:
    """The default model and text, held-out window NLLs of compacted masks (cached by key), ``bpp prune``
    runs (cached by configuration) and paired-bootstrap comparisons, all saved to ``args.json`` as they
    come. ``prune_defaults`` is a default ``PruneConfig``: its init windows are the calibration windows
    of every seed."""

    def __init__(self, args, prune_defaults):
        self.args = args
        self.prune_defaults = prune_defaults
        default = load_default(getattr(args, "model", None))
        self.model, self.tok, self.space = default.model, default.tok, default.space
        self.calib, self.held = default.calib, default.held
        self.results = {"meta": {"date": utc_now(), "threads": torch.get_num_threads(),
                                 "eval_windows": args.eval_windows, "command": " ".join(sys.argv),
                                 "model": getattr(args, "model", None) or "default"},
                        "runs": [], "comparisons": []}
        self.nll_cache: dict[str, torch.Tensor] = {}
        self.run_cache: dict[str, tuple] = {}  # one run per configuration (the default run is also --init besa)

    def save(self):
        Path(self.args.json).write_text(json.dumps(self.results, indent=1) + "\n")

    def nll(self, key: str, mask, comp) -> torch.Tensor:
        """Held-out window NLLs of ``mask`` compacted with ``comp``'s biases (``None``: without)."""
        from bpp.compaction import compact_model

        if key not in self.nll_cache:
            extra = comp.compact_biases(mask) if comp is not None else {}
            small = compact_model(self.model, mask, **extra)
            self.nll_cache[key] = window_nll(small, self.held, max_windows=self.args.eval_windows)
        return self.nll_cache[key]

    def init_calib(self, seed: int) -> torch.Tensor:
        from bpp.data import windows

        from bpp.data import window_bos

        d = self.prune_defaults
        return windows(self.tok, self.calib, d.init_seq_len, d.init_windows, seed=seed, bos=window_bos(self.model))

    def compensation(self, seed: int):
        from bpp.bias_compensation import BiasCompensation

        return BiasCompensation.collect(self.model, self.init_calib(seed))

    def run(self, name: str, config, snapshots=()) -> tuple:
        """(mask, report, run folder) of ``bpp prune`` with ``config``, run once per configuration."""
        from bpp.masks import Masks

        key = json.dumps(config.validate().to_dict(), sort_keys=True) + str(snapshots)
        if key in self.run_cache:
            return self.run_cache[key]
        tmp = Path(tempfile.mkdtemp(prefix="bpp-bench-"))
        t0 = time.perf_counter()
        report = prune_run(config, self.model, self.tok, tmp / "run", snapshots=snapshots)
        wall = time.perf_counter() - t0
        mask = Masks.load(tmp / "run" / "mask.safetensors")
        self.results["runs"].append({"name": name, "config": config.to_dict(), "wall_seconds": wall,
                                     "timings_s": report["timings_s"], "params": int(self.space.params(mask)[0]),
                                     "incumbent": {k: v for k, v in report.get("incumbent", {}).items()
                                                   if k != "history"},
                                     "allocation": report.get("allocation"), "init": report.get("init"),
                                     "init_choice": report.get("init_choice")})
        print(f"{name}: {wall:.0f}s, {int(self.space.params(mask)[0]):,} params", flush=True)
        self.run_cache[key] = (mask, report, tmp / "run")
        self.save()
        return self.run_cache[key]

    def compare(self, what: str, a: tuple[str, torch.Tensor], b: tuple[str, torch.Tensor], **extra):
        rec = {"what": what, "a": a[0], "b": b[0], **paired_bootstrap(a[1], b[1]), **extra}
        self.results["comparisons"].append(rec)
        print(f"  {a[0]} vs {b[0]}: {rec['ppl_a']:.3f} vs {rec['ppl_b']:.3f}, diff {rec['mean_difference']:+.3f} "
              f"[{rec['ci95'][0]:+.3f}, {rec['ci95'][1]:+.3f}]", flush=True)
        self.save()
