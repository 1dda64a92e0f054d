"""Supervised fine-tuning (InstructGPT step 1): next-token loss on the assistant's tokens only.

    L(θ) = −Σₜ mₜ log p_θ(xₜ₊₁ | x≤ₜ) / Σₜ mₜ,   mₜ = 1 on assistant content and its <|im_end|>, else 0

The same stage code does full fine-tuning or LoRA (`lora.r > 0`): only which weights train differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from chatforge.config import Config, config_to_dict
from chatforge.data.chat import ExampleSampler, build_examples, collate, load_conversations, pad_id
from chatforge.errors import ChatforgeError
from chatforge.model.io import load_run_model, save_model_files
from chatforge.model.lora import apply_lora, save_adapter
from chatforge.stages.pretrain import language_model_loss
from chatforge.tokenizer import copy_tokenizer, load_tokenizer
from chatforge.train.device import pick_device
from chatforge.train.distributed import is_main
from chatforge.train.loop import Stage, train


def prepare_examples(tok, path: str | Path, context: int, what: str) -> list:
    examples, skipped = build_examples(tok, load_conversations(path), context)
    if skipped:
        print(f"{what}: skipped {skipped} conversations longer than the context ({context} tokens) in {path}")
    if not examples:
        raise ChatforgeError(f"{path}: every conversation is longer than the context ({context} tokens)")
    return examples


def save_trained(model: torch.nn.Module, cfg: Config, init: str | Path, out: Path, stage: str) -> None:
    """A fine-tuned policy's run folder: only the adapter (naming its base run) under LoRA, else the
    whole model; and the tokenizer. Shared by every stage that fine-tunes the language model."""
    model.cpu()
    if cfg.lora.r > 0:
        save_adapter(model, cfg.lora, out, str(Path(init).resolve()))
    else:
        save_model_files(model, out, {"stage": stage})
    copy_tokenizer(init, out)


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

    mean_len = sum(len(ids) for ids, _ in examples) / len(examples)
    stage = Stage(name="sft", next_batch=next_batch, loss=language_model_loss,
                  tokens_per_batch=int(cfg.train.batch_size * mean_len),
                  evaluate=evaluate if val_examples else None,
                  data_state=sampler.state_dict, load_data_state=sampler.load_state_dict)
    result = train(model, stage, cfg.train, out, config_to_dict(cfg), resume)
    if is_main():  # under torchrun, rank 0 writes the run folder
        save_trained(model, cfg, init, out, "sft")
    summary = {**result, "examples": len(examples), "trainable_params": sum(
        p.numel() for p in model.parameters() if p.requires_grad)}
    if is_main():  # under torchrun, rank 0 writes the run folder
        (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
