"""The evolutionary baseline (``--policy evopress``): budget-exact mutations, the staged (1 + λ)
selection on a synthetic objective, bit-exact resume mid-generation, and ``bpp prune --policy
evopress`` end to end on the tiny model."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from bpp.checkpoints import load_checkpoint
from bpp.search import PruneConfig, SearchLoop
from bpp.search.config import resolve_policy_defaults
from bpp.search.counts import ranks_from_scores
from bpp.search.evolution import CONFIRM_STEPS, SURVIVORS, EvolutionPolicy
from bpp.errors import BppError
from bpp.masks import Masks
from bpp.space import MaskSpace
from tests.conftest import FAST_CLI, REPO, cli, kill_9_at_checkpoint, prune_cmd

# 6 layers of 64 channels and 4 KV groups; a group costs as many parameters as 8 channels
SPACE = MaskSpace(family="llama", n_layers=6, hidden_size=8, n_channels=64, n_groups=4, heads_per_group=2,
                  head_dim=4, qkv_bias=False, qk_norm=False, total_params=0)


def _policy(space=SPACE, channels=(40, 30, 50, 20, 44, 36), groups=(3, 2, 4, 1, 2, 3), extra_channels=0, seed=0,
            samples=8):
    """A policy whose init counts meet the budget exactly (plus ``extra_channels`` of slack)."""
    g = torch.Generator().manual_seed(seed)
    ranks_c = ranks_from_scores(torch.rand(space.n_layers, space.n_channels, generator=g))
    ranks_g = ranks_from_scores(torch.rand(space.n_layers, space.n_groups, generator=g))
    kept = sum(groups) * space.group_params + (sum(channels) + extra_channels) * space.channel_params
    sparsity = 1.0 - kept / space.prunable_params
    return EvolutionPolicy(space, ranks_c, ranks_g, torch.tensor(channels), torch.tensor(groups), sparsity,
                           samples=samples)


def _check_budget(policy, channels, groups):
    """Every genome keeps exactly the channels its groups leave: its parameter count is the budget's
    to within one channel's parameters, never above."""
    sp = policy.space
    assert bool((channels >= 0).all()) and bool((channels <= sp.n_channels).all())
    assert bool((groups >= 0).all()) and bool((groups <= sp.n_groups).all())
    for c, g in zip(channels, groups):
        assert int(c.sum()) == policy.channel_total(g)
    params = (channels.sum(-1) * sp.channel_params + groups.sum(-1) * sp.group_params).double()
    assert bool((params <= policy.target + 1e-6).all()) and bool((policy.target - params < sp.channel_params).all())


def test_the_start_is_the_init_counts_on_the_budget():
    policy = _policy()
    assert policy.channels.tolist() == [40, 30, 50, 20, 44, 36] and policy.groups.tolist() == [3, 2, 4, 1, 2, 3]
    assert policy.level == 2
    mask = policy.deterministic_mask()
    assert mask.channels.sum(-1)[0].tolist() == [40, 30, 50, 20, 44, 36]
    assert int(policy.channel_ranks[0][mask.channels[0, 0]].max()) == 39  # the top-ranked channels are kept
    # slack below one channel's parameters: the same counts; slack of 12 channels: shifted onto the budget
    assert _policy(extra_channels=12).channels.sum().item() == 232


def test_every_offspring_meets_the_budget_and_differs_from_its_parent():
    policy = _policy()
    channels, groups = policy.offspring(400, torch.Generator().manual_seed(1))
    _check_budget(policy, channels, groups)
    parent = (channels == policy.channels).all(-1) & (groups == policy.groups).all(-1)
    assert not bool(parent.any())
    moved_groups = (groups != policy.groups).any(-1)
    assert 0 < int(moved_groups.sum()) < 200  # ~0.1 of the mutations move a KV group
    # offspring of offspring stay on the budget too (a chain of generations)
    c, g = policy.channels.clone(), policy.groups.clone()
    gen = torch.Generator().manual_seed(2)
    for _ in range(300):
        c, g = policy.mutate(c, g, gen)
        _check_budget(policy, c.unsqueeze(0), g.unsqueeze(0))


