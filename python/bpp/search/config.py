"""The configuration of a search (``bpp prune``'s options that determine its result), the
defaults that depend on the policy, and the learning-rate schedule."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

from ..budget import check_sparsity, parse_granularity
from ..checkpoints import differences
from ..errors import BppError
from ..modelio import check_device, native_half_dtype, parse_dtype

SCHEDULES = ("cosine", "constant")
LOSS_ENGINES = ("batched", "hooks")  # how mask losses are computed: bpp.MaskedModel, or the hook ground truth
POLICIES = ("allocation", "units", "evopress")
BASELINES = ("moving-average", "leave-one-out")  # the per-unit policy's loss baselines
RANKS = ("init", "flap", "wanda-sp")
OBJECTIVES = ("soft", "nll")
OPTIMIZERS = ("adam", "sgd")
SAMPLINGS = ("antithetic", "independent")
ATTENTION_UNITS = ("groups", "heads")  # what the search prunes in attention: whole KV groups, or query-head slots
UNITS_DEFAULTS = {"lr": 6e-3, "init": "wanda-sp", "budget": "count", "objective": "nll", "steps": 100}  # the official settings
# the allocation policy's: Adam on the offsets' smooth coefficients, BESA's or FLAP's start (whichever is
# better as written), one budget, soft targets, and fewer steps than the per-unit policy (bench/RESULTS.md)
ALLOCATION_DEFAULTS = {"lr": 0.02, "init": "auto", "budget": "params", "objective": "soft", "steps": 60}
# the allocation policy's round: about as many mask evaluations as one search gains from at a fixed
# perturbation scale (bench/RESULTS.md, sample efficiency); the default search is one round
ROUND_EVALUATIONS = 480
# the evolutionary baseline shares the allocation policy's start, budget, loss and steps (it uses no lr)
EVOPRESS_DEFAULTS = dict(ALLOCATION_DEFAULTS)

# fields added after runs were saved without them: the value those runs were made with
SAVED_WITHOUT = {"reconstruct": False, "attention_units": "groups"}


@dataclass
class PruneConfig:
    """Everything that determines the result of a run (a resumed run must match it)."""

    model: str = "default"
    data: str = "default"
    sparsity: float = 0.2
    granularity: str = "channel,group"
    budget: str | None = None  # None: per policy (units: "count", the official; allocation: "params")
    steps: int | None = None  # None: per policy (units 100, allocation 60), sized so the default job fits a CPU budget
    evaluations: int | None = None  # mask evaluations of the search; sets the steps (one of the two, not both)
    samples: int = 8
    batch_size: int = 2
    seq_len: int = 128
    lr: float | None = None  # None: per policy (UNITS_DEFAULTS, ALLOCATION_DEFAULTS)
    schedule: str = "cosine"
    baseline: str = "moving-average"
    baseline_momentum: float = 0.8  # the official moving average over a window of 5: 1 − 1/5
    init: str | None = None  # None: per policy (units: wanda-sp, the official; allocation: auto)
    init_windows: int = 32
    init_seq_len: int = 256
    seed: int = 0
    dtype: str = "auto"  # auto: the model in float32, masks judged in bfloat16 where the device has it natively
    device: str = "cpu"
    device_map: str | None = None  # e.g. "auto": layers over the GPUs of a node, for models too large for one
    engine: str = "batched"
    # the policy, masks judged as compacted, and the incumbent
    policy: str = "allocation"  # allocation (per-layer counts over a metric's ranking) | units (official) | evopress
    bias_compensation: bool = True  # masks judged with FLAP's output biases (and written with them without reconstruct)
    reconstruct: bool = True  # the written model and the reported perplexities refit o_proj/down_proj by least squares
    rank: str = "flap"  # allocation: what ranks units inside a layer: flap (fluctuation, fits bias compensation) | init | wanda-sp
    sigma: float = 0.05  # allocation: perturbation scale, a fraction of a layer's channels
    group_every: int = 4  # allocation: every N-th step explores KV-group moves (0: groups stay as the init's)
    incumbent_every: int = 10  # challenge the incumbent every N steps and at the end (0: no incumbent)
    selection_windows: int = 16  # held-in windows the incumbent is judged on (never used by the gradient)
    objective: str | None = None  # None: per policy (units: nll, official; allocation: soft, the dense model's distribution)
    basis: int = 8  # allocation: channel offsets as this many smooth profiles over depth (0: one per layer)
    optimizer: str = "adam"  # allocation: adam (per-coordinate steps) | sgd (normalised gradient steps)
    sampling: str = "antithetic"  # allocation: antithetic pairs | independent draws with a leave-one-out baseline
    # allocation: what attention gives up: whole KV groups, or query-head slots (head j of every group; groups kept)
    attention_units: str = "groups"

    def validate(self) -> "PruneConfig":
        check_types(self)
        resolve_policy_defaults(self)
        check_sparsity(self.sparsity)
        check_device(self.device)
        self.granularity = ",".join(parse_granularity(self.granularity))
        if self.samples < 2:
            raise BppError(f"--samples must be at least 2 (a baseline needs two masks per step), got {self.samples}")
        for name in ("steps", "batch_size", "init_windows", "evaluations"):
            if getattr(self, name) is None:
                continue
            if getattr(self, name) < 1:
                raise BppError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("seq_len", "init_seq_len"):
            if getattr(self, name) < 2:
                raise BppError(f"--{name.replace('_', '-')} must be at least 2, got {getattr(self, name)}")
        if not self.lr > 0:
            raise BppError(f"--lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise BppError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.baseline not in BASELINES:
            raise BppError(f"unknown baseline {self.baseline!r}; use one of {', '.join(BASELINES)}")
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if self.engine not in LOSS_ENGINES:
            raise BppError(f"unknown engine {self.engine!r}; use one of {', '.join(LOSS_ENGINES)}")
        if not 0.0 <= self.baseline_momentum < 1.0:
            raise BppError(f"baseline momentum must be in [0, 1), got {self.baseline_momentum}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        """A saved configuration; a field it lacks takes the value runs had before the field existed
        (``SAVED_WITHOUT``), else its default."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**SAVED_WITHOUT, **{k: v for k, v in d.items() if k in known}})

    def differences(self, other: "PruneConfig") -> list[str]:
        """``name: mine (checkpoint) vs other (now)`` for every field that differs."""
        return differences(self.to_dict(), other.to_dict())


