"""Classification: a linear head on the hidden state of the last real token (`model.classifier`), trained
with cross-entropy: L = −log softmax(W h_last)[label].

`classify.freeze`: head (only the head trains), last_n (the head, the final norm and the last
`classify.n_train_layers` blocks), none (everything).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from chatforge.config import Config, config_to_dict
from chatforge.data.chat import ExampleSampler, pad_batch, pad_id
from chatforge.data.readers import read_jsonl
from chatforge.errors import ChatforgeError
from chatforge.model.classifier import Classifier, load_trained_classifier, save_trained_classifier
from chatforge.model.io import load_run_model
from chatforge.model.lora import apply_lora
from chatforge.tokenizer import encode, load_tokenizer
from chatforge.train.device import pick_device
from chatforge.train.loop import Stage, finish_run, train


def freeze(model: Classifier, how: str, n_layers: int) -> None:
    if how not in ("head", "last_n", "none"):
        raise ChatforgeError(f"classify.freeze must be head, last_n or none, got '{how}'")
    for p in model.body.parameters():
        p.requires_grad_(how == "none")
    if how == "last_n":
        for module in [*model.body.blocks[-n_layers:], model.body.norm]:
            for p in module.parameters():
                p.requires_grad_(True)


def load_labelled(path: str | Path, labels: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Texts and labels of a {"text", "label"} .jsonl; with `labels`, a label outside them names file:line."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"{path}: no such file")
    texts, ys = [], []
    for lineno, row in read_jsonl(path):
        if not isinstance(row.get("text"), str) or not row["text"].strip() or "label" not in row:
            raise ChatforgeError(f"{path}:{lineno}: a row needs a non-empty \"text\" and a \"label\"")
        label = str(row["label"])
        if labels is not None and label not in labels:
            raise ChatforgeError(f"{path}:{lineno}: label {label!r} is not one of the training labels {labels}")
        texts.append(row["text"])
        ys.append(label)
    if not texts:
        raise ChatforgeError(f"{path}: no rows")
    return texts, ys


def batchify(tok, texts: list[str], context: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and true lengths; texts longer than the context keep their first tokens."""
    return pad_batch([encode(tok, t)[:context] or [pad_id(tok)] for t in texts], pad_id(tok), device)


def confusion(model: Classifier, tok, texts, ys, labels, context, device) -> tuple[float, list[list[int]]]:
    matrix = [[0] * len(labels) for _ in labels]
    model.eval()
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            x, n = batchify(tok, texts[i : i + 64], context, device)
            for truth, pred in zip(ys[i : i + 64], model(x, n).argmax(-1).tolist(), strict=True):
                matrix[labels.index(truth)][pred] += 1
    return sum(matrix[i][i] for i in range(len(labels))) / max(1, len(texts)), matrix


def run_classify(cfg: Config, init: str | Path, data: str | Path, val: str | Path, out: str | Path,
                 resume: str | None = None) -> dict:
    out = Path(out)
    tok = load_tokenizer(init)
    texts, ys = load_labelled(data)
    labels = sorted(set(ys))
    val_texts, val_ys = load_labelled(val, labels)  # validated before any training
    torch.manual_seed(cfg.train.seed)
    body = load_run_model(init)
    cfg.model = body.cfg
    model = Classifier(body, len(labels))
    freeze(model, cfg.classify.freeze, cfg.classify.n_train_layers)
    if cfg.lora.r > 0:  # adapters on the body instead of unfreezing it; the head always trains
        apply_lora(body, cfg.lora)
    device = pick_device(cfg.train.device)
    context = body.cfg.context
    targets = torch.tensor([labels.index(y) for y in ys])
    sampler = ExampleSampler(len(texts), cfg.train.batch_size, cfg.train.seed)

    def next_batch():
        idx = sampler.next_indices()
        x, n = batchify(tok, [texts[i] for i in idx], context, device)
        return x, n, targets[idx].to(device)

    def loss(m, batch):
        x, n, y = batch
        return F.cross_entropy(m(x, n).float(), y)

    def evaluate(m) -> dict:
        return {"val_accuracy": confusion(m, tok, val_texts, val_ys, labels, context, device)[0]}

    stage = Stage(name="classify", next_batch=next_batch, loss=loss, tokens=lambda batch: batch[0].numel(),
                  evaluate=evaluate, data_state=sampler.state_dict, load_data_state=sampler.load_state_dict)
    train(model, stage, cfg, out, resume)
    accuracy, matrix = confusion(model, tok, val_texts, val_ys, labels, context, device)
    majority = max(val_ys.count(label) for label in labels) / len(val_ys)
    meta = {"labels": labels, "model": config_to_dict(body.cfg), "base": str(Path(init).resolve()),
            "lora": config_to_dict(cfg.lora) if cfg.lora.r > 0 else None}
    summary = {"val_accuracy": accuracy, "majority_baseline": majority, "labels": labels, "confusion": matrix}
    return finish_run(out, lambda: save_trained_classifier(model.cpu(), out, "classifier", meta, init), summary)


def load_classifier(run: str | Path) -> tuple[Classifier, list[str]]:
    run = Path(run)
    path = run / "classifier.json"
    if not path.is_file():
        raise ChatforgeError(f"{path}: not a classifier run; train one with `chatforge classify`")
    meta = json.loads(path.read_text())
    return load_trained_classifier(meta, len(meta["labels"]), run / "classifier.safetensors"), meta["labels"]


def predict(run: str | Path, texts: list[str]) -> list[tuple[str, float]]:
    model, labels = load_classifier(run)
    tok = load_tokenizer(run)
    with torch.no_grad():
        x, n = batchify(tok, texts, model.body.cfg.context, "cpu")
        probs = model(x, n).softmax(-1)
    return [(labels[int(p.argmax())], float(p.max())) for p in probs]
