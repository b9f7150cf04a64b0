"""A search that scales: ``--evaluations`` sets the steps, the allocation policy runs rounds
(each re-centred on the incumbent with a finer perturbation and restarted learning rate), a run
longer than the text goes over it again, and a resume across a round boundary is bit for bit."""
import pytest
import torch

from bpp.errors import BppError
from bpp.masks import Masks
from bpp.search import SearchLoop
from bpp.search import config as search_config
from bpp.search.allocation import AllocationPolicy
from bpp.search.config import PruneConfig, learning_rate, rounds
from bpp.search.counts import ranks_from_scores
from bpp.search.objective import calibration_batches, selection_windows
from bpp.space import MaskSpace
from tests.tiny import tiny_model


def test_evaluations_set_the_steps_and_conflicts_are_refused():
    assert PruneConfig(evaluations=3000).validate().steps == 375
    assert PruneConfig(evaluations=100).validate().steps == 13  # ⌈100 / 8⌉
    assert PruneConfig(evaluations=480, steps=60).validate().steps == 60  # a saved config holds both
    with pytest.raises(BppError, match="not both"):
        PruneConfig(evaluations=1000, steps=60).validate()
    with pytest.raises(BppError, match="at least --samples"):
        PruneConfig(evaluations=4).validate()
    with pytest.raises(BppError, match="--evaluations must be int"):
        PruneConfig(evaluations=1.5).validate()


def test_rounds_of_the_allocation_policy():
    assert rounds(PruneConfig().validate()) == [0]  # the default search is one round
    assert rounds(PruneConfig(evaluations=300).validate()) == [0]
    assert rounds(PruneConfig(evaluations=1000).validate()) == [0, 60]
    assert rounds(PruneConfig(evaluations=3000).validate()) == [0, 60, 120, 180, 240, 300]
    assert rounds(PruneConfig(policy="units", evaluations=3000).validate()) == [0]
    cfg = PruneConfig(evaluations=1000).validate()  # rounds of 60 and 65 steps
    assert learning_rate(cfg, 0) == learning_rate(cfg, 60) == cfg.lr  # the schedule restarts
    assert learning_rate(cfg, 59) < 0.01 * cfg.lr and learning_rate(cfg, 124) < 0.01 * cfg.lr
    one = PruneConfig().validate()
    assert [learning_rate(one, s) for s in (0, 30)] == [one.lr, pytest.approx(one.lr / 2)]