def test_single_mutations():
    policy = _policy()
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        c, g = policy.channels.clone(), policy.groups.clone()
        assert policy.channel_move(c, gen)
        diff = c - policy.channels
        assert sorted(diff.tolist())[0] == -2 and sorted(diff.tolist())[-1] == 2 and int(diff.abs().sum()) == 4
        assert torch.equal(g, policy.groups)
        assert policy.masks(c.unsqueeze(0), g.unsqueeze(0)) != policy.deterministic_mask()  # a mutation changes the mask
        c, g = policy.channels.clone(), policy.groups.clone()
        assert policy.group_move(c, g, gen)
        assert int((g - policy.groups).abs().sum()) == 1
        _check_budget(policy, c.unsqueeze(0), g.unsqueeze(0))
    # a donor with fewer channels than a level gives what it has; a full receiver is never chosen
    edge = _policy(channels=(1, 64, 64, 64, 64, 64), groups=(4, 4, 4, 4, 4, 3))
    c = edge.channels.clone()
    assert edge.channel_move(c, gen) and int(c.sum()) == int(edge.channels.sum())
    assert bool((c <= 64).all()) and bool((c >= 0).all())


def test_group_moves_respect_the_range_and_the_budget():
    # every group kept: only −1; no channel slack for the 8 channels of one more group in layer 3
    policy = _policy(channels=(4, 2, 0, 0, 0, 1), groups=(4, 4, 4, 3, 4, 4))
    assert policy.group_moves(policy.groups) == [(layer, -1) for layer in range(6)]
    policy = _policy(channels=(4, 2, 0, 0, 0, 3), groups=(4, 4, 4, 3, 4, 4))
    assert (3, 1) in policy.group_moves(policy.groups)
    gen = torch.Generator().manual_seed(4)
    for _ in range(200):
        c, g = policy.channels.clone(), policy.groups.clone()
        if policy.group_move(c, g, gen):
            _check_budget(policy, c.unsqueeze(0), g.unsqueeze(0))
    # no group at all and no budget for one: no move up
    policy = _policy(channels=(3, 0, 0, 0, 0, 4), groups=(0, 0, 0, 0, 0, 0))
    assert policy.group_moves(policy.groups) == []
    c, g = policy.channels.clone(), policy.groups.clone()
    assert not policy.group_move(c, g, gen) and torch.equal(c, policy.channels)


# --- selection on a synthetic objective ---------------------------------------------------------

OPTIMUM_CHANNELS = torch.tensor([50, 20, 56, 14, 40, 40])  # the init's groups, channels moved in levels
OPTIMUM_GROUPS = torch.tensor([3, 2, 4, 1, 2, 3])


def _objective(masks: Masks) -> torch.Tensor:
    """(S,) a known function of the counts, lowest (0) at the optimum."""
    c, g = masks.channels.sum(-1).double(), masks.groups.sum(-1).double()
    return ((c - OPTIMUM_CHANNELS) ** 2).sum(-1) / 100 + 3 * (g - OPTIMUM_GROUPS).abs().sum(-1)


def _window_losses(ids: torch.Tensor, masks: Masks) -> torch.Tensor:
    """(S, B): the objective plus a per-window offset shared by every mask (so only paired
    comparisons see the masks' differences), and a little per-mask noise."""
    window = ids[:, 0].double()
    noise = 0.01 * torch.sin(window.unsqueeze(0) * 7.0 + masks.channels.sum((-1, -2)).double().unsqueeze(1))
    return _objective(masks).unsqueeze(1) + torch.cos(window).unsqueeze(0) + noise


def _loop(steps, seed=0):
    policy = _policy(seed=seed)
    config = PruneConfig(policy="evopress", steps=steps, samples=8, batch_size=2, incumbent_every=0, seed=seed,
                         sparsity=policy.sparsity)  # the budget a resumed policy is rebuilt with
    resolve_policy_defaults(config)
    windows = torch.arange(steps * 2).unsqueeze(1).repeat(1, 4)
    return SearchLoop(policy, lambda ids, m: _window_losses(ids, m).mean(1), windows, config, progress=False,
                      window_losses=_window_losses), config, windows


