"""log p(token | the tokens before it): the one routine that RL (π and π_ref of a rollout, the policy
loss), DPO (log π(y|x) of a reply) and multiple-choice scoring share. Held-out loss and bits per byte
use the same quantity averaged, as the model's own cross-entropy (`Transformer.forward(targets=...)`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   with_entropy: bool = False, with_greedy: bool = False):
    """log p(targets[b, t] | inputs[b, ≤t]) (B, T) from one forward pass; 0 where a target is -100 (not
    scored). `with_entropy`: also each position's entropy (B, T); `with_greedy`: also whether each target
    is the most likely token there (B, T), as a tuple after the log-probs."""
    logp_all = F.log_softmax(model(inputs).float(), dim=-1)
    scored = targets != -100
    logp = logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * scored
    extras = []
    if with_entropy:
        extras.append(-(logp_all.exp() * logp_all).sum(-1))
    if with_greedy:
        extras.append(logp_all.argmax(-1) == targets)
    return (logp, *extras) if extras else logp
