"""Companion-method rows of the quality table (bench/quality.py's setting: SmolLM2-135M-Instruct,
`--policy units`, held-out perplexity at seq_len 128), at the parameter count of the default PG
mask of the same sparsity:

- PG S=8 moving average, the units policy's default (as in bench/quality.py), alone and with
  FLAP-style bias compensation: the mask the Pangu Light and recovery rows transform.
- BESA: its blockwise learned allocation as a mask (alone and with FLAP-style bias compensation),
  and as the prior θ₀ of a PG run (``bpp prune --init besa --budget params``).
- LoRAPrune: its iterative LoRA-gradient mask, and as the prior θ₀ (``--init loraprune``).
- Pangu Light: the default PG mask compacted with Stabilized LayerNorm Pruning and with the RMSNorm
  scales absorbed into the next linear layers; Cross-Layer Attention Pruning on a mask that also
  drops layers.
- Recovery: the default PG mask compacted, then LoRA-fine-tuned (``bpp recover``) for a few steps
  on the calibration text; held-out perplexity after.

    python bench/quality_companions.py --sparsities 0.2 --eval-windows 40 --json bench/results/quality-20-companions.json
    python bench/quality_companions.py --rows pangu,recovery --steps 2 --eval-windows 4   # a smoke run

``python bench/quality_companions.py --engines`` instead times the two methods that take
gradients, BESA and LoRA recovery, through bpp_kernels' masked ops against the Hugging Face forward
(``engine="kernels"`` vs ``"hf"``) on the same inputs: wall time, peak RSS, held-out perplexity,
and whether the masks and loss curves agree (bench/RESULTS.md, "Gradients through the masked ops").
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import common
from bpp.compaction import compact_model
from bpp.data import windows
from bpp.search import PruneConfig

RECOVER_STEPS = 40
ROW_GROUPS = ("besa", "loraprune", "pangu", "recovery")


def prior_rows(table: common.QualityTable, sparsity, init_calib, stats, *, method: str, steps: int):
    """``method``'s own mask (alone and bias-compensated) and the PG run that starts from it."""
    from bpp.methods.besa import besa_mask
    from bpp.methods.loraprune import loraprune_mask

    name, fn = {"besa": ("BESA", besa_mask), "loraprune": ("LoRAPrune", loraprune_mask)}[method]
    t0 = time.perf_counter()
    mask = fn(table.model, table.space, init_calib, sparsity)
    seconds = time.perf_counter() - t0
    kept = f"{int(mask.groups.sum())}/{mask.groups[0].numel()} KV groups kept"
    table.mask(f"{name} mask", sparsity, mask, seconds, kept)
    table.bias_compensated(f"{name} mask + bias compensation", sparsity, mask, stats, seconds, kept)
    # one parameter budget, so PG keeps the method's allocation across unit types
    config = PruneConfig(sparsity=sparsity, steps=steps, init=method, budget="params",
                         **{**common.UNITS, **common.UNITS_DEFAULT})
    common.pg_rows(table, f"PG S=8 --init {method} --budget params", sparsity, config, stats)


def pangu_rows(table: common.QualityTable, sparsity, init_calib, base):
    """``base`` compacted with Pangu Light's re-initialisations, and CLAP on a layer-dropping mask."""
    from bpp.methods.pangu import PanguOptions, calibrate, transform

    model, space = table.model, table.space
    params = int(space.params(base)[0])

    def compacted(mask, **flags):
        t0 = time.perf_counter()
        options = calibrate(model, mask, init_calib, PanguOptions(**flags))
        return compact_model(model, mask, transform=transform(options)), time.perf_counter() - t0, options

    for flags in ({"slnp": True}, {"absorb_norms": True}, {"slnp": True, "absorb_norms": True}):
        small, seconds, _ = compacted(base, **flags)
        cli = " ".join("--" + k.replace("_", "-") for k in flags)
        table.compacted_model(f"{common.UNITS_DEFAULT_ROW} + {cli}", sparsity, small, params, seconds,
                              f"`bpp compact {cli}`")

    # CLAP needs dropped layers: a depth-pruning mask at about the same parameter count (the layers
    # whose output hidden state is most like their input, "block influence"), alone and with CLAP
    t0 = time.perf_counter()
    drop = layer_drop_mask(model, space, init_calib, round(sparsity * space.prunable_params / space.layer_params))
    seconds = time.perf_counter() - t0
    n = int((~drop.layers).sum())
    layer_params = int(space.params(drop)[0])
    table.mask(f"block-influence layer drop ({n} layers)", sparsity, drop, seconds, "depth pruning, no width pruning")
    small, more, options = compacted(drop, clap=True)
    table.compacted_model(f"block-influence layer drop ({n} layers) + --clap", sparsity, small, layer_params,
                          seconds + more, f"{len(options.report['clap_moved_groups'])} KV groups moved")


