"""The allocation policy: counts ↔ masks under one parameter budget, antithetic sampling, the
gradient estimate (the one the policy steps with) against finite differences of the exact
expected loss, group moves."""
import math

import pytest
import torch

from bpp.search.allocation import AllocationPolicy
from bpp.search.counts import largest_remainder, ranks_from_scores
from bpp.search.estimators import half_correlation, leave_one_out, offset_gradient
from bpp.search.group_moves import GroupMove
from bpp.search.optimizers import Adam
from bpp.errors import BppError
from bpp.models.masked import MaskedModel
from bpp.space import MaskSpace
from tests.tiny import tiny_model


def _policy(space, channels=(50, 48), groups=(2, 2), sigma=0.05, extra_channels=0, seed=0, **kw):
    """A policy whose init allocation meets the budget exactly (plus ``extra_channels`` of slack)."""
    g = torch.Generator().manual_seed(seed)
    ranks_c = ranks_from_scores(torch.rand(space.n_layers, space.n_channels, generator=g))
    ranks_g = ranks_from_scores(torch.rand(space.n_layers, space.n_groups, generator=g))
    kept = sum(groups) * space.group_params + (sum(channels) + extra_channels) * space.channel_params
    sparsity = 1.0 - kept / space.prunable_params
    return AllocationPolicy(space, ranks_c, ranks_g, torch.tensor(channels), torch.tensor(groups), sparsity,
                            sigma=sigma, **kw)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=5)  # 2 layers, 70 channels, 2 KV groups of 3 heads


@pytest.fixture(scope="module")
def space(model):
    return MaskSpace.from_model(model)


def test_ranks_and_largest_remainder():
    ranks = ranks_from_scores(torch.tensor([[0.1, 0.9, 0.5, 0.9]]))
    assert ranks.tolist() == [[3, 0, 2, 1]]  # ties: lower index first
    k = largest_remainder(torch.tensor([[1.6, 2.7, 0.7]], dtype=torch.float64), torch.tensor([5]), cap=3)
    assert k.tolist() == [[1, 3, 1]]
    k = largest_remainder(torch.tensor([[2.9, 3.0, 0.2]], dtype=torch.float64), torch.tensor([4]), cap=3)
    assert k.tolist() == [[2, 2, 0]] or int(k.sum()) == 4


def test_zero_offsets_reproduce_the_init_allocation_and_every_sample_meets_the_budget(space):
    policy = _policy(space)
    channels, groups = policy.center_counts()
    assert channels.tolist() == [50, 48] and groups.tolist() == [2, 2]
    mask = policy.deterministic_mask()
    assert mask.channels.sum(-1)[0].tolist() == [50, 48]
    # the top-ranked channels are the kept ones
    kept = mask.channels[0, 0]
    assert int(policy.channel_ranks[0][kept].max()) == 49
    eps = policy.draw_directions(16, torch.Generator().manual_seed(1))
    assert torch.allclose(eps.sum(-1), torch.zeros(16, dtype=torch.float64), atol=1e-12)
    masks, counts = policy.pair_masks(eps)
    assert masks.S == 32 and bool((counts.sum(-1) == 98).all())
    kept_params = space.params(masks)
    assert bool((kept_params == space.params(mask)[0]).all())  # all samples: the same parameter count
    # antithetic: the two masks of a pair move in opposite directions around the centre
    d_plus, d_minus = counts[0::2] - channels, counts[1::2] - channels
    assert bool(((d_plus * d_minus) <= 0).all()) and bool((d_plus != 0).any())


def test_clipping_and_the_shift_keep_the_budget(space):
    policy = _policy(space, channels=(69, 40), sigma=0.3)
    eps = policy.draw_directions(32, torch.Generator().manual_seed(2))
    _, counts = policy.pair_masks(eps)
    assert bool((counts <= 70).all()) and bool((counts >= 0).all()) and bool((counts.sum(-1) == 109).all())


