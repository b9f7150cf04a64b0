"""Budgets and the per-unit Bernoulli policy: projection onto the budget, the score-function
gradient, baselines, the final mask, and the input checks."""
import math

import pytest
import torch

from bpp.errors import BppError
from bpp.budget import Budget, deterministic_mask, parse_granularity, project_onto_budget
from bpp.masks import Masks
from bpp.search.estimators import binary_entropy, loss_baseline, score_function_gradient
from bpp.search.units import UnitsPolicy
from bpp.space import MaskSpace
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def space():
    return MaskSpace.from_model(tiny_model("llama"))  # 2 layers, 70 channels, 2 KV groups


# --- projection ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_projection_meets_the_budget_exactly_within_bounds(seed):
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(500, generator=g, dtype=torch.float64) * 1.6 - 0.3  # outside [0, 1] too
    costs = torch.ones(500, dtype=torch.float64)
    for budget in (1.0, 123.4, 250.0, 499.0):
        x = project_onto_budget(theta, costs, budget)
        assert abs(float(x.sum()) - budget) < 1e-9
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        # the solution is a uniform shift of θ, clamped: θ − x is the same v on free units
        free = (x > 0) & (x < 1)
        shift = theta[free] - x[free]
        assert float(shift.max() - shift.min()) < 1e-12


def test_projection_is_idempotent_and_raises_the_sum_when_below_budget():
    theta = torch.tensor([0.1, 0.2, 0.3, 0.05], dtype=torch.float64)
    x = project_onto_budget(theta, torch.ones(4, dtype=torch.float64), 2.0)  # sum 0.65 → 2.0
    assert abs(float(x.sum()) - 2.0) < 1e-12 and bool((x >= theta).all())
    y = project_onto_budget(x, torch.ones(4, dtype=torch.float64), 2.0)
    assert torch.allclose(x, y, atol=1e-12, rtol=0)


def test_projection_is_the_nearest_point_by_hand():
    # θ = (0.9, 0.5, 0.2), budget 1: v solves clamp(.9−v)+clamp(.5−v)+clamp(.2−v) = 1 → v = 0.2
    x = project_onto_budget(torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64), torch.ones(3), 1.0)
    assert torch.allclose(x, torch.tensor([0.7, 0.3, 0.0], dtype=torch.float64), atol=1e-12)


def test_weighted_projection_meets_the_weighted_budget():
    g = torch.Generator().manual_seed(1)
    theta = torch.rand(300, generator=g, dtype=torch.float64)
    costs = torch.where(torch.arange(300) < 20, 500.0, 3.0).to(torch.float64)  # two unit kinds
    budget = 0.6 * float(costs.sum())
    x = project_onto_budget(theta, costs, budget)
    assert abs(float((costs * x).sum()) - budget) < 1e-6
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # KKT in the cost-weighted norm: every free unit moved by the same v
    free = (x > 0) & (x < 1)
    assert float((theta - x)[free].std()) < 1e-12
    # and no feasible point is closer in that norm (random feasible competitors)
    best = float((costs * (x - theta) ** 2).sum())
    for _ in range(20):
        y = project_onto_budget(torch.rand(300, generator=g, dtype=torch.float64), costs, budget)
        assert float((costs * (y - theta) ** 2).sum()) >= best - 1e-9


# --- gradient and baselines -----------------------------------------------------------------

def test_gradient_matches_a_hand_computation():
    theta = torch.tensor([0.5, 0.8, 0.2], dtype=torch.float64)
    masks = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    losses = torch.tensor([2.0, 3.0])
    b = 2.25
    eps = 1e-7
    expected = []
    for u, t in enumerate(theta.tolist()):
        norm = math.sqrt((t + eps) * (1 - t + eps))
        total = sum((float(losses[s]) - b) * (float(masks[s, u]) - t) / norm for s in range(2))
        expected.append(total / (2 - 1))
    got = score_function_gradient(theta, masks, losses, b, n_samples=2)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    # unit 0: (−0.25·0.5 + 0.75·(−0.5))/0.5 = −1 → the kept-in-the-better-sample unit gains θ
    assert abs(float(got[0]) - (-1.0)) < 1e-5


