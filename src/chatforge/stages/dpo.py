"""Direct Preference Optimisation (Rafailov et al., 2023): fit the preferences directly, with the
frozen SFT model as the reference, no reward model and no sampling. With
h = β[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))]:

    sigmoid (DPO, eq. 7):                 L = −log σ(h)
    cdpo (label smoothing ε):             L = −(1−ε) log σ(h) − ε log σ(−h)
    ipo (Azar et al., 2023, eq. 17):      L = (h/β − 1/(2β))²

The implicit reward of a response is r = β(log π(y|x) − log π_ref(y|x)) (DPO §5).

With `dpo.nll_coef` = α > 0, α × the chosen reply's negative log-likelihood per token is added (RPO:
Pang et al., 2024, "Iterative Reasoning Preference Optimization", eq. 1). The DPO loss alone can lower
log π(y_c|x) as long as log π(y_r|x) falls faster; the NLL term keeps the chosen replies likely.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from chatforge.config import Config
from chatforge.data.chat import ExampleSampler, collate, pad_id
from chatforge.errors import ChatforgeError
from chatforge.model.io import load_run_model, save_trained
from chatforge.model.logprob import token_logprobs
from chatforge.model.lora import apply_lora
from chatforge.stages.reward import load_pairs
from chatforge.tokenizer import load_tokenizer
from chatforge.train.device import pick_device
from chatforge.train.loop import Stage, finish_run, train

LOSSES = ("sigmoid", "ipo", "cdpo")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean loss over pairs, and the implicit rewards of the chosen and rejected responses."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    h = chosen_reward - rejected_reward
    if kind == "sigmoid":
        loss = -F.logsigmoid(h)
    elif kind == "cdpo":
        loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif kind == "ipo":
        loss = (h / beta - 1 / (2 * beta)) ** 2
    else:
        raise ChatforgeError(f"dpo.loss must be one of {', '.join(LOSSES)}, got '{kind}'")
    return loss.mean(), chosen_reward.detach(), rejected_reward.detach()


def reply_logprobs(model: torch.nn.Module, examples: list, pad_token: int, device) -> torch.Tensor:
    """Σ log π(token) over each conversation's assistant tokens: log π(y|x) of the response."""
    x, y = collate(examples, pad_token)
    return token_logprobs(model, x.to(device), y.to(device)).sum(-1)


def run_dpo(cfg: Config, init: str | Path, data: str | Path, val: str | Path, out: str | Path,
            resume: str | None = None) -> dict:
    out = Path(out)
    tok = load_tokenizer(init)
    torch.manual_seed(cfg.train.seed)
    model = load_run_model(init)
    cfg.model = model.cfg
    pairs, skipped = load_pairs(data, tok, model.cfg.context, with_mask=True)
    val_pairs, _ = load_pairs(val, tok, model.cfg.context, with_mask=True)
    device = pick_device(cfg.train.device)
    pad_token = pad_id(tok)
    model.to(device).eval()

    @torch.no_grad()
    def logprobs(m, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        out_c, out_r = [], []
        for i in range(0, len(items), 64):
            chunk = items[i : i + 64]
            out_c.append(reply_logprobs(m, [c for c, _ in chunk], pad_token, device))
            out_r.append(reply_logprobs(m, [r for _, r in chunk], pad_token, device))
        return torch.cat(out_c), torch.cat(out_r)

    # The reference is the starting model, frozen: its log-probs are computed once and cached.
    ref_c, ref_r = logprobs(model, pairs)
    val_ref_c, val_ref_r = logprobs(model, val_pairs)
    if cfg.lora.r > 0:
        apply_lora(model, cfg.lora)
    sampler = ExampleSampler(len(pairs), cfg.train.batch_size, cfg.train.seed)
    d = cfg.dpo
    chosen_tokens = torch.tensor([float(sum(mask[1:])) for (_, mask), _ in pairs], device=device).clamp(min=1)

    def loss(m, idx: list[int]) -> torch.Tensor:
        batch = [pairs[i] for i in idx]
        both = reply_logprobs(m, [c for c, _ in batch] + [r for _, r in batch], pad_token, device)
        value, _, _ = dpo_loss(both[: len(idx)], both[len(idx) :], ref_c[idx], ref_r[idx], d.beta, d.loss,
                               d.label_smoothing)
        if d.nll_coef > 0:
            value = value - d.nll_coef * (both[: len(idx)] / chosen_tokens[idx]).mean()
        return value

    def evaluate(m) -> dict:
        pc, pr = logprobs(m, val_pairs)
        value, rc, rr = dpo_loss(pc, pr, val_ref_c, val_ref_r, d.beta, d.loss, d.label_smoothing)
        return {"val_loss": value.item(), "val_reward_accuracy": (rc > rr).float().mean().item(),
                "val_reward_margin": (rc - rr).mean().item()}

    stage = Stage(name="dpo", next_batch=sampler.next_indices, loss=loss,
                  tokens=lambda idx: sum(len(pairs[i][0][0]) + len(pairs[i][1][0]) for i in idx),
                  evaluate=evaluate, data_state=sampler.state_dict, load_data_state=sampler.load_state_dict)
    result = train(model, stage, cfg, out, resume)
    summary = {**result, "pairs": len(pairs), "skipped": skipped}
    return finish_run(out, lambda: save_trained(model, cfg.lora, init, out, "dpo"), summary)
