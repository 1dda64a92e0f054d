"""A model on disk: `model.safetensors` (tensors) + `model.json` (its config). No pickle, ever."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from chatforge.errors import ChatforgeError
from chatforge.model.lora import LoRAConfig, save_adapter
from chatforge.model.transformer import ModelConfig, Transformer
from chatforge.tokenizer import copy_tokenizer


def save_model_files(model: Transformer, folder: str | Path, extra: dict | None = None) -> None:
    """Write model.safetensors and model.json, each to a temp name first, then renamed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / "model.safetensors.tmp"))
    meta = {"format": "chatforge", "model": dataclasses.asdict(model.cfg), **(extra or {})}
    (folder / "model.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")
    os.replace(folder / "model.json.tmp", folder / "model.json")


def read_model_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / "model.json"
    if not path.is_file():
        raise ChatforgeError(f"{path}: no model here; point at a run folder that has model.json + model.safetensors")
    table = json.loads(path.read_text())["model"]
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(table) - known
    if unknown:
        raise ChatforgeError(f"{path}: unknown model keys {sorted(unknown)}; was it written by a newer chatforge?")
    return ModelConfig(**table)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load safetensors weights, turning shape or key mismatches into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"{path}: weights file not found")
    try:
        load_model(model, str(path), strict=True)
    except (RuntimeError, SafetensorError) as e:
        raise ChatforgeError(
            f"{path}: these weights do not fit this model ({str(e).splitlines()[0][:300]}); "
            "the model config must match the one the weights were trained with"
        ) from None


def load_run_model(folder: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """The model saved in a run folder, in eval mode. A LoRA run holds only its adapter and names
    its base run, which is loaded first."""
    folder = Path(folder)
    adapter = folder / "adapter.json"
    if adapter.is_file() and not (folder / "model.safetensors").is_file():
        from chatforge.model.lora import load_adapter

        model = load_run_model(json.loads(adapter.read_text())["base"])
        load_adapter(model, folder)
        return model.to(device).eval()
    model = Transformer(read_model_config(folder))
    load_weights(model, folder / "model.safetensors")
    return model.to(device).eval()


def save_trained(model: torch.nn.Module, lora: LoRAConfig, init: str | Path, out: Path, stage: str) -> None:
    """A fine-tuned policy's run folder: only the adapter (naming its base run) under LoRA, else the
    whole model; and the tokenizer. Shared by every stage that fine-tunes the language model."""
    model.cpu()
    if lora.r > 0:
        save_adapter(model, lora, out, str(Path(init).resolve()))
    else:
        save_model_files(model, out, {"stage": stage})
    copy_tokenizer(init, out)