def test_gradient_is_unbiased_for_a_known_objective():
    # E[L] = Σ w_u m_u → ∂E/∂θ_u = w_u; E[(L − b)(m_u − θ_u)] = w_u θ_u(1 − θ_u), so the official
    # normalisation gives E[ĝ_u] = w_u·sqrt(θ_u(1 − θ_u)): the gradient rescaled per unit
    torch.manual_seed(0)
    theta = torch.tensor([0.3, 0.6, 0.5], dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    S, rounds, total = 8, 3000, torch.zeros(3, dtype=torch.float64)
    for _ in range(rounds):
        m = torch.rand(S, 3, dtype=torch.float64) < theta
        losses = (m.double() * w).sum(1)
        b, _ = loss_baseline(losses, "leave-one-out", None)
        total += score_function_gradient(theta, m, losses, b, S)
    est = total / rounds / torch.sqrt(theta * (1 - theta))
    assert torch.allclose(est, w, atol=0.08)


def test_moving_average_baseline_starts_at_the_first_mean_then_decays():
    b, state = loss_baseline(torch.tensor([2.0, 4.0]), "moving-average", None)
    assert float(b) == 3.0 and state == 3.0
    b, state = loss_baseline(torch.tensor([5.0, 5.0]), "moving-average", state)
    assert abs(state - (0.8 * 3.0 + 0.2 * 5.0)) < 1e-12 and float(b) == state
    with pytest.raises(ValueError, match="unknown baseline"):
        loss_baseline(torch.tensor([1.0]), "median", None)


def test_entropy():
    h = binary_entropy(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(h, torch.tensor([0.0, math.log(2), 0.0], dtype=torch.float64))


# --- the policy on a model's units ------------------------------------------------------------

def test_final_mask_respects_each_budget(space):
    budget = Budget(space, "group,channel", sparsity=0.3)
    theta = budget.project(torch.rand(budget.n_units, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert [abs(s - p.target) < 1e-6 for s, p in zip(budget.sums(theta), budget.parts)] == [True, True]
    mask = budget.final_mask(theta)
    assert int(mask.channels.sum()) == round(0.7 * 2 * 70)
    assert int(mask.groups.sum()) == round(0.7 * 2 * 2)
    assert bool(mask.layers.all())
    # the kept channels are exactly the highest-θ ones
    th = theta[budget.slices["channel"]]
    kept = mask.channels.reshape(-1)
    assert float(th[kept].min()) >= float(th[~kept].max())


def test_params_budget_is_joint_and_final_mask_fits(space):
    budget = Budget(space, "group,channel", sparsity=0.4, kind="params")
    assert len(budget.parts) == 1
    g = torch.Generator().manual_seed(3)
    theta = budget.project(torch.rand(budget.n_units, generator=g, dtype=torch.float64))
    (target,) = [p.target for p in budget.parts]
    assert abs(budget.sums(theta)[0] - target) < 1e-6
    mask = budget.final_mask(theta)
    kept_params = int(mask.channels.sum()) * space.channel_params + int(mask.groups.sum()) * space.group_params
    assert kept_params <= target
    assert target - kept_params < space.group_params  # nothing that still fits was left out


def test_deterministic_mask_skips_what_does_not_fit():
    theta = torch.tensor([0.9, 0.8, 0.7, 0.1], dtype=torch.float64)
    costs = torch.tensor([5.0, 6.0, 1.0, 1.0], dtype=torch.float64)
    assert deterministic_mask(theta, costs, 7.0).tolist() == [True, False, True, True]


def test_sampling_follows_theta_and_keeps_unlearned_units(space):
    policy = UnitsPolicy(Budget(space, "channel", sparsity=0.5))
    masks, flat = policy.sample(400, torch.Generator().manual_seed(0))
    assert masks.channels.shape == (400, 2, 70) and bool(masks.groups.all()) and bool(masks.layers.all())
    assert abs(float(flat.double().mean()) - 0.5) < 0.01
    assert torch.equal(policy.budget.from_masks(masks), flat)


def test_theta_masks_roundtrip(space):
    policy = UnitsPolicy(Budget(space, "group,channel", sparsity=0.2))
    policy.theta = torch.linspace(0, 1, policy.budget.n_units, dtype=torch.float64)
    theta = policy.theta_masks()
    with_s = Masks(theta.channels.unsqueeze(0), theta.groups.unsqueeze(0), theta.layers.unsqueeze(0))
    assert torch.equal(policy.budget.from_masks(with_s)[0], policy.theta)


# --- bad inputs --------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_the_open_interval(space, sparsity):
    with pytest.raises(BppError, match="strictly between 0 and 1"):
        Budget(space, "group,channel", sparsity=sparsity)


def test_budget_impossible_for_the_granularity(space):
    with pytest.raises(BppError, match="cannot be met by the granularity layer"):
        Budget(space, "layer", sparsity=0.2)  # 2 layers: keeping 1.6 rounds to 2, prunes nothing
    with pytest.raises(BppError, match="cannot be met by the granularity group"):
        Budget(space, "group", sparsity=0.05)


def test_granularity_parsing():
    assert parse_granularity("group,channel") == ("channel", "group")
    assert parse_granularity("heads,channels".replace("heads", "groups")) == ("channel", "group")
    with pytest.raises(BppError, match="unknown granularity"):
        parse_granularity("neuron")
    with pytest.raises(BppError, match="cannot be combined"):
        parse_granularity("layer,channel")