def model_dtype(config: PruneConfig) -> str:
    """The dtype the model is loaded, calibrated, refit and written in."""
    return "float32" if config.dtype == "auto" else config.dtype


def eval_dtype(config: PruneConfig, loaded):
    """The dtype the batched engine judges masks in, for a model ``loaded`` in that torch dtype:
    with ``dtype="auto"`` and a float32 model, bfloat16 where the device computes it natively;
    otherwise the model's own."""
    if config.dtype != "auto" or config.engine != "batched" or loaded != parse_dtype("float32"):
        return loaded
    return native_half_dtype(config.device) or loaded


_KINDS = {"int": numbers.Integral, "float": numbers.Real, "str": str, "bool": bool}


def check_types(config: PruneConfig) -> None:
    """Every field holds a value of its declared type (an int where a float is declared is fine;
    a bool is no number; numpy numbers become Python ones), or one line naming the option."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if value is None and "None" in kinds:
            continue
        wanted = [_KINDS[k] for k in kinds if k in _KINDS]
        is_bool = isinstance(value, bool)
        if not any(isinstance(value, t) and (t is bool or not is_bool) for t in wanted):
            raise BppError(f"--{f.name.replace('_', '-')} must be {' or '.join(kinds)}, got {type(value).__name__} "
                           f"{value!r}")
        if not is_bool and isinstance(value, numbers.Integral) and not isinstance(value, int):
            setattr(config, f.name, int(value))  # numpy integers: plain ints for the JSON files
        elif not is_bool and isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
            setattr(config, f.name, float(value))


def resolve_policy_defaults(config: PruneConfig) -> None:
    """Fill the options whose default depends on the policy, and check the policies' own options."""
    if config.policy not in POLICIES:
        raise BppError(f"unknown policy {config.policy!r}; use one of {', '.join(POLICIES)}")
    defaults = {"units": UNITS_DEFAULTS, "evopress": EVOPRESS_DEFAULTS}.get(config.policy, ALLOCATION_DEFAULTS)
    resolve_steps(config)
    for name, value in defaults.items():
        if getattr(config, name) is None:
            setattr(config, name, value)
    if config.policy in ("allocation", "evopress"):
        if config.budget != "params":
            raise BppError(f"--policy {config.policy} has one parameter budget (KV groups and channels trade under "
                           "it); drop --budget count, or use --policy units")
        if parse_granularity(config.granularity) != ("channel", "group"):
            keep = " (or --group-every 0 to keep the init's KV groups)" if config.policy == "allocation" else ""
            raise BppError(f"--policy {config.policy} learns channels and KV groups together; use --granularity "
                           f"channel,group{keep}, or --policy units")
        if config.init == "uniform":
            raise BppError(f"--policy {config.policy} starts from an init method's mask and --init uniform has none; "
                           "use --init auto, besa, flap or wanda-sp")
    if config.policy == "allocation":
        if config.sampling not in SAMPLINGS:
            raise BppError(f"unknown sampling {config.sampling!r}; use one of {', '.join(SAMPLINGS)}")
        if config.sampling == "antithetic" and config.samples % 2:
            raise BppError(f"--sampling antithetic draws pairs: --samples must be even, got {config.samples}")
    if config.attention_units not in ATTENTION_UNITS:
        raise BppError(f"unknown attention units {config.attention_units!r}; use one of {', '.join(ATTENTION_UNITS)}")
    if config.attention_units == "heads":
        if config.rank != "flap" and config.policy != "units":
            raise BppError(f"--attention-units heads ranks query-head slots by FLAP's fluctuation; use --rank flap "
                           f"(not {config.rank})")
    if config.optimizer not in OPTIMIZERS:
        raise BppError(f"unknown optimizer {config.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if config.objective not in OBJECTIVES:
        raise BppError(f"unknown objective {config.objective!r}; use one of {', '.join(OBJECTIVES)}")
    if config.basis < 0 or config.basis == 1:
        raise BppError(f"--basis must be 0 (one offset per layer) or at least 2 smooth profiles, got {config.basis}")
    if config.rank not in RANKS:
        raise BppError(f"unknown rank {config.rank!r}; use one of {', '.join(RANKS)}")
    if not config.sigma > 0:
        raise BppError(f"--sigma must be positive, got {config.sigma}")
    for name in ("group_every", "incumbent_every"):
        if getattr(config, name) < 0:
            raise BppError(f"--{name.replace('_', '-')} must be 0 (off) or positive, got {getattr(config, name)}")
    if config.selection_windows < 2 and config.incumbent_every:
        raise BppError(f"--selection-windows must be at least 2 (the incumbent is judged by paired "
                       f"differences over windows), got {config.selection_windows}")


def resolve_steps(config: PruneConfig) -> None:
    """``--evaluations N`` sets the steps: N mask evaluations are ⌈N / samples⌉ steps (evopress:
    at most N). A saved
    configuration holds both, consistent; given together they must agree."""
    if config.evaluations is None:
        return
    if config.evaluations < config.samples:
        raise BppError(f"--evaluations must be at least --samples ({config.samples}): one step evaluates "
                       f"{config.samples} masks; got {config.evaluations}")
    # evopress evaluates fewer masks on some steps: its steps are an upper bound and the loop stops
    # when the evaluations are spent
    steps = math.ceil(config.evaluations / (1 if config.policy == "evopress" else config.samples))
    if config.steps is not None and config.steps != steps:
        raise BppError(f"give --steps or --evaluations, not both ({config.evaluations} evaluations of "
                       f"{config.samples} masks per step are {steps} steps, not {config.steps})")
    config.steps = steps


def rounds(config: PruneConfig) -> list[int]:
    """The first step of each round of the search. The allocation policy runs rounds of
    ``ROUND_EVALUATIONS`` mask evaluations (a longer search is more rounds, each re-centred on
    the incumbent with a finer perturbation); a remainder under half a round joins the last one.
    The other policies run one round."""
    per_round = max(round(ROUND_EVALUATIONS / config.samples), 1)
    if config.policy != "allocation" or config.steps < 1.5 * per_round:
        return [0]
    n = max(round(config.steps / per_round), 1)
    return [r * per_round for r in range(n)]


def round_of(config: PruneConfig, step: int) -> tuple[int, int, int]:
    """(round index, its first step, its number of steps) of ``step``."""
    starts = rounds(config)
    r = max(i for i, s in enumerate(starts) if s <= step)
    end = starts[r + 1] if r + 1 < len(starts) else config.steps
    return r, starts[r], end - starts[r]


def learning_rate(config: PruneConfig, step: int) -> float:
    """Cosine from lr at a round's first step towards 0 at its end (one round: torch's
    CosineAnnealingLR with T_max = steps, as the official code), or constant."""
    if config.schedule == "constant":
        return config.lr
    _, first, length = round_of(config, step)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * (step - first) / length))