def test_group_moves_trade_groups_for_channels_under_one_budget(space):
    policy = _policy(space, channels=(30, 30), groups=(2, 1))
    moves = policy.feasible_moves()
    # layer 0 has both its groups: only −1; layer 1 may go either way (the budget allows +1 by taking channels)
    assert {(m.layer, m.delta) for m in moves} == {(0, -1), (1, -1), (1, 1)}
    masks = policy.move_masks(moves)
    groups = masks.groups.sum(-1)
    assert groups[0].tolist() == [2, 1]
    params = space.params(masks)
    target = policy.target + space.n_layers * (space.attention_fixed_params + space.mlp_fixed_params) \
        + space.total_params - space.prunable_params - space.n_layers * (space.attention_fixed_params
                                                                         + space.mlp_fixed_params)
    assert bool((params <= target).all())
    per_group = space.group_params // space.channel_params  # 26 channels a group on the tiny model
    removed = masks.channels.sum((-1, -2))
    assert int(removed[1] - removed[0]) in (per_group, per_group + 1)  # a group given up buys channels
    policy.apply(GroupMove(1, 1))
    assert policy.groups.tolist() == [2, 2]
    with pytest.raises(BppError, match="more parameters than the budget"):
        AllocationPolicy(space, policy.channel_ranks, policy.group_ranks, torch.tensor([70, 70]),
                         torch.tensor([2, 2]), 0.9)


def test_bad_sigma(space):
    with pytest.raises(BppError, match="--sigma must be positive"):
        _policy(space, sigma=0.0)


# --- the estimator against the exact expected loss ----------------------------------------------

def _phi(z):
    return math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _Phi(z):
    return 0.5 * math.erfc(-z / math.sqrt(2))


def test_gradient_matches_finite_differences_of_the_exact_expected_loss(model, space):
    """Two layers, channels only: the centred directions are one line, w·u with u = (1, −1)/√2,
    and the loss along it is piecewise constant, so the expected loss J(t) = E F(t + σz) and the
    expectation of the estimator are finite sums over the intervals where the masks do not change
    (enumerated exactly by bisection). The estimator's expectation must equal dJ/dt."""
    sigma = 0.04
    policy = _policy(space, sigma=sigma, seed=3)
    policy.offsets = torch.tensor([0.013, -0.013], dtype=torch.float64)
    u = torch.tensor([1.0, -1.0], dtype=torch.float64) / math.sqrt(2)
    engine = MaskedModel(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))

    def counts_at(w: torch.Tensor) -> torch.Tensor:
        levels = policy.levels().unsqueeze(0) + w.unsqueeze(-1) * u
        return policy.channel_counts(levels, policy.groups.unsqueeze(0).expand(len(w), -1))

    # breakpoints of the count map on [−9σ, 9σ], to 1e-13
    grid = torch.linspace(-9 * sigma, 9 * sigma, 1201, dtype=torch.float64)
    counts = counts_at(grid)
    change = (counts[1:] != counts[:-1]).any(-1).nonzero().flatten().tolist()
    lo = grid[change].clone()
    hi = grid[[i + 1 for i in change]].clone()
    c_lo = counts[change]
    for _ in range(45):  # all breakpoints at once
        mid = 0.5 * (lo + hi)
        same = (counts_at(mid) == c_lo).all(-1)
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    breaks = hi.tolist()
    assert len(breaks) >= 6  # the line crosses several allocations within the smoothing
    edges = [-math.inf] + breaks + [math.inf]
    reps = [float(grid[0])] + [0.5 * (a + b) for a, b in zip(breaks[:-1], breaks[1:])] + [float(grid[-1])]
    reps_counts = counts_at(torch.tensor(reps, dtype=torch.float64))
    masks = policy.masks(reps_counts, policy.groups.unsqueeze(0).expand(len(reps), -1))
    F = engine.losses(ids, masks).double().tolist()

    def J(t):
        return sum(f * (_Phi((b - t) / sigma) - _Phi((a - t) / sigma)) for f, a, b in zip(F, edges[:-1], edges[1:]))

    h = 1e-5
    fd = (J(h) - J(-h)) / (2 * h)

    # the estimator's exact expectation: on each z-interval both masks of the pair are fixed
    zb = sorted({b / sigma for b in breaks} | {-b / sigma for b in breaks})
    z_edges = [-math.inf] + zb + [math.inf]
    expected = 0.0
    for a, b in zip(z_edges[:-1], z_edges[1:]):
        z = a + 0.25 * (b - a) if math.isfinite(a) and math.isfinite(b) else (b - 1.0 if math.isfinite(b) else a + 1.0)
        eps = (z * u).unsqueeze(0)
        pair, _ = policy.pair_masks(eps)
        losses = engine.losses(ids, pair)
        g, _, _ = offset_gradient(eps, losses, sigma, antithetic=True)  # = (L⁺ − L⁻) z u / (2σ)
        slope = float(g @ u) / z  # (L⁺ − L⁻) / (2σ), constant on the interval
        expected += slope * (_phi(a) - _phi(b))  # ∫ z φ(z) dz over [a, b]
    assert abs(fd) > 1e-3  # not a flat spot
    assert abs(expected - fd) <= 1e-6 * abs(fd) + 1e-9, (expected, fd)

    # and the sampler's average converges to it (directions drawn by the policy itself)
    gen = torch.Generator().manual_seed(5)
    draws = []
    for _ in range(20):
        eps = policy.draw_directions(8, gen)
        pair, _ = policy.pair_masks(eps)
        draws.append(float(offset_gradient(eps, engine.losses(ids, pair), sigma, antithetic=True)[0] @ u))
    draws = torch.tensor(draws, dtype=torch.float64)
    se = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean()) - fd) < 4 * se + 1e-9, (float(draws.mean()), fd, se)

    # --sampling independent: n draws, each against the mean of the others (leave-one-out), also unbiased
    draws = []
    for _ in range(40):
        eps = policy.draw_directions(8, gen)
        masks, _ = policy.draw_masks(eps)
        draws.append(float(offset_gradient(eps, engine.losses(ids, masks), sigma, antithetic=False)[0] @ u))
    draws = torch.tensor(draws, dtype=torch.float64)
    se = float(draws.std() / math.sqrt(len(draws)))
    assert se > 0 and abs(float(draws.mean()) - fd) < 4 * se + 1e-9, (float(draws.mean()), fd, se)