def recovery_row(table: common.QualityTable, sparsity, calib_ids, base, recover_steps: int):
    """``base`` compacted, then LoRA-fine-tuned by ``bpp recover`` on the calibration text."""
    from bpp.methods.lora_recovery import lora_recover

    small = compact_model(table.model, base)
    t0 = time.perf_counter()
    merged, _ = lora_recover(copy.deepcopy(small), table.tok, calib_ids, steps=recover_steps, progress=False)
    table.compacted_model(f"{common.UNITS_DEFAULT_ROW} + LoRA recovery", sparsity, merged,
                          int(table.space.params(base)[0]), time.perf_counter() - t0,
                          f"`bpp recover`, {recover_steps} steps of 4×128 tokens, rank 8")


def rows_main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", default="0.2")
    ap.add_argument("--rows", default=",".join(ROW_GROUPS),
                    help=f"comma-separated groups of rows, of {', '.join(ROW_GROUPS)} (default: all)")
    ap.add_argument("--steps", type=int, default=None, help="PG steps (default: bpp prune's default)")
    ap.add_argument("--eval-windows", type=int, default=None, help="held-out windows per perplexity (default all)")
    ap.add_argument("--recover-steps", type=int, default=RECOVER_STEPS)
    ap.add_argument("--json", default="bench/results/quality-companions.json", help="where to write the raw results")
    args = ap.parse_args(argv)
    groups = [g.strip() for g in args.rows.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(ROW_GROUPS))
    if unknown or not groups:
        ap.error(f"--rows: unknown group(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ROW_GROUPS)}")

    from bpp.bias_compensation import InputStats

    defaults = PruneConfig(**common.UNITS).validate()
    steps = args.steps or defaults.steps
    default = common.load_default()
    init_calib = windows(default.tok, default.calib, defaults.init_seq_len, defaults.init_windows, seed=defaults.seed)
    table = common.QualityTable(default.model, default.tok, default.space, default.held, args.eval_windows)
    with torch.no_grad():
        stats = InputStats(default.model).collect(init_calib)
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            config = PruneConfig(sparsity=sparsity, steps=steps, **common.UNITS, **common.UNITS_DEFAULT)
            base = common.pg_rows(table, common.UNITS_DEFAULT_ROW, sparsity, config, stats)
            for method in ("besa", "loraprune"):
                if method in groups:
                    prior_rows(table, sparsity, init_calib, stats, method=method, steps=steps)
            if "pangu" in groups:
                pangu_rows(table, sparsity, init_calib, base)
            if "recovery" in groups:
                recovery_row(table, sparsity, default.calib, base, args.recover_steps)
    meta = {"steps": steps, "eval_windows": args.eval_windows, "rows": groups, "recover_steps": args.recover_steps,
            "threads": torch.get_num_threads(), "date": common.utc_now(), "machine": common.machine_line(),
            "command": " ".join(["python", *sys.argv])}
    table.write(args.json, meta)


@torch.no_grad()
def layer_drop_mask(model, space, calib, n_drop):
    """Drop the ``n_drop`` layers with the least block influence, 1 − cos(h_in, h_out) averaged over
    calibration tokens (ShortGPT's criterion)."""
    from bpp.masks import Masks

    influence = torch.zeros(space.n_layers, dtype=torch.float64)
    for start in range(0, calib.shape[0], 8):
        hidden = model(calib[start:start + 8], output_hidden_states=True, use_cache=False).hidden_states
        for i in range(space.n_layers):
            cos = torch.nn.functional.cosine_similarity(hidden[i].double(), hidden[i + 1].double(), dim=-1)
            influence[i] += float((1 - cos).sum())
    mask = Masks.full(space, 1)
    mask.layers[0, torch.sort(influence, stable=True).indices[:n_drop]] = False
    return mask


