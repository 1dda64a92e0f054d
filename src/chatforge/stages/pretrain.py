"""Pre-training: predict the next token of unlabelled text. Loss = -mean log p(x_t | x_<t)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from chatforge.config import Config
from chatforge.data.shards import WindowSampler, eval_windows, load_meta, open_tokens
from chatforge.errors import ChatforgeError
from chatforge.model.io import save_model_files
from chatforge.model.transformer import Transformer
from chatforge.tokenizer import copy_tokenizer
from chatforge.train.device import pick_device
from chatforge.train.loop import Stage, finish_run, train


def language_model_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return model(x, targets=y)


def make_evaluator(data_dir: str | Path, context: int, n_windows: int, device: torch.device):
    """Held-out loss on fixed val windows, and bits per byte: loss/ln2 * tokens/bytes of the val split,
    which compares models with different tokenizers fairly."""
    meta = load_meta(data_dir)
    windows = torch.from_numpy(eval_windows(open_tokens(data_dir, "val"), context, n_windows))
    bytes_per_token = meta["val"]["bytes"] / meta["val"]["tokens"]

    def evaluate(model: torch.nn.Module) -> dict:
        losses = []
        for chunk in windows.split(8):
            chunk = chunk.to(device)
            losses.append(model(chunk[:, :-1], targets=chunk[:, 1:]).item())
        loss = sum(losses) / len(losses)
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / bytes_per_token}

    return evaluate


def run_pretrain(cfg: Config, out: str | Path, resume: str | None = None) -> dict:
    out = Path(out)
    data_dir = Path(cfg.data.dir)
    meta = load_meta(data_dir)
    if cfg.model.vocab_size == 0:  # the default: take it from the data
        cfg.model.vocab_size = meta["vocab_size"]
    elif cfg.model.vocab_size != meta["vocab_size"]:
        raise ChatforgeError(f"model.vocab_size={cfg.model.vocab_size} but the data in {data_dir} was tokenized "
                             f"with {meta['vocab_size']} ids; set model.vocab_size=0 to use the data's")
    torch.manual_seed(cfg.train.seed)  # the same seed, the same initial weights
    model = Transformer(cfg.model)
    sampler = WindowSampler(open_tokens(data_dir, "train"), cfg.model.context, cfg.train.batch_size, cfg.train.seed)
    device = pick_device(cfg.train.device)

    def next_batch():
        x, y = sampler.next_batch()
        return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    stage = Stage(
        name="pretrain",
        next_batch=next_batch,
        loss=language_model_loss,
        tokens=lambda batch: batch[0].numel(),
        evaluate=make_evaluator(data_dir, cfg.model.context, cfg.train.eval_batches * cfg.train.batch_size, device),
        data_state=sampler.state_dict,
        load_data_state=sampler.load_state_dict,
    )
    result = train(model, stage, cfg, out, resume)

    def save() -> None:
        save_model_files(model.cpu(), out, {"stage": "pretrain"})
        copy_tokenizer(data_dir, out)

    summary = {**result, "params": model.num_params(), "val_unigram_bpb": meta["val_unigram_bpb"],
               "val_unigram_entropy": meta["val_unigram_entropy"]}
    return finish_run(out, save, summary)
