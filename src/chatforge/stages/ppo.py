"""PPO for RLHF (InstructGPT step 3; Schulman et al., 2017; Ziegler et al., 2019) — the equations.

The rollout loop and the stage that uses them are still to come (the RLHF issue); these functions are
the pieces it is built from, each checked against hand-computed numbers in tests/test_rl_math.py.
"""

from __future__ import annotations

import torch


def kl_penalised_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, kl_coef: float,
                         mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards (B, T): −β (log π − log π_ref) at every response token, plus the reward model's
    score at the last one (InstructGPT eq. 2, the KL spread over tokens as in Ziegler et al.)."""
    rewards = -kl_coef * (logp - ref_logp) * mask
    last = mask.long().cumsum(-1).argmax(-1)  # index of each row's last response token
    rewards[torch.arange(len(score)), last] += score
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016, eq. 16) over (B, T), value 0 after the end:
    δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1};  returns = A + V."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries."""
    mean = (x * mask).sum() / mask.sum()
    var = (((x - mean) * mask) ** 2).sum() / mask.sum()
    return (x - mean) * torch.rsqrt(var + eps) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate (PPO eq. 7), negated to minimise: −E[min(ρA, clip(ρ, 1−ε, 1+ε)A)], ρ = π/π_old.
    Also returns the share of tokens where the clip was active."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip) * advantages
    loss = -(torch.minimum(unclipped, clipped) * mask).sum() / mask.sum()
    clip_fraction = ((clipped < unclipped).float() * mask).sum() / mask.sum()
    return loss, clip_fraction


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> torch.Tensor:
    """½ E[max((V − R)², (clip(V, V_old ± ε) − R)²)]: the value moves at most ε from the rollout's."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    worst = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (worst * mask).sum() / mask.sum()