# --- the gradient methods through bpp_kernels' masked ops vs the Hugging Face forward ----------------

ENGINE_CASES = ("besa:hf", "besa:kernels", "recover:hf", "recover:kernels", "loraprune:hf", "loraprune:kernels")


def engine_case(case: str, mask_path: str, sparsity: float, calib_windows: int, calib_seq_len: int,
                eval_windows: int, recover_steps: int = RECOVER_STEPS) -> dict:
    """One (method, engine) measurement in this process: BESA's mask (written to ``mask_path`` by
    "besa:hf"), `bpp recover`'s LoRA recovery of that mask's compacted model (``recover_steps``
    steps with bpp recover's defaults), or LoRAPrune's mask with its defaults. Wall time, peak RSS above the RSS before the call, the
    held-out perplexity and what the two engines should agree on."""
    from bpp.evaluation import masked_perplexity, perplexity
    from bpp.methods.besa import BesaConfig, besa_allocate
    from bpp.methods.lora_recovery import lora_recover
    from bpp.methods.loraprune import LoRAPruneConfig, loraprune_allocate
    from bpp.masks import Masks

    method, engine = case.split(":")
    default = common.load_default()
    model, tok, space, calib_ids, held = default.model, default.tok, default.space, default.calib, default.held
    out = {"case": case}
    if method == "besa":
        calib = windows(tok, calib_ids, calib_seq_len, calib_windows, seed=0)
        before = common.reset_peak_rss()
        t0 = time.perf_counter()
        result = besa_allocate(model, space, calib, 1.0 - sparsity, ("channel", "group"),
                               BesaConfig(engine=engine, progress=False))
        out["seconds"] = time.perf_counter() - t0
        out["peak_mib"] = (common.status_kib("VmHWM") - before) / 1024
        mask = Masks(result.masks["channel"][None], result.masks["group"][None],
                     torch.ones(1, space.n_layers, dtype=torch.bool))
        out.update(engine=result.engine, params=int(space.params(mask)[0]),
                   kept_groups=int(mask.groups.sum()), kept_channels=int(mask.channels.sum()),
                   learned_rates={t: result.learned_rates[t].tolist() for t in ("group", "channel")},
                   ppl=masked_perplexity(model, tok, held, mask, 128, eval_windows))
        mask.save(f"{mask_path}.{engine}")
        if engine == "hf":
            mask.save(mask_path)
    elif method == "loraprune":
        calib = windows(tok, calib_ids, calib_seq_len, calib_windows, seed=0)
        before = common.reset_peak_rss()
        t0 = time.perf_counter()
        result = loraprune_allocate(model, space, calib, 1.0 - sparsity, ("channel", "group"),
                                    LoRAPruneConfig(engine=engine, progress=False))
        out["seconds"] = time.perf_counter() - t0
        out["peak_mib"] = (common.status_kib("VmHWM") - before) / 1024
        mask = Masks(result.masks["channel"][None], result.masks["group"][None],
                     torch.ones(1, space.n_layers, dtype=torch.bool))
        out.update(engine=result.engine, params=int(space.params(mask)[0]), loss=[h["loss"] for h in result.history],
                   kept_groups=int(mask.groups.sum()), kept_channels=int(mask.channels.sum()),
                   ppl=masked_perplexity(model, tok, held, mask, 128, eval_windows))
        mask.save(f"{mask_path}.loraprune.{engine}")
    else:
        mask = Masks.load(mask_path)
        small = compact_model(model, mask)
        del model
        out["ppl_before"] = perplexity(small, tok, held, seq_len=128, max_windows=eval_windows)
        before = common.reset_peak_rss()
        t0 = time.perf_counter()
        merged, log = lora_recover(small, tok, calib_ids, steps=recover_steps, engine=engine, progress=False)
        out["seconds"] = time.perf_counter() - t0
        out["peak_mib"] = (common.status_kib("VmHWM") - before) / 1024
        out.update(engine=log["engine"], params=sum(p.numel() for p in merged.parameters()), loss=log["loss"],
                   per_step=log["seconds_per_step"],
                   ppl=perplexity(merged, tok, held, seq_len=128, max_windows=eval_windows))
    return out


