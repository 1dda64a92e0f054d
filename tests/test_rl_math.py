"""PPO and GRPO equations on small hand-computed tensors."""

import math

import torch

from chatforge.stages.grpo import group_advantages, kl_k1, kl_k3
from chatforge.stages.ppo import (
    gae,
    kl_penalised_rewards,
    policy_loss,
    value_loss,
    whiten,
)


def test_gae_on_a_known_sequence():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.7
    d1 = 0.0 + gamma * 0.7 - 0.6
    d0 = 0.0 + gamma * 0.6 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = gae(rewards, values, gamma, lam)
    assert torch.allclose(advantages, torch.tensor([[a0, a1, a2]]), atol=1e-6)
    assert torch.allclose(returns, advantages + values)
    # λ = 1, γ = 1: the advantage is the Monte-Carlo return minus the value
    advantages, _ = gae(rewards, values, 1.0, 1.0)
    assert torch.allclose(advantages, torch.tensor([[1 - 0.5, 1 - 0.6, 1 - 0.7]]), atol=1e-6)


def test_clipped_policy_loss_on_crafted_ratios():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.5]))  # ratios
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    mask = torch.ones(4)
    loss, clip_fraction = policy_loss(logp, old, adv, mask, clip=0.2)
    # min(ρA, clip(ρ)A): 1.5→1.2 (clipped), 0.5 (unclipped, smaller), -1.1 (unclipped), 0.5·-1→-0.8 clipped
    expected = -(1.2 + 0.5 - 1.1 - 0.8) / 4
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(clip_fraction.item(), 0.5)


def test_value_loss_clips_and_kl_rewards_land_on_tokens():
    v, old, ret, mask = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([3.0]), torch.ones(1)
    # clipped value 1.2: max((2-3)², (1.2-3)²) = 3.24
    assert math.isclose(value_loss(v, old, ret, mask, clip=0.2).item(), 0.5 * 3.24, rel_tol=1e-6)
    assert math.isclose(value_loss(v, old, ret, mask, clip=0.0).item(), 0.5 * 1.0, rel_tol=1e-6)  # unclipped
    logp = torch.tensor([[-1.0, -2.0, -3.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    r = kl_penalised_rewards(torch.tensor([5.0]), logp, ref, 0.1, mask)
    assert torch.allclose(r, torch.tensor([[-0.05, 0.0, 0.1 + 5.0, 0.0]]), atol=1e-6)
    w = whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert abs(w[:3].mean().item()) < 1e-6 and w[3] == 0


def test_group_advantages_and_kl_estimators():
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 5.0, 5.0, 5.0, 5.0]), group_size=4)
    s = torch.tensor([1.0, 0.0, 1.0, 0.0]).std().item()
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]) / s, atol=1e-5)
    assert torch.equal(adv[4:], torch.zeros(4))  # a group that all agree teaches nothing
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(kl_k1(logp, ref), torch.tensor([0.5, -1.0]))
    k3 = kl_k3(logp, ref)
    assert torch.allclose(k3, torch.exp(ref - logp) - (ref - logp) - 1) and (k3 >= 0).all()
    assert kl_k3(logp, logp).abs().max() == 0
    # k1 and k3 agree in expectation: samples of p, KL(p‖q) of two categoricals
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.5, 0.3, 0.2])
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    exact = (p * (p / q).log()).sum()
    for estimator in (kl_k1, kl_k3):
        assert abs(estimator(p.log()[x], q.log()[x]).mean() - exact) < 0.01
