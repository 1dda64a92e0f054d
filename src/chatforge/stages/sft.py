"""Supervised fine-tuning (InstructGPT step 1): next-token loss on the assistant's tokens only.

    L(θ) = −Σₜ mₜ log p_θ(xₜ₊₁ | x≤ₜ) / Σₜ mₜ,   mₜ = 1 on assistant content and its <|im_end|>, else 0

The same stage code does full fine-tuning or LoRA (`lora.r > 0`): only which weights train differs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatforge.config import Config
from chatforge.data.chat import ExampleSampler, build_examples, collate, load_conversations, pad_id
from chatforge.errors import ChatforgeError
from chatforge.model.io import load_run_model, save_trained
from chatforge.model.lora import apply_lora
from chatforge.stages.pretrain import language_model_loss
from chatforge.tokenizer import load_tokenizer
from chatforge.train.device import pick_device
from chatforge.train.loop import Stage, finish_run, train


def prepare_examples(tok, path: str | Path, context: int, what: str) -> list:
    examples, skipped = build_examples(tok, load_conversations(path), context)
    if skipped:
        print(f"{what}: skipped {skipped} conversations longer than the context ({context} tokens) in {path}")
    if not examples:
        raise ChatforgeError(f"{path}: every conversation is longer than the context ({context} tokens)")
    return examples


def run_sft(cfg: Config, init: str | Path, data: str | Path, out: str | Path, val: str | Path | None = None,
            resume: str | None = None) -> dict:
    out = Path(out)
    tok = load_tokenizer(init)
    torch.manual_seed(cfg.train.seed)
    model = load_run_model(init)
    cfg.model = model.cfg  # recorded in config.toml: the shape comes from the base run, not from the config
    context = model.cfg.context
    examples = prepare_examples(tok, data, context, "sft")
    val_examples = prepare_examples(tok, val, context, "sft val")[: cfg.train.eval_batches * 32] if val else []
    if cfg.lora.r > 0:
        apply_lora(model, cfg.lora)
    device = pick_device(cfg.train.device)
    sampler = ExampleSampler(len(examples), cfg.train.batch_size, cfg.train.seed)
    pad = pad_id(tok)

    def next_batch():
        x, y = collate([examples[i] for i in sampler.next_indices()], pad)
        return x.to(device), y.to(device)

    def evaluate(m: torch.nn.Module) -> dict:
        losses = []
        for i in range(0, len(val_examples), 32):
            x, y = collate(val_examples[i : i + 32], pad)
            losses.append(language_model_loss(m, (x.to(device), y.to(device))).item())
        return {"val_loss": sum(losses) / len(losses)}

    stage = Stage(name="sft", next_batch=next_batch, loss=language_model_loss,
                  tokens=lambda batch: batch[0].numel(),
                  evaluate=evaluate if val_examples else None,
                  data_state=sampler.state_dict, load_data_state=sampler.load_state_dict)
    result = train(model, stage, cfg, out, resume)
    summary = {**result, "examples": len(examples), "trainable_params": sum(
        p.numel() for p in model.parameters() if p.requires_grad)}
    return finish_run(out, lambda: save_trained(model, cfg.lora, init, out, "sft"), summary)