def interleaved(methods: list[str], mask_path: str, sparsity: float, calib_windows: int, calib_seq_len: int,
                recover_steps: int, layers: int, repeats: int) -> list[dict]:
    """The two engines' wall times side by side in one process, alternating which goes first, so a
    load that changes on a shared machine hits both alike: per LoRA recovery step (two jobs on the
    same compacted model, stepped in turn), and per whole BESA / LoRAPrune run on the model's first
    ``layers`` layers (``repeats`` runs each)."""
    import statistics

    from bpp.methods.besa import BesaConfig, besa_allocate
    from bpp.methods.lora_recovery import LoraRecovery
    from bpp.methods.recovery_config import RecoverConfig
    from bpp.methods.loraprune import LoRAPruneConfig, loraprune_allocate
    from bpp.masks import Masks
    from bpp.space import MaskSpace

    engines = ("hf", "kernels")
    default = common.load_default()
    model, tok, calib_ids = default.model, default.tok, default.calib
    calib = windows(tok, calib_ids, calib_seq_len, calib_windows, seed=0)
    rows = []

    def add(method, unit, times, agree):
        med = {e: statistics.median(times[e]) for e in engines}
        rows.append(dict(method=method, unit=unit, n=len(times["hf"]), hf=med["hf"], kernels=med["kernels"],
                         speedup=med["hf"] / med["kernels"], agree=agree))
        print(f"{method:<10} median s per {unit:<24} hf {med['hf']:8.2f}  kernels {med['kernels']:8.2f}  "
              f"hf/kernels {med['hf'] / med['kernels']:.2f}  ({len(times['hf'])} each; {agree})", flush=True)

    if "recover" in methods:
        small = compact_model(model, Masks.load(mask_path))
        jobs = {e: LoraRecovery(copy.deepcopy(small), tok, calib_ids, RecoverConfig(steps=recover_steps, engine=e),
                                progress=False) for e in engines}
        times = {e: [] for e in engines}
        with torch.enable_grad():
            for step in range(recover_steps):
                for e in engines if step % 2 == 0 else engines[::-1]:
                    jobs[e].peft_model.train()
                    t0 = time.perf_counter()
                    jobs[e].run_step()
                    times[e].append(time.perf_counter() - t0)
        rel = max(abs(x - y) / abs(x) for x, y in zip(jobs["hf"].losses, jobs["kernels"].losses))
        add("recover", "step (4×128 tokens)", times, f"losses within {rel:.1e} relative")
        del jobs, small
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    space = MaskSpace.from_model(model)
    runs = {"besa": lambda e: besa_allocate(model, space, calib, 1.0 - sparsity, ("channel", "group"),
                                            BesaConfig(engine=e, progress=False)),
            "loraprune": lambda e: loraprune_allocate(model, space, calib, 1.0 - sparsity, ("channel", "group"),
                                                      LoRAPruneConfig(engine=e, progress=False))}
    for method in (m for m in ("besa", "loraprune") if m in methods):
        times, results = {e: [] for e in engines}, {}
        for rep in range(repeats):
            for e in engines if rep % 2 == 0 else engines[::-1]:
                t0 = time.perf_counter()
                results[e] = runs[method](e)
                times[e].append(time.perf_counter() - t0)
        same = all(torch.equal(results["hf"].masks[t], results["kernels"].masks[t]) for t in ("channel", "group"))
        add(method, f"run ({layers} layers)", times, "same masks" if same else "masks differ")
    return rows