def test_a_search_longer_than_the_text_goes_over_it_again_without_the_selection_windows():
    ids = torch.arange(40 * 8)  # 40 windows of 8 tokens, each window's first token is its index × 8
    cfg = PruneConfig(seq_len=8, batch_size=2, steps=10, selection_windows=4).validate()
    short = calibration_batches(ids, cfg)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(short[:, 0] // 8, order[:20])  # fits: the seeded shuffle's first windows, as always
    cfg = PruneConfig(seq_len=8, batch_size=2, steps=50, selection_windows=4).validate()
    long = calibration_batches(ids, cfg)[:, 0] // 8
    held = set((selection_windows(ids, cfg)[:, 0] // 8).tolist())
    assert long.numel() == 100 and not held & set(long.tolist())
    assert sorted(long[:36].tolist()) == sorted(long[36:72].tolist()) == sorted(set(range(40)) - held)
    assert not torch.equal(long[:36], long[36:72])  # each pass in a new order
    with pytest.raises(BppError, match="too little calibration text"):
        calibration_batches(ids, PruneConfig(seq_len=8, batch_size=40, steps=1, selection_windows=4).validate())


@pytest.fixture(scope="module")
def space():
    return MaskSpace.from_model(tiny_model("llama", seed=5))  # 2 layers, 70 channels, 2 KV groups


def _loop(space, cfg):
    g = torch.Generator().manual_seed(3)
    ranks_c = ranks_from_scores(torch.rand(space.n_layers, space.n_channels, generator=g))
    ranks_g = ranks_from_scores(torch.rand(space.n_layers, space.n_groups, generator=g))
    policy = AllocationPolicy(space, ranks_c, ranks_g, torch.tensor([50, 30]), torch.tensor([2, 2]), cfg.sparsity,
                              sigma=cfg.sigma, basis=cfg.basis, samples=cfg.samples, group_every=cfg.group_every)
    target = torch.tensor([20.0, 60.0])  # the synthetic optimum: layer 0 keeps 20 channels, layer 1 keeps 60

    def losses(ids, masks):
        kept = masks.channels.sum(-1).double()
        return ((kept - target) ** 2).sum(-1) / 100 + 0.5 * torch.sin(3.7 * kept).sum(-1)  # a rugged landscape

    windows = torch.zeros(cfg.steps * cfg.batch_size, cfg.seq_len, dtype=torch.long)
    loop = SearchLoop(policy, losses, windows, cfg, progress=False)
    loop.attach_incumbent(lambda ids, masks: losses(ids, masks).unsqueeze(1).repeat(1, ids.shape[0]),
                          torch.zeros(4, cfg.seq_len, dtype=torch.long), None)
    return loop, policy


def test_rounds_recentre_on_the_incumbent_and_resume_bit_for_bit(space, monkeypatch):
    monkeypatch.setattr(search_config, "ROUND_EVALUATIONS", 40)  # rounds of 10 steps of 4 masks
    cfg = PruneConfig(sparsity=0.3, samples=4, evaluations=120, group_every=0, incumbent_every=5, basis=0,
                      sigma=0.2, lr=0.1, seq_len=4).validate()
    assert rounds(cfg) == [0, 10, 20]
    loop, policy = _loop(space, cfg)
    seen = []
    real = policy.new_round

    def spy(r, start):
        seen.append((r, loop.step, start == loop.incumbent.mask))
        real(r, start)
        assert policy.deterministic_mask() == start  # the round starts where the incumbent is
        assert float(policy.offsets.abs().max()) == 0.0
    policy.new_round = spy
    while loop.step < 15:
        loop.run_step()
        loop.challenge_incumbent()
    state = loop.state_dict()
    loop.run()
    assert seen == [(1, 10, True), (2, 20, True)] and policy.round == 2
    assert policy.sigma == pytest.approx(0.05)  # halved each round
    assert loop.evaluations == 120
    counts = policy.center_counts()[0].tolist()
    assert abs(counts[0] - 20) + abs(counts[1] - 60) < abs(50 - 20) + abs(30 - 60)  # it moved towards the optimum

    again, policy2 = _loop(space, cfg)  # a fresh process resumes at step 15
    policy2.load_state({k: v for k, v in state["policy"].items() if k != "name"})
    again.load_state_dict(state)
    again.run()
    assert policy2.round == 2 and torch.equal(policy2.offsets, policy.offsets)
    assert torch.equal(policy2.base, policy.base) and again.incumbent.mask == loop.incumbent.mask


def test_evaluations_bound_every_policy(tiny_llama_dir, tiny_llama_loaded, tmp_path):
    """--evaluations N: the allocation policy runs ⌈N / S⌉ steps; evopress (fewer masks on some
    steps) stops once N are spent; both report what they evaluated."""
    from bpp.jobs.prune import prune

    model, tok = tiny_llama_loaded
    fast = dict(model=str(tiny_llama_dir), samples=4, batch_size=2, seq_len=32, init_windows=4, init_seq_len=32,
                sparsity=0.3, selection_windows=4, incumbent_every=3, group_every=3)
    for policy, n in (("allocation", 30), ("evopress", 45)):
        report = prune(PruneConfig(policy=policy, evaluations=n, **fast), tmp_path / policy, model=model,
                       tokenizer=tok, progress=False, evaluate=False, compact=False)
        assert n <= report["evaluations"] < n + 4, policy
        assert report["config"]["evaluations"] == n
    assert report["steps_done"] > 45 // 4  # evopress's confirmation steps evaluate fewer masks