def test_leave_one_out_advantages():
    losses = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    assert torch.allclose(leave_one_out(losses), torch.tensor([-3.0, -1.5, 4.5], dtype=torch.float64))


def test_half_correlation_sees_a_shared_signal():
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(512, 30, generator=gen, dtype=torch.float64)
    signal = torch.linspace(-1, 1, 30, dtype=torch.float64)
    diffs = eps @ signal + 0.1 * torch.randn(512, generator=gen, dtype=torch.float64)
    assert half_correlation(eps, diffs) > 0.8
    assert abs(half_correlation(eps, torch.randn(512, generator=gen, dtype=torch.float64))) < 0.5
    assert half_correlation(eps[:1], diffs[:1]) is None


def test_adam_state_round_trip():
    a, b = Adam(3), Adam(3)
    g = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    first = a.update(g, 0.1)
    assert torch.allclose(first, torch.tensor([0.1, -0.1, 0.0], dtype=torch.float64))  # bias-corrected: sign
    a.update(-3 * g, 0.1)
    b.load_state(a.state())
    assert torch.equal(a.update(g, 0.1), b.update(g, 0.1))


def test_a_channel_step_moves_the_offsets_by_the_estimate(space):
    """tell() steps with offset_gradient's estimate: one Adam step of lr against its sign, re-centred."""
    policy = _policy(space, basis=0, samples=4)
    proposal = policy.ask(0, torch.Generator().manual_seed(3))
    assert proposal.kind == "channel" and proposal.masks.S == 4
    losses = torch.tensor([3.0, 2.5, 2.0, 2.75], dtype=torch.float64)
    expected, _, _ = offset_gradient(proposal.draws, losses, policy.sigma, antithetic=True)
    before = policy.offsets.clone()
    record = policy.tell(proposal, losses, lr=0.01)
    step = Adam(space.n_layers).update(expected, 0.01)
    assert torch.allclose(policy.offsets, before - step - (before - step).mean(), atol=1e-15)
    assert record["grad"] == expected.tolist() and not record["skipped"]