def needs_stats(config: PruneConfig) -> bool:
    """Whether the run needs FLAP's calibration statistics (bias compensation, FLAP ranking)."""
    return config.bias_compensation or needs_ranking(config) == "flap"


def needs_ranking(config: PruneConfig) -> str | None:
    """The metric that must rank units inside each layer before the search starts (``--rank``),
    or None when the init's own scores rank them or the policy learns every unit."""
    if config.policy == "units" or config.rank == "init":
        return None
    return config.rank


def default_out(config: PruneConfig) -> Path:
    """``pruned-<model name>-<sparsity>``: where a run goes when no folder is given."""
    name = Path(config.model).name if config.model != "default" else "default"
    return Path(f"pruned-{name}-{config.sparsity:g}")


def resolve_config(config: PruneConfig | None, options: dict, saved: dict | None = None) -> PruneConfig:
    """The configuration of a run: ``config``, or ``options`` (PruneConfig fields) over the
    defaults; when resuming, the ``saved`` one, which ``config`` or ``options`` must not contradict."""
    known = set(PruneConfig.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise BppError(f"unknown prune option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if config is not None and options:
        raise BppError("give either a PruneConfig or options, not both")
    if saved is None:
        return (config or PruneConfig(**options)).validate()
    saved = PruneConfig.from_dict(saved)
    asked = config.to_dict() if config is not None else options
    diff = [f"--{k.replace('_', '-')}: {v!r} given, the run has {getattr(saved, k)!r}"
            for k, v in asked.items() if getattr(saved, k) != v]
    if diff:
        raise BppError(f"--resume continues the run as it was configured; these options differ "
                       f"from it: {'; '.join(diff)} (drop them, or start a new run with --out)")
    return saved.validate()
