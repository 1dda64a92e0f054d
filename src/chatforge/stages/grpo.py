"""GRPO (Shao et al., 2024, DeepSeekMath §4.1) — the equations. G samples per prompt; each sample's
advantage is its reward normalised within its group, so no critic is needed; the KL to the reference
is added to the loss with the k3 estimator. The sampling loop and the stage come with the RLHF issue.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Â_i = (r_i − mean(r_group)) / (std(r_group) + ε), for rewards laid out group after group."""
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(-1, keepdim=True), groups.std(-1, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log π − log π_ref: unbiased for KL(π‖π_ref) under samples of π, but can be negative."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """π_ref/π − log(π_ref/π) − 1 (Schulman, "Approximating KL divergence", 2020): unbiased and ≥ 0."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1
