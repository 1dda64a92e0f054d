"""A mixture-of-experts feed-forward: a router sends each token to its top-k experts and mixes their outputs.

Token-choice top-k routing (Shazeer et al., 2017; GShard, Lepikhin et al., 2020): p = softmax(W_r x), the
token goes to the k experts of largest p. Top-1 scales the expert's output by p (Switch, Fedus et al., 2021,
so the task loss reaches the router); top-k > 1 renormalises the k chosen p to sum to 1 (Mixtral, Jiang et
al., 2024). Every expert is the block's own MLP (SwiGLU in the Llama style).

No token is dropped: the (token, expert) assignments are sorted by expert and each expert runs once on its
contiguous slice (a loop over experts, never over tokens), so there is no capacity factor to tune.

Two auxiliary losses keep the router healthy; the shared training loop adds them to every stage's loss
(`pop_aux_loss`): the load-balancing loss of Switch eq. 4, E · Σ_i f_i · P_i (f_i the share of assignments
that go to expert i, P_i its mean router probability; 1 for a uniform router, E for a collapsed one), and
the router z-loss of ST-MoE eq. 5 (Zoph et al., 2022), mean (log Σ_j exp z_j)², which keeps logits small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

ROW_MULTIPLE = 128  # in training each expert's rows are padded to a multiple of this (MoE._padded_rows)


@dataclass
class MoEConfig:
    n_experts: int = 0  # 0: a dense feed-forward in every block
    top_k: int = 2  # experts per token
    every: int = 1  # which blocks are sparse: 1 every block, 2 every second (blocks 1, 3, ...), ...
    shared_expert: bool = False  # one more expert that every token goes through (DeepSeekMoE, Qwen2-MoE)
    d_expert: int = 0  # an expert's hidden size; 0: the dense model's (model.d_ff)
    aux_coef: float = 0.01  # α of the load-balancing loss (Switch uses 0.01)
    z_coef: float = 0.001  # of the router z-loss (ST-MoE uses 0.001)

    def sparse(self, layer: int) -> bool:
        return self.n_experts > 0 and (layer + 1) % self.every == 0

    def validate(self) -> None:
        from chatforge.errors import ChatforgeError

        if self.n_experts < 0 or self.every < 1:
            raise ChatforgeError("model.moe.n_experts must be >= 0 and model.moe.every >= 1")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ChatforgeError(
                f"model.moe.top_k ({self.top_k}) must be between 1 and model.moe.n_experts ({self.n_experts})")


class MoE(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, make_expert: Callable[[], nn.Module]):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(cfg.n_experts))
        self.shared = make_expert() if cfg.shared_expert else None
        self.aux_losses: list[torch.Tensor] = []  # one per training forward pass, taken by `pop_aux_loss`
        self.stats: dict[str, torch.Tensor] = {}  # the last training forward's routing, for the logs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, k = x.shape, self.cfg.top_k
        x = x.reshape(-1, shape[-1])
        logits = self.router(x).float()  # (tokens, experts); routing in fp32 under autocast too
        probs = logits.softmax(-1)
        weight, expert = probs.topk(k, dim=-1)  # (tokens, k)
        if k > 1:
            weight = weight / weight.sum(-1, keepdim=True)
        flat = expert.flatten()
        counts = nn.functional.one_hot(flat, self.cfg.n_experts).sum(0)  # assignments per expert
        if torch.compiler.is_compiling():
            # a traced graph (the compiled decode step) needs shapes that do not depend on the routing: every
            # expert runs on every token and the ones not chosen are weighted 0. The same numbers, E/k × the FLOPs
            gates = torch.zeros_like(probs).scatter(-1, expert, weight).to(x.dtype)  # (tokens, experts)
            out = sum(gates[:, j, None] * expert_mlp(x) for j, expert_mlp in enumerate(self.experts))
        else:
            order = flat.argsort(stable=True)  # assignments grouped by expert, in token order within each
            token = order // k
            if self.training:
                rows, slot, sizes = self._padded_rows(x, flat[order], token, counts)
            else:  # inference: the rows as they are, and only the experts that got some run
                rows, slot, sizes = x[token], None, counts
            # in training every expert runs, on zero rows if it got none, so each weight has a gradient
            # (DDP needs them all)
            y = torch.cat([expert_mlp(r) for expert_mlp, r in zip(self.experts, rows.split(sizes.tolist()),
                                                                   strict=True) if self.training or len(r)])
            y = y if slot is None else y[slot]
            out = y.new_zeros(x.shape).index_add_(0, token, y * weight.flatten()[order, None].to(y.dtype))
        if self.shared is not None:
            out = out + self.shared(x)
        if self.training and torch.is_grad_enabled():
            self._record(logits, probs, counts)
        return out.view(shape)

    @staticmethod
    def _padded_rows(x: torch.Tensor, by_expert: torch.Tensor, token: torch.Tensor, counts: torch.Tensor):
        """Each expert's rows padded with zero rows to a multiple of 128, and where each assignment's row is.
        The routing changes every training step, and a CPU's bf16 matmul (oneDNN) builds a kernel for each
        new shape, which cost a third of the step; with few distinct shapes they are built once."""
        padded = (counts + ROW_MULTIPLE - 1) // ROW_MULTIPLE * ROW_MULTIPLE
        rank = torch.arange(len(token), device=x.device) - (counts.cumsum(0) - counts)[by_expert]
        slot = (padded.cumsum(0) - padded)[by_expert] + rank
        index = torch.full((int(padded.sum()),), x.shape[0], device=x.device).index_copy_(0, slot, token)
        return torch.cat([x, x.new_zeros(1, x.shape[1])])[index], slot, padded  # index x.shape[0]: the zero row

    def _record(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor) -> None:
        share = counts.float() / counts.sum()  # f_i
        balance = self.cfg.n_experts * (share * probs.mean(0)).sum()  # Switch eq. 4 without α
        z = torch.logsumexp(logits, -1).pow(2).mean()  # ST-MoE eq. 5
        self.aux_losses.append(self.cfg.aux_coef * balance + self.cfg.z_coef * z)
        entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
        self.stats = {"balance": balance.detach(), "z": z.detach(), "entropy": entropy.detach(), "share": share}


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def pop_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the auxiliary losses of every training forward pass since the last call, or None for a
    dense model. The shared loop calls it after each micro-batch's loss; other code that trains an MoE model
    must call it too, or the list grows."""
    layers = moe_layers(model)
    losses = [loss for layer in layers for loss in layer.aux_losses]
    for layer in layers:
        layer.aux_losses = []
    return torch.stack(losses).sum() if losses else None


def routing_metrics(model: nn.Module) -> dict:
    """The last training step's routing, averaged over the sparse layers: the balance loss (1 = uniform),
    the z-loss, the router's entropy (log E = uniform), each expert's share of the assignments, and
    whether the router has collapsed onto a few experts."""
    layers = [layer for layer in moe_layers(model) if layer.stats]
    if not layers:
        return {}
    stats = [layer.stats for layer in layers]
    share = torch.stack([s["share"] for s in stats]).mean(0)
    # collapsed: the busiest expert's share is 90% of the way from a uniform router's (1/E) to the most one
    # expert can get (1/k, since each token's k experts are distinct)
    top_k, n = layers[0].cfg.top_k, len(share)
    return {"moe_balance": torch.stack([s["balance"] for s in stats]).mean().item(),
            "moe_z": torch.stack([s["z"] for s in stats]).mean().item(),
            "router_entropy": torch.stack([s["entropy"] for s in stats]).mean().item(),
            "expert_share_max": share.max().item(),
            "expert_share": [round(v, 4) for v in share.tolist()],
            "router_collapsed": share.max().item() > 1 / n + 0.9 * (1 / top_k - 1 / n) + 1e-6}
