"""A head on the language model: the hidden state of the last real token (the causal model has read the
whole text there) through one linear layer. The classifier, the reward model and PPO's critic are all this."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from chatforge.model.io import load_weights
from chatforge.model.lora import LoRAConfig, apply_lora
from chatforge.model.transformer import ModelConfig, Transformer
from chatforge.tokenizer import copy_tokenizer


class Classifier(nn.Module):
    def __init__(self, body: Transformer, n_labels: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.cfg.d_model, n_labels)
        self.flops_per_token = body.flops_per_token

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.body.hidden(idx)
        return self.head(hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1])


def save_trained_classifier(model: Classifier, out: Path, name: str, meta: dict, init: str | Path) -> None:
    """`name`.safetensors (the weights), `name`.json (`meta`: what loading needs) and the tokenizer of `init`."""
    save_model(model, str(out / f"{name}.safetensors"))
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    copy_tokenizer(init, out)


def load_trained_classifier(meta: dict, n_outputs: int, weights: Path) -> Classifier:
    """A saved classifier or reward model: the body in the shape it was trained with ("model" of its json),
    with its LoRA adapters when it had them ("lora"), the head, and the weights. Eval mode."""
    body = Transformer(ModelConfig(**meta["model"]))
    if meta.get("lora"):
        apply_lora(body, LoRAConfig(**meta["lora"]))
    model = Classifier(body, n_outputs)
    load_weights(model, weights)
    return model.eval()