def engines_main(argv=None) -> list[dict]:
    """``python bench/quality_companions.py --engines``: BESA and LoRA recovery through bpp_kernels'
    masked ops against the Hugging Face forward, on the embedded default, one fresh process per case
    (so each peak RSS is its own), in the order of ``--cases`` repeated ``--repeats`` times. The
    recover cases need the mask "besa:hf" wrote to ``--workdir``."""
    ap = argparse.ArgumentParser(description=engines_main.__doc__)
    ap.add_argument("--engines", action="store_true", required=True)
    ap.add_argument("--cases", default=",".join(ENGINE_CASES))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--recover-steps", type=int, default=RECOVER_STEPS)
    ap.add_argument("--workdir", default=None, help="where the BESA masks go (default: a temporary folder)")
    ap.add_argument("--json", default="bench/results/gradient_engines.json")
    ap.add_argument("--interleaved", default=None,
                    help="comma-separated methods (besa, recover, loraprune): time the two engines alternating "
                         "in one process instead (recover needs --workdir with the besa:hf mask)")
    ap.add_argument("--layers", type=int, default=6, help="--interleaved: BESA / LoRAPrune on the first N layers")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # a child process's one case
    args = ap.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bpp-engines-")
    mask_path = os.path.join(workdir, "besa-mask.safetensors")
    if args.case:
        print(json.dumps(engine_case(args.case, mask_path, args.sparsity, args.calib_windows, args.calib_seq_len,
                                     args.eval_windows, args.recover_steps)))
        return []

    cpu = common.cpu_name()
    print(f"# {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, load average at start "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    if args.interleaved:
        rows = interleaved(args.interleaved.split(","), mask_path, args.sparsity, args.calib_windows,
                           args.calib_seq_len, args.recover_steps, args.layers, args.repeats)
        print(f"# load average at the end {os.getloadavg()[0]:.1f}")
        print("\n| method | median s per | n each | hf | kernels | hf / kernels | the engines agree |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['unit']} | {r['n']} | {r['hf']:.2f} | {r['kernels']:.2f} | "
                  f"{r['speedup']:.2f}x | {r['agree']} |")
        if args.json:
            os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"machine": cpu, "torch": torch.__version__, "interleaved": rows}, f, indent=1)
        return rows
    rows = []
    for _ in range(args.repeats):
        for case in args.cases.split(","):
            cmd = [sys.executable, __file__, "--engines", "--case", case, "--workdir", workdir,
                   "--sparsity", str(args.sparsity), "--calib-windows", str(args.calib_windows),
                   "--calib-seq-len", str(args.calib_seq_len), "--eval-windows", str(args.eval_windows),
                   "--recover-steps", str(args.recover_steps)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["load_average"] = os.getloadavg()[0]
            rows.append(row)
            print(f"{case:<16} engine {row['engine']:<8} {row['seconds']:7.1f} s  peak +{row['peak_mib']:6.0f} MiB  "
                  f"ppl {row.get('ppl_before', float('nan')):.3f} -> {row['ppl']:.3f}  load {row['load_average']:.1f}",
                  flush=True)

    def first(case):
        return next((r for r in rows if r["case"] == case), None)

    besa = [first(f"besa:{e}") for e in ("hf", "kernels")]
    if all(besa):
        from bpp.masks import Masks

        a, b = (Masks.load(f"{mask_path}.{e}") for e in ("hf", "kernels"))
        same = torch.equal(a.channels, b.channels) and torch.equal(a.groups, b.groups)
        diff = max(abs(x - y) for t in ("group", "channel")
                   for x, y in zip(besa[0]["learned_rates"][t], besa[1]["learned_rates"][t]))
        print(f"BESA: masks {'identical' if same else 'DIFFER'}; learned rates differ by at most {diff:.2e}")
    rec = [first(f"recover:{e}") for e in ("hf", "kernels")]
    if all(rec):
        rel = max(abs(x - y) / abs(x) for x, y in zip(rec[0]["loss"], rec[1]["loss"]))
        print(f"recover: loss curves differ by at most {rel:.2e} relative")
    lp = [first(f"loraprune:{e}") for e in ("hf", "kernels")]
    if all(lp):
        from bpp.masks import Masks

        a, b = (Masks.load(f"{mask_path}.loraprune.{e}") for e in ("hf", "kernels"))
        same = torch.equal(a.channels, b.channels) and torch.equal(a.groups, b.groups)
        rel = max(abs(x - y) / abs(x) for x, y in zip(lp[0]["loss"], lp[1]["loss"]))
        print(f"LoRAPrune: masks {'identical' if same else 'DIFFER'}; losses differ by at most {rel:.2e} relative")
    print("\n| case | engine | wall s | peak RSS above start, MiB | held-out ppl | load avg after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ppl = f"{r['ppl_before']:.2f} → {r['ppl']:.2f}" if "ppl_before" in r else f"{r['ppl']:.2f}"
        print(f"| {r['case']} | {r['engine']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | {ppl} | "
              f"{r['load_average']:.1f} |")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": cpu, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows


def main() -> None:
    if "--engines" in sys.argv[1:]:
        engines_main()
    else:
        rows_main()


if __name__ == "__main__":
    main()