def test_the_search_finds_a_known_optimum_and_never_accepts_a_worse_parent():
    steps = 400
    loop, _, _ = _loop(steps)
    policy = loop.policy
    parents = [float(_objective(policy.deterministic_mask())[0])]
    records = []
    while loop.step < steps:
        records.append(loop.run_step())
        parents.append(float(_objective(policy.deterministic_mask())[0]))
        _check_budget(policy, policy.channels.unsqueeze(0), policy.groups.unsqueeze(0))
    assert all(b <= a for a, b in zip(parents, parents[1:]))  # the parent only gets better
    assert parents[0] == pytest.approx(3.04) and parents[-1] == 0.0  # the optimum, reached
    # the stages: one explore step of 8 masks, then CONFIRM_STEPS steps of the parent and 2 survivors
    generation = 1 + CONFIRM_STEPS
    assert [r["stage"] for r in records[:generation]] == [1] + [2] * CONFIRM_STEPS
    assert [r["evaluated"] for r in records[:generation]] == [8] + [1 + SURVIVORS] * CONFIRM_STEPS
    assert loop.evaluations == steps // generation * (8 + CONFIRM_STEPS * (1 + SURVIVORS))
    changed = [r for r in records if r["parent_changed"]]
    assert changed and all(r["best_confirm_loss"] < r["parent_confirm_loss"] for r in changed)
    assert len(changed) == len(policy.accepted_at) and policy.generation == steps // generation
    assert all(r["generation"] == i // generation for i, r in enumerate(records))


def test_a_failed_mask_is_never_chosen():
    policy = _policy()
    gen = torch.Generator().manual_seed(5)
    proposal = policy.ask(0, gen)
    losses = torch.full((8, 2), 5.0, dtype=torch.float64)
    losses[1] = torch.inf  # the best-looking offspring failed
    losses[2] = 1.0
    record = policy.tell(proposal, losses, 0.0)
    assert record["survivors"][0] == 1 and 0 not in record["survivors"]  # offspring 1 is the mask in row 2
    everything_failed = torch.full((8, 2), torch.nan, dtype=torch.float64)
    policy = _policy()
    record = policy.tell(policy.ask(0, gen), everything_failed, 0.0)
    assert record["skipped"] and policy.stage == "explore" and policy.generation == 1


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("cut", [7, 10])  # mid-stage 2 of generation 1, and at the start of generation 2
def test_resume_mid_generation_is_bit_exact(tmp_path, cut):
    steps = 23  # ends mid-generation too: the output is the parent
    ref, config, windows = _loop(steps, seed=3)
    ref.run()
    first, _, _ = _loop(steps, seed=3)
    for _ in range(cut):
        first.run_step()
    path = first.save_checkpoint(tmp_path / "checkpoint.pt")
    state = load_checkpoint(path)
    assert state["policy"]["stage"] == ("confirm" if cut == 7 else "explore")
    resumed_policy = EvolutionPolicy.from_state(SPACE, first.policy.budget, config, state["policy"])
    resumed = SearchLoop(resumed_policy, first.losses_fn, windows, config, progress=False,
                         window_losses=_window_losses)
    resumed.load_state_dict(state)
    resumed.run()
    assert _same(resumed.policy.state(), ref.policy.state())
    assert resumed.deterministic_mask() == ref.deterministic_mask() and resumed.evaluations == ref.evaluations
    assert ref.policy.stage == "confirm"  # 23 steps: 4 generations and the explore step + 2 of the fifth
    assert ref.policy.accepted_at  # the search moved, so equality is not the start's


def test_bad_options():
    with pytest.raises(BppError, match="--policy evopress has one parameter budget"):
        PruneConfig(policy="evopress", budget="count").validate()
    with pytest.raises(BppError, match="--policy evopress starts from an init method's mask"):
        PruneConfig(policy="evopress", init="uniform").validate()
    with pytest.raises(BppError, match="learns channels and KV groups together"):
        PruneConfig(policy="evopress", granularity="channel").validate()
    config = PruneConfig(policy="evopress", samples=5).validate()  # odd samples: no pairs to draw
    assert (config.init, config.budget, config.objective, config.rank) == ("auto", "params", "soft", "flap")


def test_prune_cli_runs_evopress_end_to_end(tiny_llama_dir, tmp_path):
    out = tmp_path / "evo"
    fast = list(FAST_CLI)
    fast[fast.index("--steps") + 1] = "7"
    fast[fast.index("--samples") + 1] = "4"
    code, err = cli("prune", "--model", str(tiny_llama_dir), "--out", str(out), "--policy", "evopress",
                    "--init", "flap", "--incumbent-every", "5", "--selection-windows", "2", *fast)
    assert code == 0, err
    result = json.loads((out / "evolution.json").read_text())
    assert result["generations"] == 1 and result["evaluations"] == 2 * 4 + (CONFIRM_STEPS + 1) * (1 + SURVIVORS)
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["policy"] == "evopress" and report["evolution"]["generations"] == 1
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [1, 2, 2, 2, 2, 1, 2]
    mask = Masks.load(out / "mask.safetensors")
    assert (out / "model").is_dir() and mask.S == 1


def test_prune_help_lists_evopress():
    from typer.testing import CliRunner

    from bpp.cli import app

    result = CliRunner().invoke(app, ["prune", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0 and "evopress" in result.output


def test_evopress_kill_9_mid_generation_then_resume_equals_an_uninterrupted_run(tiny_llama_dir, tmp_path):
    """The parent, the survivors and their stage-2 losses, the generator and the incumbent survive
    kill -9 in the middle of a generation bit for bit."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    extra = ("--policy", "evopress", "--init", "flap", "--steps", "80", "--samples", "4", "--checkpoint-every", "7",
             "--incumbent-every", "20", "--selection-windows", "4")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(prune_cmd(tiny_llama_dir, ref, *extra), check=True, env=env, cwd=REPO, capture_output=True,
                   timeout=300)
    proc = subprocess.Popen(prune_cmd(tiny_llama_dir, cut, *extra), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = kill_9_at_checkpoint(proc, cut / "checkpoint.pt", 36, finished=cut / "mask.safetensors")
    assert proc.returncode == -signal.SIGKILL
    assert 36 <= killed_at < 80 and killed_at % (1 + CONFIRM_STEPS) != 0  # inside a generation
    subprocess.run([sys.executable, "-m", "bpp", "prune", "--resume", str(cut), "--quiet"], check=True, env=env,
                   cwd=REPO, capture_output=True, timeout=300)
    a, b = json.loads((cut / "evolution.json").read_text()), json.loads((ref / "evolution.json").read_text())
    assert a == b and a["generations"] == 16 and a["accepted"] > 0
    assert Masks.load(cut / "mask.safetensors") == Masks.load(ref / "mask.safetensors")
    lines = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "masks_per_s", "selection")}  # noqa: E731
    assert [strip(r) for r in lines(cut)] == [strip(r) for r in lines(ref)]
    rc, rr = json.loads((cut / "report.json").read_text()), json.loads((ref / "report.json").read_text())
    assert rc["sessions"] == 2 and rc["evolution"] == rr["evolution"]


@pytest.mark.parametrize("rank", ["flap", "init"])
def test_the_start_is_the_allocation_policys(rank):
    """Built from the same SearchStart, both policies start from the same mask under the same budget."""
    from bpp.search import AllocationPolicy, SearchStart, config_budget

    g = torch.Generator().manual_seed(6)
    init = Masks(torch.rand(1, 6, 64, generator=g) < 0.7, torch.rand(1, 6, 4, generator=g) < 0.6,
                 torch.ones(1, 6, dtype=torch.bool))
    scores = {"channel": torch.rand(6, 64, generator=g), "group": torch.rand(6, 4, generator=g)}
    start = SearchStart(None, init, metrics=scores, rank_scores=None if rank == "init" else scores)
    masks = []
    for policy in ("allocation", "evopress"):
        config = PruneConfig(policy=policy, sparsity=0.35, rank=rank).validate()
        cls = AllocationPolicy if policy == "allocation" else EvolutionPolicy
        masks.append(cls.start(SPACE, config_budget(SPACE, config), config, start).deterministic_mask())
    assert masks[0] == masks[1]
