"""GRPO (Shao et al., 2024, DeepSeekMath §4.1.2): G replies per prompt; each reply's advantage is its
reward normalised within its group, so no critic is needed; the KL to the reference (the starting model)
is added to the loss with the k3 estimator rather than folded into the reward:

    L = −E_t[min(ρ_t Â, clip(ρ_t, 1−ε, 1+ε) Â)] + β E_t[k3_t],   ρ_t = π(o_t)/π_old(o_t),  Â = (r − mean_G r)/std_G r

The mean is over every reply token of the minibatch (token-level, as DAPO does), so long replies are
not down-weighted. One optimizer step of the shared training loop is one minibatch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatforge.config import Config
from chatforge.errors import ChatforgeError
from chatforge.stages.ppo import policy_loss
from chatforge.stages.rollout import RLRun, Round, sequence_logprobs
from chatforge.train.loop import train


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


def grpo_loss(policy: torch.nn.Module, rnd: Round, idx: torch.Tensor, clip: float, kl_coef: float
              ) -> tuple[torch.Tensor, dict]:
    """The loss of one minibatch of a round: clipped policy loss + β × k3 KL to the reference."""
    mask = rnd.mask[idx]
    logp, entropy = sequence_logprobs(policy, rnd.sequences[idx], with_entropy=True)
    pg, clip_fraction = policy_loss(logp, rnd.old_logp[idx], rnd.advantages[idx], mask, clip)
    kl = (kl_k3(logp, rnd.ref_logp[idx]) * mask).sum() / mask.sum()
    stats = {"policy_loss": pg.item(), "kl_term": kl.item(), "clip_fraction": clip_fraction.item(),
             "entropy": ((entropy * mask).sum() / mask.sum()).item()}
    return pg + kl_coef * kl, stats


def run_grpo(cfg: Config, init: str | Path, prompts: str | Path, out: str | Path,
             reward_run: str | Path | None = None, val: str | Path | None = None,
             resume: str | None = None) -> dict:
    out, rl = Path(out), cfg.rl
    if rl.group_size < 2:
        raise ChatforgeError(f"rl.group_size must be at least 2 for GRPO (the group is the baseline), "
                             f"got {rl.group_size}")
    run = RLRun(cfg, init, prompts, reward_run, val, "grpo")

    def prepare(rnd: Round) -> dict:
        rnd.advantages = group_advantages(rnd.scores, rl.group_size)[:, None] * rnd.mask
        groups = rnd.scores.view(-1, rl.group_size)
        return {"groups_with_signal": (groups.std(-1) > 0).float().mean().item()}

    result = train(run.policy, run.stage(prepare, lambda m, rnd, idx: grpo_loss(m, rnd, idx, rl.clip, run.kl.coef)),
                   cfg, out, resume)
    return run.finish(out, result)
