"""Reward model (InstructGPT step 2): a scalar head on the last token of prompt + response, trained on
preference pairs with the Bradley-Terry loss (Ouyang et al., 2022, eq. 1):

    L(θ) = −log σ(r_θ(x, y_chosen) − r_θ(x, y_rejected) − m),   m = reward.margin (default 0)

so the reward difference is the log-odds that a person prefers the chosen response.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from chatforge.config import Config, config_to_dict
from chatforge.data.chat import ExampleSampler, pad_batch, pad_id, tokenize_conversation
from chatforge.data.readers import read_jsonl
from chatforge.errors import ChatforgeError
from chatforge.model.classifier import Classifier, load_trained_classifier, save_trained_classifier
from chatforge.model.io import load_run_model
from chatforge.model.lora import apply_lora
from chatforge.tokenizer import load_tokenizer
from chatforge.train.device import pick_device
from chatforge.train.loop import Stage, finish_run, train


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()

def as_messages(prompt, response, where: str) -> list[dict]:
    """A prompt (string or message list) and a response (string or assistant message list) as one chat."""
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    tail = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in head + tail):
        raise ChatforgeError(f"{where}: prompt and responses must be strings or lists of {{\"role\", \"content\"}}")
    return head + tail

def load_pairs(path: str | Path, tok, context: int, with_mask: bool = False) -> tuple[list[tuple], dict]:
    """Token ids of (chosen, rejected) conversations (with their assistant masks if `with_mask`);
    identical, empty or over-long pairs are counted skips."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"{path}: no such file")
    pairs, skipped = [], {"identical": 0, "empty": 0, "too_long": 0}
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not all(k in row for k in ("prompt", "chosen", "rejected")):
            raise ChatforgeError(f"{where}: a preference row needs \"prompt\", \"chosen\" and \"rejected\"")
        if row["chosen"] == row["rejected"]:
            skipped["identical"] += 1
            continue
        if not row["chosen"] or not row["rejected"]:
            skipped["empty"] += 1
            continue
        both = [tokenize_conversation(tok, as_messages(row["prompt"], row[k], where)) for k in ("chosen", "rejected")]
        if max(len(ids) for ids, _ in both) > context:
            skipped["too_long"] += 1
            continue
        pairs.append(tuple(both) if with_mask else (both[0][0], both[1][0]))
    if not pairs:
        raise ChatforgeError(f"{path}: no usable preference pairs ({skipped})")
    return pairs, skipped


def score_pairs(model: Classifier, pairs: list, pad_token: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and the rejected responses, one forward pass over both."""
    x, n = pad_batch([c for c, _ in pairs] + [r for _, r in pairs], pad_token, device)
    rewards = model(x, n).squeeze(-1).float()
    return rewards[: len(pairs)], rewards[len(pairs) :]

def run_reward(cfg: Config, init: str | Path, data: str | Path, val: str | Path, out: str | Path,
               resume: str | None = None) -> dict:
    """A reward model from `init`: a language-model run (a new head on its last token, as InstructGPT starts
    from the SFT model), or a reward-model run, which is trained further (a later round of iterated RLHF)."""
    out = Path(out)
    tok = load_tokenizer(init)
    torch.manual_seed(cfg.train.seed)
    lora = config_to_dict(cfg.lora) if cfg.lora.r else None
    if (Path(init) / "reward.json").is_file():
        model = load_reward_model(init).train()
        body, lora = model.body, json.loads((Path(init) / "reward.json").read_text()).get("lora")
    else:
        body = load_run_model(init)
        if cfg.lora.r > 0:
            apply_lora(body, cfg.lora)
        model = Classifier(body, 1)
    cfg.model = body.cfg
    pairs, skipped = load_pairs(data, tok, body.cfg.context)
    val_pairs, _ = load_pairs(val, tok, body.cfg.context)
    if any(skipped.values()):
        print(f"rm: skipped pairs in {data}: {skipped}")
    device = pick_device(cfg.train.device)
    sampler = ExampleSampler(len(pairs), cfg.train.batch_size, cfg.train.seed)
    pad_token = pad_id(tok)

    def accuracy(m) -> float:
        wins = 0
        for i in range(0, len(val_pairs), 64):
            chosen, rejected = score_pairs(m, val_pairs[i : i + 64], pad_token, device)
            wins += int((chosen > rejected).sum())
        return wins / len(val_pairs)

    stage = Stage(name="rm", next_batch=lambda: [pairs[i] for i in sampler.next_indices()],
                  loss=lambda m, batch: bradley_terry_loss(*score_pairs(m, batch, pad_token, device),
                                                        cfg.reward.margin),
                  tokens=lambda batch: sum(len(c) + len(r) for c, r in batch),
                  evaluate=lambda m: {"val_accuracy": accuracy(m)},
                  data_state=sampler.state_dict, load_data_state=sampler.load_state_dict)
    result = train(model, stage, cfg, out, resume)
    meta = {"model": config_to_dict(body.cfg), "lora": lora}
    summary = {"val_accuracy": result.get("val_accuracy"), "pairs": len(pairs), "val_pairs": len(val_pairs),
               "skipped": skipped}
    return finish_run(out, lambda: save_trained_classifier(model.cpu(), out, "reward", meta, init), summary)

def load_reward_model(run: str | Path) -> Classifier:
    run = Path(run)
    path = run / "reward.json"
    if not path.is_file():
        raise ChatforgeError(f"{path}: not a reward-model run; train one with `chatforge rm`")
    return load_trained_classifier(json.loads(path.read_text()), 1, run / "reward.safetensors")


@torch.no_grad()
def score_responses(run: str | Path, path: str | Path) -> Iterator[tuple[float, str]]:
    """(reward, response) for each {"prompt", "response"} row of a .jsonl file: `chatforge rm --score`."""
    model, tok = load_reward_model(run), load_tokenizer(run)
    for lineno, row in read_jsonl(Path(path)):
        if "prompt" not in row or "response" not in row:
            raise ChatforgeError(f"{path}:{lineno}: a row needs \"prompt\" and \"response\"")
        ids, _ = tokenize_conversation(tok, as_messages(row["prompt"], row["response"], f"{path}:{lineno}"))
        yield model(*pad_batch([ids[-model.body.cfg.context :]], pad_id(tok), "cpu")).item(), row["response"]
